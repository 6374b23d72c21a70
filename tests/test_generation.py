"""Teacher generation: backends (vLLM vs transformers log-probs), sharded writer, resume after a
real SIGKILL, config guards, rationale parsing. Tiny models; one vLLM engine for the module."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from llmkd.generation import run as run_mod  # noqa: E402
from llmkd.generation.backends import make_backend  # noqa: E402
from llmkd.generation.spec import Completion, SamplingSpec  # noqa: E402
from llmkd.generation.rationales import (  # noqa: E402
    YieldCounter, fewshot_messages, fewshot_text, parse_rationale)
from llmkd.generation.run import GenerationConfig, load_config, run_generation  # noqa: E402
from llmkd.generation.writer import ShardWriter, load_generated, read_manifest  # noqa: E402
from llmkd.models.tiny import save_tiny_pair  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 512   # the tiny models' max_position_embeddings


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_tiny_pair(tmp_path_factory.mktemp("tiny"))[0]


@pytest.fixture(scope="module")
def tokenizer(teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher)


@pytest.fixture(scope="module")
def hf_model(teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vllm_backend(teacher, tmp_path_factory):
    pytest.importorskip("vllm")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm_cache")))
    backend = make_backend("vllm", str(teacher), max_model_len=MAX_LEN)
    yield backend
    backend.close()


@pytest.fixture
def shared_vllm(monkeypatch, vllm_backend):
    """Make run_generation reuse the module's engine instead of starting another one."""
    class Shared:
        def generate(self, *a, **k):
            return vllm_backend.generate(*a, **k)

        def close(self):
            pass

    monkeypatch.setattr("llmkd.generation.backends.make_backend", lambda kind, *a, **k: Shared())


def _prompts(tokenizer, questions):
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                    add_generation_prompt=True),
                      add_special_tokens=False).input_ids for q in questions]


QUESTIONS = ["What is 3 + 4?", "Ann has 5 apples and gets 3 more. How many apples does Ann have now?",
             "What is 12 * 7?"]


def _check_against_forward(model, prompts, outs, k):
    """Every completion's top-k equals the model's own log_softmax on the same tokens."""
    for p, comps in zip(prompts, outs):
        for c in comps:
            assert isinstance(c, Completion) and c.finish_reason in ("stop", "length")
            assert len(c.topk_ids) == len(c.topk_logprobs) == len(c.token_ids) > 0
            assert all(len(row) == k for row in c.topk_ids + c.topk_logprobs)
            got = torch.tensor(c.topk_logprobs)
            assert (got[:, :-1] >= got[:, 1:]).all(), "top-k must be sorted best first"
            with torch.no_grad():
                logp = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1:-1].log_softmax(-1)
            ref = logp.gather(-1, torch.tensor(c.topk_ids))
            assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
            assert torch.allclose(logp.topk(k).values, got, atol=1e-4)


def test_vllm_topk_logprobs_match_transformers(vllm_backend, tokenizer, hf_model):
    prompts = _prompts(tokenizer, QUESTIONS)
    spec = SamplingSpec(n=2, temperature=1.0, max_new_tokens=12, logprobs=5, seed=3)
    outs = vllm_backend.generate(prompts, spec, progress=False)
    assert [len(o) for o in outs] == [2, 2, 2]
    _check_against_forward(hf_model, prompts, outs, k=5)
    # Seeds are per prompt content, not batch position: the same prompt alone samples the same.
    alone = vllm_backend.generate(prompts[1:2], spec, progress=False)
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in outs[1]]


def test_hf_backend_same_interface(teacher, tokenizer, hf_model):
    backend = make_backend("hf", str(teacher), max_model_len=MAX_LEN, batch_size=2)
    prompts = _prompts(tokenizer, QUESTIONS)
    greedy = backend.generate(prompts, SamplingSpec(temperature=0.0, max_new_tokens=10, logprobs=4), progress=False)
    _check_against_forward(hf_model, prompts, greedy, k=4)
    for comps in greedy:   # greedy: the generated token is the top-1
        assert [row[0] for row in comps[0].topk_ids] == comps[0].token_ids
        assert comps[0].text == tokenizer.decode(comps[0].token_ids, skip_special_tokens=True)
    sampled = backend.generate(prompts, SamplingSpec(n=3, temperature=1.0, max_new_tokens=8, seed=1),
                               progress=False)
    assert [len(o) for o in sampled] == [3, 3, 3] and sampled[0][0].topk_ids is None
    backend.close()


def test_make_backend_errors(tmp_path):
    with pytest.raises(ValueError, match="backend 'tgi' is unknown"):
        make_backend("tgi", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope"):
        make_backend("hf", str(tmp_path / "nope"))


SCHEMA = pa.schema([("id", pa.string()), ("sample", pa.int32()), ("x", pa.list_(pa.float32()))])


def _rows(ids, sample=0):
    return [{"id": i, "sample": sample, "x": [0.5]} for i in ids]


def test_writer_atomic_shards_and_resume(tmp_path):
    out = tmp_path / "gen"
    w = ShardWriter(out, {"a": 1}, SCHEMA, shard_size=3)
    w.add(_rows(["p0", "p1", "p2", "p3"]), dropped=[("p9", 0)])
    w.add(_rows(["p4", "p5", "p6"]))             # 7 rows: 2 shards on disk, 1 row buffered
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.parquet", "shard-00001.parquet"]
    # A run killed mid-write leaves a temp file and the buffered row is lost: both are harmless.
    (out / "shard-00002.parquet.tmp-12345").write_bytes(b"PAR1 half a file")
    del w
    w = ShardWriter(out, {"a": 1}, SCHEMA, shard_size=3)
    assert not list(out.glob("*.tmp-*"))
    assert w.done_keys() == {(f"p{i}", 0) for i in range(6)} | {("p9", 0)}
    w.add(_rows(["p6"]), dropped=[("p8", 0)])
    w.close(note="done")
    m = read_manifest(out)
    assert [s["rows"] for s in m["shards"]] == [3, 3, 1] and m["rows"] == 7 and m["dropped"] == 2
    assert m["metadata"] == {"note": "done"}
    ds = load_generated(out)
    assert sorted(ds["id"]) == [f"p{i}" for i in range(7)]
    assert ds.features["x"].feature.dtype == "float32"


def test_writer_never_mixes_configs(tmp_path):
    ShardWriter(tmp_path / "gen", {"temperature": 0.0, "n": 1}, SCHEMA).add(_rows(["a"]) * 300)
    with pytest.raises(ValueError, match="different config .*temperature: 0.0 there, 0.7 here\\)"):
        ShardWriter(tmp_path / "gen", {"temperature": 0.7, "n": 1}, SCHEMA)
    # a second worker of another config is refused too, even if it started before the shards
    late = ShardWriter(tmp_path / "late", {"temperature": 0.7}, SCHEMA, worker=1, workers=2)
    first = ShardWriter(tmp_path / "late", {"temperature": 0.0}, SCHEMA, worker=0, workers=2)
    first.add(_rows(["a"]))
    first.close()
    late.add(_rows(["b"]))
    with pytest.raises(ValueError, match="temperature: 0.0 there, 0.7 here"):
        late.flush()
    assert not list((tmp_path / "late").glob("*.tmp-*"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        ShardWriter(tmp_path / "other", {}, SCHEMA)


def test_writer_creates_nothing_until_it_writes_and_empty_dirs_never_block(tmp_path):
    out = tmp_path / "gen"
    w = ShardWriter(out, {"temperature": 0.0}, SCHEMA)
    assert not out.exists(), "a run that fails before its first shard must leave no directory"
    del w
    # an older llmkd wrote manifest.json before generating: a failed run left it with 0 shards
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"fingerprint": "0123", "config": {"temperature": 0.0},
                                                   "shards": [], "rows": 0, "metadata": {}}))
    w = ShardWriter(out, {"temperature": 0.7}, SCHEMA)    # the fixed rerun is not blocked
    w.add(_rows(["a"]))
    w.close(note="fixed")
    m = read_manifest(out)
    assert m["config"] == {"temperature": 0.7} and m["rows"] == 1 and m["metadata"] == {"note": "fixed"}
    with pytest.raises(FileExistsError, match="output_dir .* is a file"):
        ShardWriter(out / "manifest.json", {}, SCHEMA)
    with pytest.raises(FileExistsError, match="cannot be created"):
        ShardWriter(out / "manifest.json" / "sub", {}, SCHEMA)


def test_failed_generate_leaves_nothing_and_the_fixed_rerun_runs(tmp_path, teacher, monkeypatch):
    """issue: a failed `generate` left a 0-shard manifest that blocked the corrected rerun."""
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]
    cfg = GenerationConfig(model=str(teacher), recipe=_local_recipe(tmp_path, rows), num_prompts=3,
                           backend="hf", max_model_len=MAX_LEN, max_new_tokens=4, topk=0,
                           output_dir=str(tmp_path / "out"))

    def engine_fails(*a, **k):
        raise RuntimeError("engine failed to start")

    monkeypatch.setattr("llmkd.generation.backends.make_backend", engine_fails)
    with pytest.raises(RuntimeError, match="engine failed"):
        run_generation(cfg, progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    fixed = GenerationConfig(**{**cfg.__dict__, "max_new_tokens": 6})
    assert len(load_generated(run_generation(fixed, progress=False))) == 3


def test_two_workers_write_the_same_rows_as_one(tmp_path, teacher):
    """Two real `llmkd generate` processes split one run's prompts into one dir, concurrently."""
    rows = [{"question": f"What is {i} + {2 * i}?", "answer": str(3 * i)} for i in range(10)]
    base = [REPO / "configs/generate/quickstart.yaml", "--set", f"model={teacher}",
            "--set", f"recipe={_local_recipe(tmp_path, rows)}", "--set", "backend=hf",
            "--set", "num_prompts=10", "--set", "n=2", "--set", "max_new_tokens=8", "--set", "topk=3",
            "--set", f"max_model_len={MAX_LEN}", "--set", "shard_size=3", "--set", "batch_size=2",
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def cmd(out, *extra):
        return [sys.executable, "-m", "llmkd.cli.generate", *map(str, base),
                "--set", f"output_dir={out}", *extra]

    procs = [subprocess.Popen(cmd(tmp_path / "two", "--set", "workers=2", "--set", f"worker={w}"),
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in (0, 1)]
    overrides = [a for a in map(str, base[1:]) if a not in ("--set", "--no-progress")]
    run_generation(load_config(base[0], [*overrides, f"output_dir={tmp_path / 'one'}"]), progress=False)
    for w, proc in enumerate(procs):
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        assert f"worker {w}/2" in out
    names = sorted(p.name for p in (tmp_path / "two").glob("shard-*"))
    assert {n[:10] for n in names} == {"shard-w000", "shard-w001"}
    m = read_manifest(tmp_path / "two")
    assert len(m["shards"]) == len(names) and m["rows"] == 20 and m["metadata"]["totals"]["rows"] == 20
    assert sorted(m["metadata"]["workers"]) == ["0", "1"]
    assert sum(w["prompts"]["generated_this_run"] for w in m["metadata"]["workers"].values()) == 10

    def by_key(path):
        ds = load_generated(path)
        return {(r["id"], r["sample"]): r for r in ds}

    a, b = by_key(tmp_path / "one"), by_key(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) == 20
    for key, row in a.items():
        assert row["response_token_ids"] == b[key]["response_token_ids"]
        assert row["teacher_topk_ids"] == b[key]["teacher_topk_ids"]
        assert torch.allclose(torch.tensor(row["teacher_topk_logprobs"]),
                              torch.tensor(b[key]["teacher_topk_logprobs"]), atol=1e-4)
    # resume per worker: a rerun of worker 1 finds its prompts done and generates nothing
    run_generation(load_config(base[0], [*overrides, f"output_dir={tmp_path / 'two'}", "workers=2",
                                         "worker=1"]), progress=False)
    assert read_manifest(tmp_path / "two")["metadata"]["workers"]["1"]["prompts"]["generated_this_run"] == 0
    assert sorted(p.name for p in (tmp_path / "two").glob("shard-*")) == names


def _local_recipe(tmp_path, rows, **fields) -> str:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "toy", "source": "local", "path": str(data), "answer_kind": "numeric", **fields}
    path = tmp_path / "toy.yaml"
    path.write_text(json.dumps(spec))   # JSON is YAML
    return str(path)


def test_run_skips_overlong_prompts_and_guards_output_dir(tmp_path, teacher, shared_vllm):
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(5)]
    rows[2]["question"] = "How many apples " * 200    # far over max_model_len - max_new_tokens
    cfg = GenerationConfig(model=str(teacher), recipe=_local_recipe(tmp_path, rows), num_prompts=5,
                           max_model_len=MAX_LEN, max_new_tokens=8, topk=3, shard_size=2,
                           output_dir=str(tmp_path / "out"))
    out = run_generation(cfg, progress=False)
    ds = load_generated(out)
    assert len(ds) == 4 and not any(i.startswith("toy-2-") for i in ds["id"])
    meta = read_manifest(out)["metadata"]
    assert meta["prompts"]["skipped_too_long"] == 1 and meta["totals"]["rows"] == 4
    row = ds[0]
    assert len(row["teacher_topk_ids"]) == len(row["response_token_ids"]) == len(row["teacher_tail_mass"])
    tail = 1 - torch.tensor(row["teacher_topk_logprobs"]).exp().sum(-1)
    assert torch.allclose(tail.clamp(min=0), torch.tensor(row["teacher_tail_mass"]), atol=1e-5)
    # Same dir, different sampling: refused before any generation.
    other = GenerationConfig(**{**cfg.__dict__, "temperature": 0.7})
    with pytest.raises(ValueError, match="different config"):
        run_generation(other, progress=False)
    # Same config, more prompts: only the new ones are generated.
    more = GenerationConfig(**{**cfg.__dict__, "num_prompts": 3, "offset": 3})
    run_generation(more, progress=False)
    assert read_manifest(out)["metadata"]["prompts"]["generated_this_run"] == 0


def test_recipe_without_prompt_field_fails_before_the_engine(tmp_path, teacher, monkeypatch):
    def no_engine(*a, **k):
        raise AssertionError("the engine must not start for a bad recipe")

    monkeypatch.setattr("llmkd.generation.backends.make_backend", no_engine)
    recipe = _local_recipe(tmp_path, [{"q": "What is 1 + 1?", "answer": "2"}])
    cfg = GenerationConfig(model=str(teacher), recipe=recipe, num_prompts=1, max_model_len=MAX_LEN,
                           output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="question"):
        run_generation(cfg, progress=False)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'temperature'"):
        load_config(None, ["tempreature=0.5"])
    with pytest.raises(ValueError, match="mode='cot' is unknown"):
        load_config(None, ["mode=cot"])
    cfg = load_config(REPO / "configs/generate/rationale.yaml", ["n=2", "tensor_parallel_size=2"])
    assert cfg.n == 2 and cfg.mode == "rationale" and not cfg.keep_all
    assert cfg.tensor_parallel_size == 2 and cfg.prompts_per_batch == 16  # batch_size wins
    # layout and speed settings never change the fingerprint: workers can join a run
    base = load_config(REPO / "configs/generate/rationale.yaml").fingerprint_fields(Path("m"))
    assert cfg.fingerprint_fields(Path("m")) == {**base, "n": 2}
    with pytest.raises(ValueError, match="worker=2 must be in"):
        load_config(None, ["workers=2", "worker=2"])
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs backend=vllm"):
        load_config(None, ["backend=hf", "tensor_parallel_size=2"])
    with pytest.raises(ValueError, match="top-level tensor_parallel_size"):
        load_config(None, ["engine.tensor_parallel_size=2"])
    assert load_config(REPO / "configs/generate/quickstart.yaml").keep_all
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        run_mod.resolve_model(str(tmp_path))


FEWSHOT = [{"question": "Tom has 2 bags with 3 pens each. How many pens?",
            "rationale": "2 * 3 = 6.", "answer": "6"}]


def test_rationale_prompt_parse_and_filter():
    text = fewshot_text("What is 4 + 5?", FEWSHOT)
    assert text == ("Q: Tom has 2 bags with 3 pens each. How many pens?\nA: 2 * 3 = 6. So the answer "
                    "is 6.\n\nQ: What is 4 + 5?\nA:")
    msgs = fewshot_messages("What is 4 + 5?", FEWSHOT, "Be brief.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == "2 * 3 = 6. So the answer is 6."
    # The first marker counts: the model then invents another demonstration.
    completion = " 4 + 5 = 9. So the answer is 9.\n\nQ: What is 1 + 1?\nA: So the answer is 3."
    assert parse_rationale(completion, "numeric") == ("4 + 5 = 9.", "9")
    assert parse_rationale("4 + 5 makes 10", "numeric") == ("4 + 5 makes 10", "10")   # no marker
    with pytest.raises(ValueError, match="few-shot"):
        fewshot_text("q", [])
    counter = YieldCounter(keep_incorrect=False)
    assert counter.keep("a", "9", True) and not counter.keep("a", "10", False)
    assert not counter.keep("b", None, False)
    s = counter.summary()
    assert (s["completions"], s["parsed"], s["correct"], s["kept"]) == (3, 2, 1, 1)
    assert s["yield"] == pytest.approx(1 / 3) and s["prompts_with_a_correct_sample"] == 1


def test_sigkill_then_resume_gives_each_row_exactly_once(tmp_path, teacher):
    """Kill -9 a real `llmkd generate` process mid-run, rerun, and count rows per key."""
    rows = [{"question": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(120)]
    out = tmp_path / "out"
    args = ["--set", f"model={teacher}", "--set", f"recipe={_local_recipe(tmp_path, rows)}",
            "--set", "backend=hf", "--set", "num_prompts=120", "--set", "n=2",
            "--set", "temperature=1.0", "--set", "max_new_tokens=24", "--set", "topk=2",
            "--set", f"max_model_len={MAX_LEN}", "--set", "shard_size=4", "--set", "batch_size=2",
            "--set", f"output_dir={out}", "--no-progress"]
    cmd = [sys.executable, "-m", "llmkd.cli.generate", str(REPO / "configs/generate/quickstart.yaml"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while len(list(out.glob("shard-*.parquet"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no shards appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    partial = len(load_generated(out))
    assert 0 < partial < 240, "the kill must land mid-run"
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    ds = load_generated(out)
    counts = Counter(zip(ds["id"], ds["sample"]))
    assert len(counts) == 240 and set(counts.values()) == {1}
    assert len({i for i, _ in counts}) == 120
    meta = read_manifest(out)["metadata"]
    assert meta["prompts"]["generated_this_run"] < 120 and meta["totals"]["rows"] == 240


# -- damaged, mixed and orphaned shards (issue 16) -------------------------------------------
TOPK_SCHEMA = pa.schema([("id", pa.string()), ("sample", pa.int32()),
                         ("teacher_topk_ids", pa.list_(pa.list_(pa.int32()))),
                         ("teacher_topk_logprobs", pa.list_(pa.list_(pa.float32())))])


def _topk_dir(path: Path, k: int, ids: list[str], seed: int = 0) -> Path:
    """A generation dir whose log-probs are incompressible (zstd stores them raw, as in real
    shards): zeroed bytes there decode silently unless page checksums are checked."""
    gen = torch.Generator().manual_seed(seed)
    rows = [{"id": i, "sample": 0, "teacher_topk_ids": torch.randint(0, 500, (40, k), generator=gen).tolist(),
             "teacher_topk_logprobs": (-10 * torch.rand(40, k, generator=gen)).tolist()} for i in ids]
    w = ShardWriter(path, {"topk": k}, TOPK_SCHEMA, shard_size=len(ids))
    w.add(rows)
    w.close()
    return path


def _zero_middle(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(n)
    path.write_bytes(data)


def test_damaged_or_truncated_shard_is_one_error_naming_it(tmp_path):
    out = _topk_dir(tmp_path / "gen", 20, [f"p{i}" for i in range(64)])
    shard = out / "shard-00000.parquet"
    good = pq.read_table(shard)
    _zero_middle(shard)
    assert not pq.read_table(shard).equals(good)    # without checksums this reads, wrongly
    with pytest.raises(ValueError, match=r"shard .*shard-00000.parquet' is damaged \(.*CRC.*rerun `llmkd generate`"):
        load_generated(out)
    shard.write_bytes(shard.read_bytes()[:1000])      # a truncated copy
    with pytest.raises(ValueError, match=r"shard-00000.parquet' is damaged \(.*magic bytes"):
        load_generated(out)
    with pytest.raises(ValueError, match="shard-00000.parquet' is damaged"):   # resuming generate, too
        ShardWriter(out, {"topk": 20}, TOPK_SCHEMA)


def test_shards_without_checksums_still_load(tmp_path):
    out = _topk_dir(tmp_path / "gen", 5, ["a", "b"])
    shard = out / "shard-00000.parquet"
    table = pq.read_table(shard)          # rewrite it as an older llmkd did: no page checksums
    pq.write_table(table, shard, compression="zstd", write_page_checksum=False)
    assert sorted(load_generated(out)["id"]) == ["a", "b"]


def test_mixed_top_k_or_configs_are_refused_at_load(tmp_path):
    out = _topk_dir(tmp_path / "gen", 20, ["a", "b"])
    other = _topk_dir(tmp_path / "k5", 5, ["c"])
    (other / "shard-00000.parquet").rename(out / "shard-00001.parquet")    # copied in by hand
    with pytest.raises(ValueError, match=r"different top-k .*k=20 in shard-00000.parquet; "
                                         r"k=5 in shard-00001.parquet\)"):
        load_generated(out)
    (out / "shard-00001.parquet").unlink()
    w = ShardWriter(tmp_path / "t", {"topk": 20, "temperature": 0.7}, TOPK_SCHEMA)
    w.add([{"id": "c", "sample": 0, "teacher_topk_ids": [list(range(20))], "teacher_topk_logprobs": [[-1.0] * 20]}])
    w.close()
    (tmp_path / "t" / "shard-00000.parquet").rename(out / "shard-00001.parquet")
    with pytest.raises(ValueError, match=r"different configs .*shard-00000.parquet vs shard-00001.parquet: "
                                         r"temperature: '<unset>' there, 0.7 here"):
        load_generated(out)


def test_lost_manifest_says_so(tmp_path):
    out = _topk_dir(tmp_path / "gen", 5, ["a"])
    (out / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json' not found, but .* holds generated shards: "
                                                "rerun `llmkd generate`"):
        load_generated(out)
