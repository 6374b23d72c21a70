"""Served teacher targets on the wire: top-k log-probs (`/v1/completions`) vs final hidden states
(`/pooling`, vLLM's pooling runner), both started by `llmkd serve-teacher` on this machine
(127.0.0.1, free ports) for the same teacher and asked, side by side, for the same sequences.

Reports the response bytes per sequence token of each, the largest difference between the served
states and the teacher's own (transformers) final hidden states, and between the log-probs the
served states give through the head `serve-teacher` wrote and the teacher's own log_softmax;
plus the probability mass the top-k leaves out (what the sparse loss puts in its tail bucket).

    python benchmarks/served_hidden.py                    # the embedded SmolLM2-135M teacher
    python benchmarks/served_hidden.py --teacher DIR --k 50
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import child_env

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["What is 12 + 30? 12 + 30 = 42.", "Name three colours: red, green and blue.",
         "The capital of France is Paris, a city on the Seine.", "def add(a, b):\n    return a + b\n",
         "Water boils at 100 degrees Celsius at sea level.", "Calculate 7 * 8. Reply with just the number. 56",
         "A haiku: an old silent pond, a frog jumps into the pond, splash! silence again.",
         "Q: Is 17 a prime number? A: Yes, 17 has no divisors other than 1 and itself."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(teacher: str, tmp: Path, keys: dict[str, Any], name: str) -> tuple[str, subprocess.Popen]:
    url = f"http://127.0.0.1:{_free_port()}"
    (tmp / f"{name}.json").write_text(json.dumps({"model": {"teacher": teacher, "teacher_server": url, **keys},
                                                  "data": {"max_length": 256}}))
    log = open(tmp / f"{name}.log", "w")
    env = {**child_env(), "VLLM_CACHE_ROOT": str(tmp / "vllm_cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "llmkd.cli.serve", str(tmp / f"{name}.json")], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return url, proc


def _wait(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 900
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(2)


def _wire_bytes(client: Any, seqs: list[list[int]]) -> int:
    """Bytes of the server's response body to the client's own request for `seqs`."""
    path, payload = client.payload(seqs)
    req = urllib.request.Request(client.url + path, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return len(resp.read())


def measure(teacher: str, k: int, dtype: str, tmp: Path) -> dict[str, Any]:
    import torch

    from llmkd.generation.hidden import read_head
    from llmkd.models.embedded import resolve_model_name
    from llmkd.models.student import load_causal_lm
    from llmkd.teacher_server import ServedTeacher
    from llmkd.training.pipeline import load_tokenizer

    head_file = tmp / "teacher_head.safetensors"
    common = {"teacher_topk": k, "teacher_dtype": dtype}
    servers = {"topk": _start(teacher, tmp, common, "topk"),
               "hidden": _start(teacher, tmp, {**common, "teacher_targets": "hidden",
                                               "teacher_head": str(head_file)}, "hidden")}
    try:
        for name, (url, proc) in servers.items():
            _wait(url, proc, tmp / f"{name}.log")
        tok = load_tokenizer(resolve_model_name(teacher))
        seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
        tokens = sum(len(s) for s in seqs)
        clients = {name: ServedTeacher(url, k, targets=name, dtype=dtype) for name, (url, _) in servers.items()}
        wire = {name: _wire_bytes(c, seqs) / tokens for name, c in clients.items()}
        states = clients["hidden"]._hidden_rows(seqs, 600.0)
        topk = clients["topk"]._topk_rows(seqs, [list(range(1, len(s))) for s in seqs], 600.0)
        for c in clients.values():
            c.close()
        model = load_causal_lm(resolve_model_name(teacher), dtype=dtype).eval()
        head, _ = read_head(head_file, len(tok))
        state_err = logp_err = topk_err = 0.0
        tails = []
        for seq, got, rows in zip(seqs, states, topk):
            with torch.no_grad():
                out = model(torch.tensor([seq]), output_hidden_states=True)
                want = out.hidden_states[-1][0].float()
                ref = out.logits[0].double().log_softmax(-1)
                mine = head.logits(got.to(head.weight.dtype)).double().log_softmax(-1)
            state_err = max(state_err, float((got - want).abs().max()))
            logp_err = max(logp_err, float((mine - ref).abs().max()))
            tails += [1 - sum(torch.tensor(lp).double().exp().tolist()) for _, lp in rows]
            for j, (ids, lp) in enumerate(rows, start=1):     # position j: the distribution of token j
                topk_err = max(topk_err, float((torch.tensor(lp).double() - ref[j - 1, ids]).abs().max()))
        return {"teacher": teacher, "dtype": dtype, "k": k, "sequences": len(seqs), "tokens": tokens,
                "hidden_size": int(states[0].shape[-1]), "vocab": len(tok),
                "bytes_per_token": wire, "ratio_hidden_to_topk": wire["hidden"] / wire["topk"],
                "max_abs_state_diff": state_err, "max_abs_logprob_diff_full_vocab": logp_err,
                "max_abs_logprob_diff_topk_entries": topk_err,
                "topk_mean_tail_mass": sum(tails) / len(tails), "topk_max_tail_mass": max(tails)}
    finally:
        for _, proc in servers.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=120)


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="embedded")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "served_hidden.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.teacher, args.k, args.dtype, Path(tmp))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    w = result["bytes_per_token"]
    print(f"| served targets ({result['teacher']}, {result['dtype']}) | bytes/token on the wire | exact |\n"
          f"|---|---|---|\n"
          f"| top-{result['k']} log-probs (/v1/completions, JSON) | {w['topk']:.0f} | no: mean tail mass "
          f"{result['topk_mean_tail_mass']:.3f} (max {result['topk_max_tail_mass']:.3f}); max |d log p| "
          f"{result['max_abs_logprob_diff_topk_entries']:.1e} on its {result['k']} |\n"
          f"| hidden states (/pooling, base64, H={result['hidden_size']}) | {w['hidden']:.0f} | yes: full "
          f"vocabulary ({result['vocab']}), max |d log p| {result['max_abs_logprob_diff_full_vocab']:.1e} |")


if __name__ == "__main__":
    main()
