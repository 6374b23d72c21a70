"""End-to-end reasoning eval on tiny models (transformers and vLLM backends), report, and CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmkd.cli
from llmkd.eval.reasoning import evaluate_reasoning
from llmkd.eval.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = 4


@pytest.fixture(scope="module")
def eval_runs(tiny_pair: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run dir: the teacher evaluated with hf, the student with vLLM (one engine start)."""
    teacher, student = tiny_pair
    run = tmp_path_factory.mktemp("run")
    for label, model, backend in (("teacher", teacher, "hf"), ("student", student, "vllm")):
        evaluate_reasoning(model, "arithmetic", backend=backend, num_examples=N, offset=2,
                           max_new_tokens=6, batch_size=2, output_dir=run / "eval" / label,
                           label=label, progress=False)
    return run


@pytest.mark.parametrize("label,backend", [("teacher", "hf"), ("student", "vllm")])
def test_evaluate_reasoning_writes_results(eval_runs: Path, label: str, backend: str) -> None:
    out = eval_runs / "eval" / label
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == backend and metrics["label"] == label
    assert metrics["recipe"] == "arithmetic" and metrics["answer_kind"] == "numeric"
    assert metrics["n"] == N and 0.0 <= metrics["ci_low"] <= metrics["accuracy"] <= metrics["ci_high"]
    assert metrics["time_s"] > 0 and 0 < metrics["mean_new_tokens"] <= 6
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == N and rows[0]["id"].startswith("arithmetic-2-")    # offset respected
    assert sum(r["correct"] for r in rows) == metrics["num_correct"]
    assert {"prompt", "gold", "response", "extracted", "finish_reason"} <= set(rows[0])


def test_evaluate_reasoning_refuses_to_overwrite(eval_runs: Path, tiny_pair: tuple[str, str]) -> None:
    with pytest.raises(FileExistsError, match="overwrite"):
        evaluate_reasoning(tiny_pair[0], "arithmetic", backend="hf", num_examples=1,
                           output_dir=eval_runs / "eval" / "teacher")


def _trainer_state(path: Path, steps: int = 20, offset: float = 0.0) -> None:
    history = []
    for s in range(1, steps + 1):
        history.append({"loss": 3.0 / s + offset, "kl": 1.0 / s, "taid_t": 0.4 + 0.02 * s,
                        "learning_rate": 1e-4, "grad_norm": 1.5, "epoch": s / steps, "step": s})
        if s % 5 == 0:
            history.append({"eval_kl": 1.2 / s, "eval_loss": 2.0 / s, "epoch": s / steps, "step": s})
    history.append({"train_runtime": 12.5, "train_loss": 1.0, "total_flos": 1e9, "step": steps})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"global_step": steps, "log_history": history}))


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000, (path, len(data))
    from matplotlib.image import imread

    assert imread(path).ndim == 3


def test_report_single_run(eval_runs: Path, tmp_path: Path) -> None:
    _trainer_state(eval_runs / "train" / "trainer_state.json")
    _trainer_state(eval_runs / "train" / "checkpoint-10" / "trainer_state.json", steps=10)  # ignored
    summary = write_report([eval_runs], tmp_path / "report")
    for png in ("accuracy.png", "training_curves.png"):
        _assert_png(tmp_path / "report" / png)
    assert {r["label"] for r in summary["evals"]} == {"teacher", "student"}
    assert len(summary["training"]) == 1 and summary["training"][0]["steps"] == 20
    assert summary["training"][0]["last"]["taid_t"] == pytest.approx(0.8)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| Model | Recipe | Accuracy (95 % CI) | n |" in md
    assert "| teacher | arithmetic |" in md and "| student | arithmetic |" in md
    assert "last eval_kl" in md and "last taid_t" in md and "train_runtime" not in md
    assert "![accuracy](accuracy.png)" in md
    assert json.loads((tmp_path / "report" / "report.json").read_text())["plots"] == [
        "accuracy.png", "training_curves.png"]
    write_report([eval_runs], tmp_path / "report")          # an earlier report is refreshed


def test_report_compares_runs_and_extra_columns(tmp_path: Path) -> None:
    for name, acc, kl in (("kd", 0.5, 0.3), ("taid", 0.7, 0.2)):
        ev = tmp_path / name / "eval" / "student"
        ev.mkdir(parents=True)
        (ev / "metrics.json").write_text(json.dumps({
            "recipe": "gsm8k", "accuracy": acc, "ci_low": acc - 0.1, "ci_high": acc + 0.1, "n": 50,
            "kl_to_teacher": kl, "backend": "vllm"}))
        _trainer_state(tmp_path / name / "train" / "trainer_state.json", offset=acc)
    summary = write_report([tmp_path / "kd", tmp_path / "taid"], tmp_path / "cmp")
    assert [r["label"] for r in summary["evals"]] == ["kd/student", "taid/student"]
    assert [t["label"] for t in summary["training"]] == ["kd", "taid"]
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "KL to teacher" in md and "| kd/student | gsm8k | 50.0 % [40.0, 60.0] | 50 | 0.3 | vllm |" in md
    _assert_png(tmp_path / "cmp" / "accuracy.png")
    _assert_png(tmp_path / "cmp" / "training_curves.png")


def test_report_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no metrics.json"):
        write_report([tmp_path / "empty"], tmp_path / "r")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    (tmp_path / "empty" / "metrics.json").write_text(json.dumps({"accuracy": 1.0, "n": 1}))
    with pytest.raises(FileExistsError, match="other files"):
        write_report([tmp_path / "empty"], tmp_path / "busy")


# -- CLI ---------------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> object:
    """Run `llmkd ...` in-process with only the eval/report commands registered."""
    monkeypatch.setattr(llmkd.cli, "COMMAND_MODULES", ("llmkd.cli.eval",))

    def run(*argv: str) -> tuple[int, str]:
        rc = llmkd.cli.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return rc, captured.out + captured.err
    return run


@pytest.fixture
def no_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad inputs must be caught before any model or dataset is loaded."""
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("evaluation started despite invalid input")
    monkeypatch.setattr("llmkd.eval.reasoning.evaluate_reasoning", boom)


def test_cli_unknown_recipe_lists_available(cli, no_generation, tmp_path: Path) -> None:
    rc, out = cli("eval", "--model", tmp_path / "missing", "--recipes", "arithmetic,gsm9k")
    assert rc == 2 and "recipe 'gsm9k' not found" in out and "Did you mean 'gsm8k'" in out
    assert "Available:" in out and "syllogism" in out and "arc_challenge" in out


def test_cli_missing_model_dir(cli, no_generation, tmp_path: Path) -> None:
    rc, out = cli("eval", "--model", tmp_path / "missing", "--recipes", "arithmetic")
    assert rc == 2 and "model directory" in out and "does not exist" in out


def test_cli_bad_config_key(cli, no_generation, tmp_path: Path) -> None:
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("model: x\nrecipes: [arithmetic]\nnum_exampels: 3\n")
    rc, out = cli("eval", cfg)
    assert rc == 2 and "num_exampels" in out and "num_examples" in out


def test_cli_eval_config_then_report(cli, tiny_pair: tuple[str, str], tmp_path: Path) -> None:
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"models: {{tiny: {tiny_pair[0]}}}\nrecipes: [arithmetic, syllogism]\n"
                   f"backend: hf\nnum_examples: 2\nmax_new_tokens: 4\nout: {tmp_path / 'ev'}\n")
    rc, out = cli("eval", cfg)
    assert rc == 0, out
    for recipe in ("arithmetic", "syllogism"):
        assert (tmp_path / "ev" / "tiny" / recipe / "metrics.json").exists()
    rc, out = cli("eval", cfg)                                   # results exist: refuse
    assert rc == 2 and "--overwrite" in out
    rc, out = cli("report", tmp_path / "ev")
    assert rc == 0, out
    md = (tmp_path / "ev" / "report" / "report.md").read_text()
    assert "| tiny | arithmetic |" in md and "| tiny | syllogism |" in md
    _assert_png(tmp_path / "ev" / "report" / "accuracy.png")
    rc, out = cli("report", tmp_path / "ev", tmp_path)
    assert rc == 2 and "--out" in out


def test_cli_two_models_with_one_dir_name_are_both_evaluated(cli, tiny_pair, tmp_path: Path) -> None:
    """Labels default to the dir name, lengthened until they differ: a/model and b/model."""
    import shutil

    for parent in ("a", "b"):
        shutil.copytree(tiny_pair[1], tmp_path / parent / "model")
    rc, out = cli("eval", "--model", tmp_path / "a" / "model", "--model", tmp_path / "b" / "model",
                  "--recipes", "arithmetic", "--backend", "hf", "--num-examples", "2",
                  "--max-new-tokens", "2", "--out", tmp_path / "ev")
    assert rc == 0, out
    for label in ("a/model", "b/model"):
        m = json.loads((tmp_path / "ev" / label / "arithmetic" / "metrics.json").read_text())
        assert m["label"] == label and m["model"].endswith(label)
    rc, out = cli("eval", "--model", tmp_path / "a" / "model", "--model", f"{tmp_path}/a/./model",
                  "--recipes", "arithmetic", "--out", tmp_path / "ev2")
    assert rc == 2 and "is given twice" in out, out


# -- closeness to a teacher per recipe (--teacher / teachers:) ---------------------------------
def _hand_closeness(model_dir: str, teacher_dir: str, recipe: str, n: int, max_new: int) -> dict:
    """Greedy decoding and KL(teacher || model), top-1 agreement, α = Σ min(p, q) written out
    naively in float64, token-weighted over the teacher's responses."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkd.data.collate import chat_prompt_ids
    from llmkd.data.recipes import load_recipe

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    load = dict(dtype=torch.float64)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, **load).eval()
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load).eval()
    kl = agree = alpha = tokens = 0.0
    for prompt in load_recipe(recipe).load(n)["prompt"]:
        ids = chat_prompt_ids(tok, prompt)
        start = len(ids)
        with torch.no_grad():
            for _ in range(max_new):
                nxt = int(teacher(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == tok.eos_token_id:
                    break
            p = torch.softmax(teacher(torch.tensor([ids])).logits[0, start - 1:-1], -1)
            q = torch.softmax(model(torch.tensor([ids])).logits[0, start - 1:-1], -1)
        for pt, qt in zip(p, q):
            kl += float(sum(pt[v] * (torch.log(pt[v]) - torch.log(qt[v])) for v in range(len(pt))))
            agree += float(pt.argmax() == qt.argmax())
            alpha += float(sum(min(pt[v], qt[v]) for v in range(len(pt))))
            tokens += 1
    return {"kl_to_teacher": kl / tokens, "top1_agreement": agree / tokens,
            "acceptance_rate": alpha / tokens, "closeness_tokens": tokens}


def test_cli_teacher_closeness_equals_hand_computation(cli, tiny_pair, tmp_path: Path) -> None:
    teacher, student = tiny_pair
    rc, out = cli("eval", "--model", student, "--model", teacher, "--recipes", "arithmetic",
                  "--backend", "hf", "--num-examples", 2, "--max-new-tokens", 4,
                  "--teacher", teacher, "--out", tmp_path / "ev")
    assert rc == 0, out
    labels = [Path(student).name, Path(teacher).name]
    got = {lab: json.loads((tmp_path / "ev" / lab / "arithmetic" / "metrics.json").read_text())
           for lab in labels}
    want = _hand_closeness(student, teacher, "arithmetic", 2, 4)
    m = got[labels[0]]
    assert m["accuracy"] is not None and m["teacher"] == teacher       # beside accuracy
    assert m["closeness_on"] == "teacher greedy responses"
    assert m["closeness_tokens"] == want["closeness_tokens"]
    for key in ("kl_to_teacher", "top1_agreement", "acceptance_rate"):
        assert m[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert m["kl_to_teacher"] > 0.01
    same = got[labels[1]]                                              # the teacher itself
    assert same["kl_to_teacher"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert "to teacher" in out and "top-1 agreement" in out


def test_cli_two_recipes_two_teachers_per_source(cli, tiny_pair, tmp_path: Path) -> None:
    """arithmetic -> the tiny teacher, syllogism -> the student itself (KL 0 there, not on arithmetic)."""
    teacher, student = tiny_pair
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"models: {{s: {student}}}\nrecipes: [arithmetic, syllogism]\nbackend: hf\n"
                   f"num_examples: 2\nmax_new_tokens: 3\nout: {tmp_path / 'ev'}\n"
                   f"teachers: {{arithmetic: {teacher}, syllogism: {student}}}\n")
    rc, out = cli("eval", cfg)
    assert rc == 0, out
    arith, syl = (json.loads((tmp_path / "ev" / "s" / r / "metrics.json").read_text())
                  for r in ("arithmetic", "syllogism"))
    assert (arith["teacher"], syl["teacher"]) == (teacher, student)
    assert arith["kl_to_teacher"] > 0.01 and syl["kl_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert arith["closeness_tokens"] > 0 and syl["closeness_tokens"] > 0
    rc, out = cli("report", tmp_path / "ev")
    assert rc == 0, out
    md = (tmp_path / "ev" / "report" / "report.md").read_text()
    assert "| Teacher | KL to teacher | top-1 agreement | α (acceptance) |" in md
    assert "| s | arithmetic |" in md and f"| {teacher} |" in md and f"| {student} |" in md
    assert "teacher greedy responses" in md


def test_cli_teacher_flag_bad_inputs(cli, no_generation, tiny_pair, tmp_path: Path) -> None:
    teacher, student = tiny_pair
    base = ("eval", "--model", student, "--recipes", "arithmetic", "--out", tmp_path / "ev")
    rc, out = cli(*base, "--teacher", f"gsm8k={teacher}")
    assert rc == 2 and "'gsm8k' is not among the recipes" in out, out
    rc, out = cli(*base, "--teacher", teacher, "--teacher", student)
    assert rc == 2 and "both name a teacher for every recipe" in out, out
    rc, out = cli(*base, "--teacher", tmp_path / "nope")
    assert rc == 2 and "teachers.arithmetic" in out and "does not exist" in out, out
    rc, out = cli(*base, "--teacher", f"arithmetic={teacher}", "--speculative", teacher, "--backend", "hf")
    assert rc == 2 and "separate eval" in out, out
