"""Bad input through the real CLI, in a subprocess: exit 2, one line on stderr naming the field,
no traceback, nothing written, and no model weights loaded (the child process makes
`PreTrainedModel.from_pretrained` raise). Config mistakes must not even import torch: that is
what keeps them fast (`llmkd distill` answers in well under 2 s instead of ~10 s)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
import yaml

# The child: refuse weight loading (patched as soon as transformers' modeling_utils is imported,
# without importing it earlier) and report which model libraries were imported.
RUNNER = r"""
import importlib.abc, importlib.machinery, sys

class RefuseWeights(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers.modeling_utils":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            def refuse(cls, *args, **kwargs):
                raise AssertionError("model weights loaded: from_pretrained was called")
            module.PreTrainedModel.from_pretrained = classmethod(refuse)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, RefuseWeights())
from llmkd.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(" ".join(m for m in ("torch", "transformers", "peft") if m in sys.modules))
sys.exit(code)
"""


@dataclass
class Case:
    """One bad input: `setup(tmp, cfg)` may write files and edit the config dict (cfg is None
    for commands without a distill config); `expect` are substrings of the error line."""

    expect: tuple[str, ...]
    setup: Callable[[Path, dict], list[str] | None] = lambda tmp, cfg: None
    light: bool = True                  # a config error: torch must not be imported
    argv: Callable[[Path], list[str]] | None = None   # default: llmkd distill cfg.yaml
    sets: list[str] = field(default_factory=list)


def edit(**top) -> Callable[[Path, dict], None]:
    """Set dotted keys of the config: edit(**{"model.teacher": "x"})."""
    def apply(tmp: Path, cfg: dict) -> None:
        for key, value in top.items():
            node = cfg
            *parents, last = key.split(".")
            for part in parents:
                node = node[part]
            node[last] = value(tmp) if callable(value) else value
    return apply


def model_copy(tmp: Path, src: str, name: str = "broken") -> Path:
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def broken_student(change: Callable[[Path], None]) -> Callable[[Path, dict], None]:
    """A copy of the tiny student damaged by `change`, used as model.student."""
    def apply(tmp: Path, cfg: dict) -> None:
        d = model_copy(tmp, cfg["model"]["student"])
        change(d)
        cfg["model"]["student"] = str(d)
    return apply


def truncate(d: Path, name: str = "model.safetensors") -> None:
    f = d / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def shrink_vocab(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 300                       # the tokenizer has 512 tokens
    (d / "config.json").write_text(json.dumps(cfg))


def drop_tokenizer(d: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()


def file_text(name: str, text: str) -> Callable[[Path], str]:
    def make(tmp: Path) -> str:
        (tmp / name).write_text(text)
        return str(tmp / name)
    return make


def raw_config(text: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["distill", file_text("raw.yaml", text)(tmp)]


def local_rows(n: int, columns: tuple[str, str] = ("question", "answer")) -> Callable[[Path], str]:
    rows = "".join(json.dumps({columns[0]: f"{i}+1?", columns[1]: str(i + 1)}) + "\n" for i in range(n))
    return file_text("data.jsonl", rows)


def other_tokenizer_student(tmp: Path, cfg: dict) -> None:
    from llmkd.models.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=400)
    tiny_model(tok).save_pretrained(tmp / "other")
    tok.save_pretrained(tmp / "other")
    cfg["model"]["student"] = str(tmp / "other")


def with_checkpoint(complete: bool) -> Callable[[Path, dict], None]:
    def apply(tmp: Path, cfg: dict) -> None:
        ckpt = Path(cfg["output_dir"]) / "checkpoint-3"
        ckpt.mkdir(parents=True)
        if complete:
            (ckpt / "trainer_state.json").write_text("{}")
            shutil.copy(Path(cfg["model"]["student"]) / "model.safetensors", ckpt)
    return apply


def copied(role: str, out: Callable[[Path, Path], Path] | None = None,
           extra: Callable[[Path, dict], None] = lambda tmp, cfg: None) -> Callable[[Path, dict], None]:
    """model.<role> becomes a copy in the work dir; output_dir = out(tmp, copy) when given."""
    def apply(tmp: Path, cfg: dict) -> None:
        d = model_copy(tmp, cfg["model"][role], role)
        cfg["model"][role] = str(d)
        if out is not None:
            cfg["output_dir"] = str(out(tmp, d))
        extra(tmp, cfg)
    return apply


def checkpoint_with(name: str, content: bytes | str) -> Callable[[Path, dict], None]:
    """A complete checkpoint whose `name` holds `content`, given as resume_from_checkpoint."""
    def apply(tmp: Path, cfg: dict) -> None:
        with_checkpoint(complete=True)(tmp, cfg)
        ckpt = Path(cfg["output_dir"]) / "checkpoint-3"
        (ckpt / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        cfg["resume_from_checkpoint"] = str(ckpt)
    return apply


HELD: list[int] = []      # lock descriptors this process holds during a case


def another_run_holds_the_lock(tmp: Path, cfg: dict) -> None:
    import fcntl

    from llmkd.training.outdir import LOCK

    out = Path(cfg["output_dir"])
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    HELD.append(fd)


def teachers(mix: str = "route", weights: tuple[float, float] = (1.0, 1.0), keep_teacher: bool = False,
             second: dict | None = None, routes: tuple[str, str] = ("math", "logic"),
             method: dict | None = None, own: dict | None = None) -> Callable[[Path, dict], None]:
    """The config with two teachers (model.teachers), a two-source data.mixture and teacher_mix;
    `own`: the second teacher's own method keys (model.teachers.logic.method)."""
    def apply(tmp: Path, cfg: dict) -> None:
        t = cfg["model"]["teacher"] if keep_teacher else cfg["model"].pop("teacher")
        if second == "other-tokenizer":
            other_tokenizer_student(tmp, {"model": cfg["model"] | {}})
        logic = {"teacher": str(tmp / "other")} if second == "other-tokenizer" else (second or {"teacher": t})
        cfg["model"]["teachers"] = {"math": {"teacher": t, "weight": weights[0]}, "logic": {**logic, "weight": weights[1]}}
        if own is not None:
            cfg["model"]["teachers"]["logic"]["method"] = own
        cfg["data"] = {"mixture": [{"recipe": "arithmetic", "num_train": 8, "num_eval": 4, "teacher": r} for r in routes]}
        cfg["method"].update({"teacher_mix": mix, **(method or {})})
    return apply


def several_teacher_dir(tmp: Path, cfg: dict, names: tuple[str, ...], single: bool = False) -> None:
    """data.path = a generated dir of several teachers (its manifest; the shards are not read
    before the error), model.teachers = math + logic offline (or the one model.teacher)."""
    (tmp / "mix").mkdir()
    (tmp / "mix" / "manifest.json").write_text(json.dumps({"metadata": {"teachers": {n: {} for n in names}}}))
    if not single:
        cfg["model"].pop("teacher")
        cfg["model"]["teachers"] = {"math": {"teacher_mode": "offline"}, "logic": {"teacher_mode": "offline"}}
    else:
        cfg["model"]["teacher_mode"] = "offline"
    cfg["data"] = {"path": str(tmp / "mix"), "num_train": 4, "num_eval": 2}


def eval_argv(model: Callable[[Path], str], *extra: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["eval", "--model", model(tmp), "--recipes", "arithmetic", "--backend", "hf",
                        "--out", str(tmp / "eval"), *extra]


def eval_model(change: Callable[[Path], None]) -> Callable[[Path], str]:
    def make(tmp: Path) -> str:
        d = model_copy(tmp, STUDENT[0])
        change(d)
        return str(d)
    return make


def generated(change: Callable[[Path], None]) -> Callable[[Path, dict], None]:
    """An offline run on a generation dir (top-k 20 log-probs, as `llmkd generate` writes them)
    damaged by `change`."""
    def apply(tmp: Path, cfg: dict) -> None:
        import random

        import pyarrow as pa

        from llmkd.generation.writer import ShardWriter

        rng = random.Random(0)
        schema = pa.schema([("id", pa.string()), ("sample", pa.int32()),
                            ("teacher_topk_ids", pa.list_(pa.list_(pa.int32()))),
                            ("teacher_topk_logprobs", pa.list_(pa.list_(pa.float32())))])
        for k, name in ((20, "gen"), (5, "other")):
            w = ShardWriter(tmp / name, {"topk": k}, schema, shard_size=64)
            w.add([{"id": f"arithmetic-{i}-x", "sample": 0,
                    "teacher_topk_ids": [[rng.randrange(500) for _ in range(k)] for _ in range(40)],
                    "teacher_topk_logprobs": [[-10 * rng.random() for _ in range(k)] for _ in range(40)]}
                   for i in range(64)])
            w.close()
        change(tmp)
        cfg["model"]["teacher_mode"] = "offline"
        cfg["data"] = {"path": str(tmp / "gen"), "num_train": 8, "num_eval": 4}
    return apply


def zero_bytes(tmp: Path) -> None:
    shard = tmp / "gen" / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    shard.write_bytes(data)


def safetensors_header(header: object) -> Callable[[Path], None]:
    """model.safetensors rewritten with this JSON header and 4 data bytes."""
    def change(d: Path) -> None:
        raw = json.dumps(header).encode()
        (d / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    return change


def cut_in_half(name: str) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        text = (d / name).read_text()
        (d / name).write_text(text[: len(text) // 2])
    return change


def generate_argv(**over) -> Callable[[Path], list[str]]:
    """`llmkd generate` with the tiny teacher on the hf backend, plus `over`."""
    def make(tmp: Path) -> list[str]:
        cfg = {"model": TEACHER[0], "backend": "hf", "recipe": "arithmetic", "num_prompts": 2,
               "max_new_tokens": 4, "max_model_len": 256, "topk": 5, "output_dir": str(tmp / "gen"), **over}
        (tmp / "gen.yaml").write_text(yaml.safe_dump(cfg))
        return ["generate", str(tmp / "gen.yaml")]
    return make


PORTS: list[socket.socket | ThreadingHTTPServer] = []   # ports held busy (servers run) while a case runs


def serve_on_a_busy_port(tmp: Path) -> list[str]:
    held = socket.create_server(("127.0.0.1", 0))
    PORTS.append(held)
    url = f"http://127.0.0.1:{held.getsockname()[1]}"
    (tmp / "serve.yaml").write_text(yaml.safe_dump({"model": {"teacher": TEACHER[0], "teacher_server": url}}))
    return ["serve-teacher", str(tmp / "serve.yaml")]


class NotVllm(ThreadingHTTPServer):
    """Answers every request with 200 and a web page: an HTTP server, but not vLLM."""

    def __init__(self) -> None:
        class Page(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", "18")
                self.end_headers()
                self.wfile.write(b"<html>hello</html>")

        super().__init__(("127.0.0.1", 0), Page)
        self.daemon_threads = True
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def served_by(kind: str) -> Callable[[Path, dict], None]:
    """model.teacher_server (no model.teacher) at: nothing ('closed'), a socket that accepts
    connections and never answers ('silent'; the kernel completes them without accept()), or
    an HTTP server that is not vLLM ('not-vllm'). The probe waits 1 s (model.teacher_timeout)."""
    def apply(tmp: Path, cfg: dict) -> None:
        if kind == "closed":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        else:
            server = socket.create_server(("127.0.0.1", 0)) if kind == "silent" else NotVllm()
            PORTS.append(server)
            port = (server.getsockname() if kind == "silent" else server.server_address)[1]
        cfg["model"].pop("teacher")
        cfg["model"].update(teacher_server=f"http://127.0.0.1:{port}", teacher_timeout=1)
    return apply


STUDENT: list[str] = []   # the tiny student dir, for argv builders (set by the fixture)
TEACHER: list[str] = []   # the tiny teacher dir

CASES = {
    # the file and the command line
    "config-missing": Case(("config file", "nope.yaml", "does not exist"), argv=lambda tmp: ["distill", "nope.yaml"]),
    "config-is-a-directory": Case(("config file", "is a directory", "give the YAML file in it"),
                                  argv=lambda tmp: ["distill", str(tmp)]),
    "yaml-syntax": Case(("raw.yaml", "line 3, column 5", "fix the YAML"),
                        argv=raw_config("max_steps: 3\nmodel: {teacher: x\ndata: 1\n")),
    "yaml-not-mapping": Case(("top level must be a mapping", "found list"), argv=raw_config("- a\n- b\n")),
    "yaml-duplicate-key": Case(("duplicate key 'max_steps'", "line 3"),
                               argv=raw_config("max_steps: 3\nseed: 1\nmax_steps: 4\n")),
    "set-without-value": Case(("--set 'max_steps'", "expected KEY=VALUE"), sets=["max_steps"]),
    "set-bad-yaml": Case(("--set 'method.beta=[0.5'", "not valid YAML"), sets=["method.beta=[0.5"]),
    "set-into-a-value": Case(("'max_steps' is not a section",), sets=["max_steps.x=1"]),
    # top-level TrainingArguments keys and values
    "unknown-key": Case(("'learnig_rate'", "did you mean 'learning_rate'"), edit(learnig_rate=1e-3)),
    "wrong-type": Case(("max_steps='ten' has type str",), edit(max_steps="ten")),
    "negative-lr": Case(("learning_rate=-0.0001 must be >= 0",), edit(learning_rate=-1e-4)),
    "batch-size-0": Case(("per_device_train_batch_size=0 must be >= 1",), edit(per_device_train_batch_size=0)),
    "grad-accum-0": Case(("gradient_accumulation_steps=0 must be >= 1",), edit(gradient_accumulation_steps=0)),
    "max-steps-0": Case(("max_steps=0",), edit(max_steps=0)),
    "scheduler-typo": Case(("lr_scheduler_type='cosin' is unknown", "did you mean 'cosine'"),
                           edit(lr_scheduler_type="cosin")),
    "save-strategy": Case(("save_strategy='sometimes' is unknown",), edit(save_strategy="sometimes")),
    "deepspeed-missing": Case(("deepspeed=", "zero9.json", "is not a file"), edit(deepspeed="zero9.json")),
    # model section
    "model-key-typo": Case(("'model.teachr'", "did you mean 'teacher'"), edit(**{"model.teachr": "x"})),
    "teacher-missing": Case(("model.teacher='/no/such/model' is not a model directory",),
                            edit(**{"model.teacher": "/no/such/model"})),
    "model-without-weights": Case(("model.student=", "has no weights"),
                                  broken_student(lambda d: (d / "model.safetensors").unlink())),
    "model-truncated": Case(("model.student=", "model.safetensors is truncated", "save the model again"),
                            broken_student(truncate)),
    "model-pickle-only": Case(("model.student=", "pytorch_model.bin (pickle)", "safetensors only"),
                              broken_student(lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"))),
    "vocab-smaller-than-tokenizer": Case(("model.student=", "token ids up to 511", "vocab_size=300"),
                                         broken_student(shrink_vocab)),
    "safetensors-header-list": Case(("model.student=", "model.safetensors is not a safetensors file",
                                     "a JSON list"), broken_student(safetensors_header([1, 2]))),
    "safetensors-offsets-not-integers": Case(("model.student=", "damaged header", "tensor 'w'", "['0', 4]"),
                                             broken_student(safetensors_header(
                                                 {"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", 4]}}))),
    "config-json-not-json": Case(("model.student=", "config.json is not valid JSON", "line 1"),
                                 broken_student(lambda d: (d / "config.json").write_text("{vocab_size: 5"))),
    "tokenizer-json-truncated": Case(("model.student=", "tokenizer.json is not valid JSON", "cut short"),
                                     broken_student(cut_in_half("tokenizer.json"))),
    "no-tokenizer": Case(("model.student=", "has no tokenizer files"), broken_student(drop_tokenizer)),
    "lora-adapter-dir": Case(("model.student=", "holds a LoRA adapter", "merge_and_unload"),
                             broken_student(lambda d: ((d / "config.json").unlink(),
                                                       (d / "adapter_config.json").write_text("{}")))),
    "dtype": Case(("model.student_dtype='bf16' is unknown",), edit(**{"model.student_dtype": "bf16"})),
    "teacher-mode": Case(("model.teacher_mode='remote'",), edit(**{"model.teacher_mode": "remote"})),
    "offline-without-data": Case(("teacher_mode=offline needs data.path",), edit(**{"model.teacher_mode": "offline"})),
    "lora-key-typo": Case(("'model.lora.rr'", "did you mean 'r'"), edit(**{"model.lora": {"rr": 8}})),
    "offline-on-policy": Case(("method.lmbda > 0", "teacher_mode=live"),
                              edit(**{"model.teacher_mode": "offline", "data.path": ".", "method.lmbda": 0.5})),
    "fused-on-full-logits": Case(("method.fused=on", "chunk_size=0", "fused: auto or off"),
                                 edit(**{"method.fused": "on", "method.chunk_size": 0})),
    "fused-on-with-ce": Case(("method.fused=on", "ce_weight=0.5"),
                             edit(**{"method.fused": "on", "method.ce_weight": 0.5})),
    "fused-on-offline": Case(("method.fused=on", "offline", "sparse top-k"),
                             edit(**{"model.teacher_mode": "offline", "data.path": ".", "method.fused": "on"})),
    "fused-on-taid-full-logits": Case(("method.fused=on", "chunk_size=0"),
                                      edit(method={"name": "taid", "fused": "on", "chunk_size": 0}), light=False),
    "chunk-size-negative": Case(("method.chunk_size=-1 must be >= 0",), edit(**{"method.chunk_size": -1})),
    "vllm-options-without-vllm": Case(("method.vllm=", "method.sampler='hf'", "set method.sampler=vllm"),
                                      edit(**{"method.vllm": {"enforce_eager": False}})),
    "vllm-option-typo": Case(("'method.vllm.enforce_eagre'", "enforce_eager"),
                             edit(**{"method.sampler": "vllm", "method.vllm": {"enforce_eagre": False}})),
    "vllm-option-type": Case(("method.vllm.gpu_memory_utilization='most' must be a positive float",),
                             edit(**{"method.sampler": "vllm", "method.vllm": {"gpu_memory_utilization": "most"}})),
    "student-layers": Case(("model.student_layers='every_third'",), edit(**{"model.student_layers": "every_third"})),
    # data section
    "recipe-typo": Case(("data.recipe='arithmetc'", "Did you mean 'arithmetic'"), edit(**{"data.recipe": "arithmetc"})),
    "num-train-type": Case(("data.num_train='many' has type str",), edit(**{"data.num_train": "many"})),
    "num-train-0": Case(("data.num_train=0 must be >= 1",), edit(**{"data.num_train": 0})),
    "data-file-empty": Case(("data file", "data.jsonl' is empty"), edit(**{"data.path": file_text("data.jsonl", "")}),
                            light=False),
    "data-path-missing": Case(("data.path='/no/data.jsonl' does not exist",), edit(**{"data.path": "/no/data.jsonl"})),
    # method section
    "method-not-mapping": Case(("method must be a mapping",), edit(method="token_kd")),
    "method-name-typo": Case(("method.name='tokn_kd'", "Did you mean 'token_kd'"), edit(**{"method.name": "tokn_kd"})),
    "method-param-typo": Case(("'method.betta'", "did you mean 'beta'"), edit(**{"method.betta": 0.1})),
    "beta-range": Case(("method.beta=1.5 is outside [0, 1]",), edit(**{"method.beta": 1.5})),
    "temperature-0": Case(("method.temperature=0 must be > 0",), edit(**{"method.temperature": 0})),
    "kind-unknown": Case(("method.kind='kl' is unknown",), edit(**{"method.kind": "kl"})),
    # several teachers (model.teachers, data.mixture, method.teacher_mix)
    "teachers-unknown-name": Case(("data.mixture[1].teacher='logc' is not in model.teachers", "did you mean 'logic'"),
                                  teachers(routes=("math", "logc"))),
    "teachers-unused": Case(("model.teachers.logic is used by no source of data.mixture",),
                            teachers(routes=("math", "math"))),
    "teachers-mean-tokenizers": Case(("teacher_mix=mean needs one tokenizer", "model.teachers.logic"),
                                     teachers(mix="mean", second="other-tokenizer")),
    "teachers-served-seq-kd": Case(("model.teachers.logic (served)", "method.seq_kd"),
                                   teachers(second={"teacher_server": "http://127.0.0.1:9"}, method={"seq_kd": True})),
    "teachers-weights-zero": Case(("weights", "must be >= 0 with a positive sum"), teachers(weights=(0.0, 0.0))),
    "teachers-weight-negative": Case(("weights", "must be >= 0 with a positive sum"), teachers(weights=(-1.0, 2.0))),
    "teachers-and-teacher": Case(("model.teacher / model.teacher_server and model.teachers are both set",),
                                 teachers(keep_teacher=True)),
    "teachers-generated-unknown": Case(("holds rows of teacher 'chat', which is not in model.teachers",),
                                       lambda tmp, cfg: several_teacher_dir(tmp, cfg, ("math", "chat"))),
    "teachers-generated-single": Case(("holds rows of teachers math, logic; name them in model.teachers",),
                                      lambda tmp, cfg: several_teacher_dir(tmp, cfg, ("math", "logic"), single=True)),
    "generate-mixture-no-teacher": Case(("mixture[0].teacher=None", "each source names its teacher"),
                                        argv=generate_argv(mixture=[{"recipe": "arithmetic", "num_prompts": 2}]),
                                        light=False),
    "teachers-own-lmbda": Case(("model.teachers.logic.method.lmbda is not per teacher",
                                "set lmbda in the shared method section"), teachers(own={"lmbda": 0.5})),
    "teachers-own-sampler": Case(("model.teachers.logic.method.max_new_tokens is not per teacher",),
                                 teachers(own={"kind": "rkl", "max_new_tokens": 8})),
    "teachers-own-method-mean": Case(("model.teachers.logic.method with teacher_mix=mean", "shared method section"),
                                     teachers(mix="mean", own={"kind": "rkl"})),
    # output_dir and resume
    "output-under-a-file": Case(("output_dir=", "is a regular file"),
                                edit(output_dir=lambda tmp: file_text("notes.txt", "x")(tmp) + "/run")),
    "output-is-a-file": Case(("output_dir=", "is a file, not a directory"),
                             edit(output_dir=file_text("notes.txt", "x"))),
    "output-unwritable": Case(("output_dir='/proc/llmkd-test/run'", "not writable"),
                              edit(output_dir="/proc/llmkd-test/run")),
    "output-not-empty": Case(("is not empty", "--set overwrite_output_dir=true"),
                             lambda tmp, cfg: (Path(cfg["output_dir"]).mkdir(), (Path(cfg["output_dir"]) / "x").write_text("x"))),
    "output-has-a-run": Case(("is not empty", "--set resume_from_checkpoint=true"), with_checkpoint(complete=True)),
    "resume-without-checkpoint": Case(("resume_from_checkpoint=true but output_dir=", "no complete checkpoint"),
                                      sets=["resume_from_checkpoint=true"]),
    "resume-incomplete-checkpoint": Case(("no complete checkpoint", "skipped incomplete", "checkpoint-3 (no trainer_state.json)"),
                                         with_checkpoint(complete=False), sets=["resume_from_checkpoint=true"]),
    "resume-path-missing": Case(("resume_from_checkpoint='/no/ckpt' is not a checkpoint directory",),
                                sets=["resume_from_checkpoint=/no/ckpt"]),
    "resume-and-overwrite": Case(("contradict",), with_checkpoint(complete=True),
                                 sets=["resume_from_checkpoint=true", "overwrite_output_dir=true"]),
    # output_dir never an input; overwrite replaces only llmkd's files; one run at a time
    "output-is-the-teacher": Case(("output_dir=", "is model.teacher=", "outside every model and data"),
                                  copied("teacher", lambda tmp, d: d), sets=["overwrite_output_dir=true"]),
    "output-holds-the-student": Case(("holds model.student=",), copied("student", lambda tmp, d: tmp)),
    "output-inside-the-student": Case(("lies inside model.student=",), copied("student", lambda tmp, d: d / "run")),
    "overwrite-foreign-files": Case(("overwrite_output_dir=true", "holds files no llmkd run wrote (README.md)"),
                                    lambda tmp, cfg: (Path(cfg["output_dir"]).mkdir(),
                                                      (Path(cfg["output_dir"]) / "README.md").write_text("x")),
                                    sets=["overwrite_output_dir=true"]),
    "output-dir-in-use": Case(("output_dir=", "in use by another llmkd run (pid 4242)"),
                              another_run_holds_the_lock, light=False),
    # a resume while that run has not saved its first checkpoint: the run is named, not "no checkpoint"
    "resume-dir-in-use": Case(("output_dir=", "in use by another llmkd run (pid 4242)"),
                              another_run_holds_the_lock, sets=["resume_from_checkpoint=true"]),
    # non-finite numbers, seeds, LoRA, student layers, DeepSpeed: before any weights
    "lr-inf": Case(("learning_rate=inf is not a finite number",), edit(learning_rate=float("inf"))),
    "lr-nan-set": Case(("learning_rate=nan is not a finite number",), sets=["learning_rate=nan"]),
    "method-param-inf": Case(("method.temperature=inf is not a finite number",), edit(**{"method.temperature": float("inf")})),
    "seed-negative": Case(("seed=-1 is outside [0, 2**32 - 1]",), edit(seed=-1)),
    "yaml-integer-key": Case(("unknown key '1'",), argv=raw_config("1: 2\n")),
    "yaml-integer-key-in-section": Case(("unknown key 'model.7'",), argv=raw_config("model: {7: x}\n")),
    "lora-r-string": Case(("model.lora.r='eight' must be a whole number",), edit(**{"model.lora": {"r": "eight"}})),
    "lora-target-typo": Case(("model.lora.target_modules has ['q_prj']", "q_proj"),
                             edit(**{"model.lora": {"r": 4, "target_modules": ["q_prj"]}}), light=False),
    "student-layers-beyond-teacher": Case(("model.student_layers=[0, 5]", "[5] are not layers of the teacher (it has 2"),
                                          edit(**{"model.student": None, "model.student_layers": [0, 5]})),
    "student-layer-count-beyond-teacher": Case(("model.student_layers=3 but the teacher has 2 layers",),
                                               edit(**{"model.student": None, "model.student_layers": 3})),
    "deepspeed-without-launcher": Case(("deepspeed=", "needs a distributed launcher", "launch/torchrun.sh"),
                                       edit(deepspeed=file_text("ds.json", "{}"))),
    # damaged or foreign checkpoints
    "resume-model-dir": Case(("is a model directory, not a training checkpoint", "set model.student"),
                             lambda tmp, cfg: cfg.update(resume_from_checkpoint=cfg["model"]["student"])),
    "resume-garbage-trainer-state": Case(("checkpoint-3/trainer_state.json is unreadable (not JSON)",),
                                         checkpoint_with("trainer_state.json", "garbage{")),
    "resume-trainer-state-not-a-state": Case(("trainer_state.json is not a Trainer state",),
                                             checkpoint_with("trainer_state.json", "[1, 2]")),
    "resume-garbage-optimizer": Case(("checkpoint-3/optimizer.pt is damaged",), checkpoint_with("optimizer.pt", b"\0" * 64)),
    "resume-changed-config": Case(("changed training config", "learning_rate: 0.5 -> 5e-05", "allow_config_change=true"),
                                  checkpoint_with("training_args.json", '{"learning_rate": 0.5}'), light=False),
    # found while loading data and tokenizers: still before any weights
    "num-train-exceeds-data": Case(("has 10 rows but data.num_train=16", "data.allow_fewer=true"),
                                   edit(**{"data.path": local_rows(10), "data.num_train": 16}), light=False),
    "shard-damaged": Case(("shard-00000.parquet' is damaged", "CRC", "rerun `llmkd generate`"),
                          generated(zero_bytes), light=False),
    "shard-truncated": Case(("shard-00000.parquet' is damaged", "magic bytes"), light=False,
                            setup=generated(lambda tmp: truncate(tmp / "gen", "shard-00000.parquet"))),
    "shards-of-different-k": Case(("different top-k", "k=20 in shard-00000.parquet; k=5 in shard-00001.parquet"),
                                  generated(lambda tmp: (tmp / "other" / "shard-00000.parquet").rename(
                                      tmp / "gen" / "shard-00001.parquet")), light=False),
    "manifest-deleted": Case(("manifest.json' not found", "holds generated shards", "rerun `llmkd generate`"),
                             generated(lambda tmp: (tmp / "gen" / "manifest.json").unlink())),
    "data-without-column": Case(("lack ['answer']",),
                                edit(**{"data.path": local_rows(20, ("question", "solution"))}), light=False),
    "different-tokenizers": Case(("tokenizer", "cross_tokenizer"), other_tokenizer_student, light=False),
    # llmkd eval
    "eval-vocab-smaller-than-tokenizer": Case(("model=", "vocab_size=300"), argv=eval_argv(eval_model(shrink_vocab))),
    "eval-truncated-weights": Case(("model=", "is truncated"), argv=eval_argv(eval_model(truncate))),
    "eval-yaml-syntax": Case(("eval config", "line 2, column"), argv=lambda tmp: ["eval", file_text("e.yaml", "models: [a\n")(tmp)]),
    "eval-teacher-other-tokenizer": Case(("teacher=", "/other'", "(recipe 'arithmetic')", "different tokenizer",
                                          "from model 'student'"), light=False,
                                         argv=lambda tmp: other_tokenizer_student(tmp, {"model": {}})
                                         or eval_argv(lambda t: STUDENT[0], "--teacher", str(tmp / "other"))(tmp)),
    "eval-speculative-draft-missing": Case(("speculative='/no/draft'", "does not exist"),
                                           argv=eval_argv(lambda t: STUDENT[0], "--speculative", "/no/draft")),
    # llmkd quickstart: every stage's config before the first stage (generation) runs
    "quickstart-distill-typo": Case(("'method.betta'", "did you mean 'beta'", "quickstart config's distill section"),
                                    argv=lambda tmp: ["quickstart", "--out", str(tmp / "qs"),
                                                      "--set", "distill.method.betta=0.1"]),
    "quickstart-generate-typo": Case(("'generate.top_k'", "did you mean 'topk'"),
                                     argv=lambda tmp: ["quickstart", "--out", str(tmp / "qs"),
                                                       "--set", "generate.top_k=5"]),
    # llmkd generate / serve-teacher
    "generate-topk-above-vocab": Case(("topk=100000 is more than the teacher's vocabulary (512 tokens",),
                                      argv=generate_argv(topk=100000), light=False),
    "generate-unknown-engine-option": Case(("'engine.batch_sise'", "did you mean 'batch_size'"),
                                           argv=generate_argv(engine={"batch_sise": 4}), light=False),
    # a served teacher: probed before any weights load, one short try (no retries)
    "served-nothing-listens": Case(("model.teacher_server=http://127.0.0.1:", "nothing listens", "connection refused",
                                    "llmkd serve-teacher", "set model.teacher_wait=SECONDS"),
                                   served_by("closed"), light=False),
    "served-silent": Case(("model.teacher_server=", "accepts connections but did not answer GET /v1/models within 1 s",
                           "model.teacher_wait"), served_by("silent"), light=False),
    "served-not-vllm": Case(("model.teacher_server=", "answered text/html '<html>hello</html>'",
                             "not a vLLM OpenAI server", "check the host and port"), served_by("not-vllm"), light=False),
    "serve-teacher-port-in-use": Case(("cannot listen on 127.0.0.1:", "--port"), argv=serve_on_a_busy_port,
                                      light=False),
    "eval-out-under-a-file": Case(("out=", "is a regular file"),
                                  argv=lambda tmp: eval_argv(lambda t: STUDENT[0])(tmp)[:-2]
                                  + ["--out", file_text("notes.txt", "x")(tmp) + "/eval"]),
}


def snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_one_line_exit_2_nothing_written(name, tiny_pair, tmp_path):
    case = CASES[name]
    STUDENT[:], TEACHER[:] = [tiny_pair[1]], [tiny_pair[0]]
    work = tmp_path / "work"
    work.mkdir()
    cfg = {"output_dir": str(work / "out"), "use_cpu": True, "max_steps": 1, "save_strategy": "no",
           "model": {"teacher": tiny_pair[0], "student": tiny_pair[1]},
           "data": {"recipe": "arithmetic", "num_train": 8, "num_eval": 4},
           "method": {"name": "token_kd", "kind": "jsd", "beta": 0.5}}
    case.setup(work, cfg)
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    argv = case.argv(work) if case.argv else ["distill", str(work / "cfg.yaml")]
    argv += [x for s in case.sets for x in ("--set", s)]
    before = snapshot(work)
    try:
        run_case(case, argv, work, tmp_path, before)
    finally:
        while HELD:
            os.close(HELD.pop())


def run_case(case: Case, argv: list[str], work: Path, tmp_path: Path, before: dict[str, float]) -> None:
    report = tmp_path / "imported.txt"
    try:
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(report), *argv], cwd=work, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        while PORTS:
            PORTS.pop().close()
    err = proc.stderr
    assert "Traceback" not in err and proc.returncode == 2, err
    errors = [line for line in err.splitlines() if line.startswith(f"llmkd {argv[0]}: error: ")]
    assert len(errors) == 1, err
    for part in case.expect:
        assert part in errors[0], (part, errors[0])
    assert snapshot(work) == before, "the failed run changed its directory"
    if case.light:   # nothing but our one line, and no model library imported
        assert err.strip() == errors[0], err
        assert report.read_text() == "", report.read_text()


def test_disk_full_while_generating_is_one_line_naming_the_dir(tiny_pair, tmp_path, monkeypatch, capsys):
    """A writer that fails like a full disk (pyarrow raises a bare OSError saying so)."""
    import llmkd.generation.writer as writer
    from llmkd.cli import main

    def full(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1")          # a partial temp file, which must not stay
        raise OSError("[Errno 28] Error writing bytes to file. Detail: No space left on device")

    monkeypatch.setattr(writer.pq, "write_table", full)
    STUDENT[:], TEACHER[:] = [tiny_pair[1]], [tiny_pair[0]]
    argv = generate_argv()(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "llmkd generate: error: disk full while writing shard" in err and f"in {tmp_path / 'gen'} (" in err, err
    assert not [p for p in (tmp_path / "gen").rglob("*") if p.is_file()], "the partial shard stayed"


def test_the_shipped_quickstart_config_passes_the_early_checks(tmp_path):
    from llmkd.cli.quickstart import check_stages, load_quickstart_config

    gen = check_stages(load_quickstart_config(None, []), tmp_path / "qs")
    assert gen.model == "embedded" and gen.output_dir == str(tmp_path / "qs" / "generate")
    assert not (tmp_path / "qs").exists()
