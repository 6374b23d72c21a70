"""The benchmark scripts' own logic on tiny models, in-process (their --quick CLI runs spawn one
interpreter per variant, ~1 minute each: too slow for the suite). What is checked here is what
the published numbers rest on: llmkd and TRL's GKD see the same batch and agree on the step-1
loss, the hand-written floor computes llmkd's loss, and the cache encodings decode as stated."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cache_size  # noqa: E402
import loss_memory  # noqa: E402
import step_floor  # noqa: E402
import step_vs_trl  # noqa: E402


@pytest.fixture(scope="module")
def short_rows(tiny_pair: tuple[str, str]) -> list[dict]:
    return step_vs_trl.prepare_rows(tiny_pair[0], step_vs_trl.QUICK_REGIMES["short"])


def test_long_rows_have_the_requested_response_length(tiny_pair: tuple[str, str]) -> None:
    regime = step_vs_trl.QUICK_REGIMES["long"]
    rows = step_vs_trl.prepare_rows(tiny_pair[0], regime)
    assert len(rows) == regime.rows
    assert {len(r["response_ids"]) for r in rows} == {regime.response_tokens}


def test_llmkd_and_trl_gkd_agree_on_the_first_step(tiny_pair: tuple[str, str], short_rows: list[dict],
                                                   tmp_path: Path) -> None:
    regime = step_vs_trl.QUICK_REGIMES["short"]
    losses = {}
    for variant in ("llmkd_off", "trl_gkd"):
        record: dict[str, list] = {"loss": [], "loss_tokens": [], "padded_tokens": []}
        trainer = step_vs_trl.build_trainer(variant, tiny_pair[0], short_rows, regime, 1,
                                            str(tmp_path / variant), record)
        trainer.train()
        losses[variant] = record
    ours, theirs = losses["llmkd_off"], losses["trl_gkd"]
    assert ours["padded_tokens"] == theirs["padded_tokens"] and ours["loss_tokens"] == theirs["loss_tokens"]
    assert ours["loss"][0] == pytest.approx(theirs["loss"][0], rel=1e-5)


def test_floor_computes_llmkds_loss_on_the_same_batch(tiny_pair: tuple[str, str], short_rows: list[dict],
                                                       tmp_path: Path) -> None:
    regime = step_vs_trl.QUICK_REGIMES["short"]
    rows = step_floor.length_grouped(short_rows, regime.batch)[: regime.batch]
    trainer = step_floor.build_llmkd(tiny_pair[0], rows, regime, 1, "jsd", str(tmp_path))
    seen = []
    loss_fn = trainer.method.loss

    def record(*a, **k):  # noqa: ANN002, ANN003, ANN202
        out = loss_fn(*a, **k)
        seen.append(float(out[0].detach()))
        return out

    trainer.method.loss = record
    trainer.train()
    teacher, student, tok = step_vs_trl.load_pair(tiny_pair[0])
    batches = step_floor.batches_for(rows, regime.batch, tok.pad_token_id)
    floor = step_floor.floor_loop(teacher, student, batches, "jsd", 1e-5, lambda phases: None)
    assert floor[0] == pytest.approx(seen[0], rel=1e-5)


def test_loss_floor_does_the_four_matmuls_chunk_by_chunk() -> None:
    torch.manual_seed(0)
    h_s, h_t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    w_s, w_t = torch.randn(32, 8), torch.randn(32, 8)
    grad_h, grad_w = loss_memory.matmul_floor(h_s, w_s, h_t, w_t, chunk_size=3)
    logits = h_s.reshape(-1, 8) @ w_s.T
    torch.testing.assert_close(grad_h, logits @ w_s)
    torch.testing.assert_close(grad_w, logits.T @ h_s.reshape(-1, 8))


def test_cache_encodings_decode_as_stated(tmp_path: Path) -> None:
    torch.manual_seed(0)
    t_logp = (3 * torch.randn(40, 300)).log_softmax(-1)
    s_logits = torch.randn(40, 300)
    lps, ids = t_logp.topk(20, -1)
    found = {}
    for name, enc in cache_size.encodings(vocab=300).items():
        size, decoded = cache_size.encode_decode(ids, lps, enc, tmp_path / "x.parquet")
        found[name] = (size, cache_size.fidelity(t_logp, s_logits, ids, decoded, chunk=16))
    exact = found["shard: int32 ids, float32 log-probs, tail"][1]
    assert exact["kl_bins"] < 1e-10 and exact["loss_err_vs_exact_bins"] < 1e-6
    half = found["float16 log-probs, bss, no tail"][1]
    assert 0 < half["kl_bins"] < 1e-4
    assert 0 < exact["grad_cos_vs_dense"] < 1
    # the whole vocabulary kept: nothing is truncated
    assert cache_size.truncation_kl(t_logp, 300)["kl_trunc"] < 1e-5


def test_methods_benchmark_continues_rows_and_merges(tmp_path: Path) -> None:
    """benchmarks/methods.py --tiny: a warm-start row trains from the forward-KL student, and
    --merge adds a row while keeping the earlier ones (table in the ROWS order)."""
    import json
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "methods.py"
    work = tmp_path / "m"
    base = [sys.executable, str(script), "--tiny", "--steps", "2", "--work", str(work)]
    for extra in (["--rows", "fkl,fkl_then_distillspec"], ["--rows", "sft", "--merge"]):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((work / "methods.json").read_text())
    assert [r["row"] for r in result["rows"]] == ["before", "sft", "fkl", "fkl_then_distillspec"]
    warm = result["rows"][-1]
    assert warm["from"] == "fkl" and warm["method"]["name"] == "distillspec"
    assert result["timings_s"]["earlier_runs_s"] > 0
    assert all(r["identical_outputs"] == r["prompts"] for r in result["rows"])


def test_teacher_hacking_tiny_writes_proxy_and_golden_curves(tmp_path: Path) -> None:
    import argparse
    import json

    import teacher_hacking

    args = argparse.Namespace(tiny=True, steps=4, eval_steps=2, rows="offline,online_teacher", train_prompts=8,
                              eval_prompts=4, batch=4, lr=3e-3, max_new_tokens=8, teacher_layers=2,
                              teacher_steps=2, teacher_prompts=8, student_layers=1, seed=0, work=str(tmp_path))
    teacher_hacking.run(args)
    results = json.loads((tmp_path / "teacher_hacking.json").read_text())
    assert set(results["rows"]) == {"offline", "online_teacher"}
    for row in results["rows"].values():
        assert [p["step"] for p in row["curve"]] == [2, 4]
        assert all(p["proxy_kl"] > 0 and p["golden_oracle_kl"] > 0 for p in row["curve"])  # three distinct models
    assert (tmp_path / "teacher_hacking.png").stat().st_size > 0


def test_gpu_suite_runs_on_the_cpu_with_tiny_shapes(tmp_path: Path) -> None:
    """benchmarks/gpu_suite.sh --device cpu --tiny: every loss row at every shape (Liger skipped
    with a note), the floor measured, llmkd fused and eager on the same loss as TRL; the off- and
    on-policy steps with a phase table, the off-policy step-1 losses equal to TRL GKD's."""
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_suite.sh"), "--device", "cpu", "--tiny",
                           "--output", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["loss"]) == {"smollm2_135m", "qwen2.5_1.5b_to_0.5b", "liger_h4096"}
    for block in report["loss"].values():
        rows = block["rows"]
        assert "skipped" in rows["liger"]
        assert rows["floor"]["time_vs_floor"] == 1.0
        ref = rows["trl"]["loss"]
        for variant in ("llmkd", "llmkd_fused"):
            assert rows[variant]["loss"] == pytest.approx(ref, rel=1e-5), variant
            assert rows[variant]["grad_weight_norm"] == pytest.approx(rows["trl"]["grad_weight_norm"], rel=1e-4)
    step = report["step"]
    for variant in ("llmkd_off", "trl_gkd", "llmkd_on", "trl_distill"):
        table = step[variant]["phases_per_step"]
        assert len(table) == step["steps"] and all(row["wall_s"] > 0 for row in table)
        assert all(row["student_forward"] > 0 and row["backward"] > 0 for row in table)
    assert all(row["sample"] > 0 for row in step["llmkd_on"]["phases_per_step"])
    assert step["llmkd_off"]["loss_step1"] == pytest.approx(step["trl_gkd"]["loss_step1"], rel=1e-4)


def test_multi_teacher_tiny_writes_every_row_per_source(tmp_path: Path) -> None:
    import argparse
    import json

    import multi_teacher

    args = argparse.Namespace(tiny=True, steps=2, batch=4, lr=3e-3, num_train=4, num_eval=4, max_new_tokens=6,
                              teacher_layers=2, teacher_steps=2, teacher_lr=3e-3, student_layers=1, seed=0,
                              work=str(tmp_path), out=None, logic_tokenizer="same", vocab=400, rows=None)
    multi_teacher.run(args)
    rows = {r["row"]: r for r in json.loads((tmp_path / "multi_teacher.json").read_text())["rows"]}
    assert set(rows) == {"math_alone", "logic_alone", "routed", "mean", "teacher_math", "teacher_logic"}
    for name in ("math_alone", "logic_alone", "routed", "mean"):
        for src in ("math", "logic"):
            m = rows[name][src]
            assert m["kl_to_teacher"] > 0 and m["n"] == 4 and 0 <= m["ci95"][0] <= m["accuracy"] <= m["ci95"][1]
        assert rows[name]["s_per_step"] > 0
    # the specialists differ (each fine-tuned on its own source), so routing changes the targets
    assert rows["math_alone"]["logic"]["kl_to_teacher"] != rows["logic_alone"]["logic"]["kl_to_teacher"]


def test_multi_teacher_tiny_other_tokenizer_logic_teacher(tmp_path: Path) -> None:
    """--logic-tokenizer other: the logic specialist has its own tokenizer, is distilled through
    ALM beside the same-tokenizer math teacher, and its column is a chunk gap, not a KL."""
    import argparse
    import json

    from transformers import AutoTokenizer

    import multi_teacher

    args = argparse.Namespace(tiny=True, steps=2, batch=4, lr=3e-3, num_train=4, num_eval=4, max_new_tokens=6,
                              teacher_layers=2, teacher_steps=2, teacher_lr=3e-3, student_layers=1, seed=0,
                              work=str(tmp_path), out=None, logic_tokenizer="other", vocab=400,
                              rows="logic_other_alone,routed_mixed_tokenizers,teacher_logic")
    multi_teacher.run(args)
    result = json.loads((tmp_path / "multi_teacher_mixed_tokenizers.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"logic_other_alone", "routed_mixed_tokenizers", "teacher_logic"}
    logic = next((tmp_path / "cache").glob("multi_teacher-logic-othertok-*"))
    math = next((tmp_path / "cache").glob("multi_teacher-math-*"))
    assert AutoTokenizer.from_pretrained(logic).get_vocab() != AutoTokenizer.from_pretrained(math).get_vocab()
    for name in ("logic_other_alone", "routed_mixed_tokenizers"):
        assert rows[name]["math"]["kl_to_teacher"] > 0 and "chunk_gap_to_teacher" not in rows[name]["math"]
        assert rows[name]["logic"]["chunk_gap_to_teacher"] > 0 and "kl_to_teacher" not in rows[name]["logic"]
        assert rows[name]["s_per_step"] > 0
