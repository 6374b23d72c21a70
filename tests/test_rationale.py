"""Rationale distillation (Distilling Step-by-Step) on tiny models: two-task rows, the weighted
per-task loss against a hand computation, learning, bad input, and generate -> distill -> eval."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset

from llmkd.training.config import config_from_dict
from llmkd.data.collate import DistillCollator, tokenize_rows
from llmkd.losses import divergence
from llmkd.methods.base import TeacherTargets
from llmkd.methods.rationale import LABEL, RATIONALE, Rationale, RationaleParams
from llmkd.methods.common import shifted_mask
from llmkd.models.head import forward_head
from llmkd.training.pipeline import build_trainer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def generated_rows() -> Dataset:
    """Rows shaped like `llmkd generate` output in rationale mode (incl. token/top-k columns)."""
    base = {"response_token_ids": [5, 6, 7], "teacher_topk_ids": [[5, 6]] * 3,
            "teacher_topk_logprobs": [[-0.1, -2.0]] * 3}
    return Dataset.from_list([
        {"id": "a", "prompt": "What is 2 + 3?", "rationale": "2 + 3 = 5.", "answer": "5", "gold": "5",
         "correct": True, "response": "2 + 3 = 5. So the answer is 5.", **base},
        {"id": "b", "prompt": "What is 4 * 2?", "rationale": "4 * 2 = 6.", "answer": "6", "gold": "8",
         "correct": False, "response": "4 * 2 = 6. So the answer is 6.", **base},
        {"id": "c", "prompt": "What is 9 - 1?", "rationale": "  ", "answer": "8", "gold": "8",
         "correct": True, "response": "So the answer is 8.", **base},
    ])


def test_build_examples_two_tasks_and_filter():
    out = Rationale.build_examples(RationaleParams(), generated_rows())
    assert set(out.column_names) == {"id", "task", "prompt", "response"}   # no teacher ids / top-k
    assert out["task"] == [LABEL, RATIONALE] and out["id"] == ["a", "a"]
    assert out["prompt"] == ["[label] What is 2 + 3?", "[rationale] What is 2 + 3?"]
    assert out["response"] == ["The answer is 5.", "2 + 3 = 5. So the answer is 5."]

    kept = Rationale.build_examples(RationaleParams(keep_incorrect=True), generated_rows())
    assert kept["id"] == ["a", "a", "b", "b"]   # "c" has no rationale either way
    # the label row teaches gold; the rationale row ends in the teacher's own conclusion
    assert kept["response"][2:] == ["The answer is 8.", "4 * 2 = 6. So the answer is 6."]

    assert Rationale.build_examples(RationaleParams(alpha=1.0), generated_rows())["task"] == [LABEL]
    # a data file with gold answers and rationales but no `correct` column: all rows count
    plain = Dataset.from_list([{"prompt": "Q?", "answer": "1", "rationale": "R."}])
    assert Rationale.build_examples(RationaleParams(), plain)["response"] == [
        "The answer is 1.", "R. So the answer is 1."]


def test_bad_input_is_named():
    no_rationale = Dataset.from_list([{"prompt": "Q?", "answer": "1"}])
    with pytest.raises(ValueError, match=r"lack \['rationale'\].*llmkd generate.*mode: rationale"):
        Rationale.build_examples(RationaleParams(), no_rationale)
    only_wrong = generated_rows().select([1])
    with pytest.raises(ValueError, match="1 have an incorrect answer.*keep_incorrect"):
        Rationale.build_examples(RationaleParams(), only_wrong)
    with pytest.raises(ValueError, match="alpha"):
        RationaleParams(alpha=1.5)
    with pytest.raises(ValueError, match="live teacher"):
        Rationale(RationaleParams(kd_weight=1.0)).attach(None, None, chunked_head_ok=True)


def _batch(tiny_pair, rows: Dataset, params: RationaleParams) -> dict[str, torch.Tensor]:
    tok = load_tokenizer(tiny_pair[1])
    feats = tokenize_rows(Rationale.build_examples(params, rows), tok, response="response", max_length=128)
    return DistillCollator(tok.pad_token_id)([feats[i] for i in range(len(feats))])


def _hand_ce(logits: torch.Tensor, batch: dict[str, torch.Tensor], task: int) -> torch.Tensor:
    """Token-mean CE over one task's label tokens, token by token (position j predicts j + 1)."""
    terms = [-torch.log_softmax(logits[i, j], -1)[batch["labels"][i, j + 1]]
             for i in range(len(logits)) if batch["task"][i] == task
             for j in range(logits.shape[1] - 1) if batch["labels"][i, j + 1] != -100]
    return torch.stack(terms).mean()


def test_loss_is_weighted_sum_of_task_means(tiny_pair):
    from llmkd.models.student import load_causal_lm

    student = load_causal_lm(tiny_pair[1]).double()
    teacher = load_causal_lm(tiny_pair[0]).double()
    rows = Dataset.from_list([{"prompt": f"What is {a} + {b}?", "answer": str(a + b),
                               "rationale": f"{a} plus {b} is {a + b}, counting up {b} from {a}."}
                              for a, b in ((2, 3), (10, 7), (31, 4))])
    params = RationaleParams(alpha=0.3)
    batch = _batch(tiny_pair, rows, params)
    method = Rationale(params)
    with torch.no_grad():
        out = forward_head(student, batch, hidden=False)
        loss, metrics = method.loss(out, TeacherTargets(), batch, num_items=1000)   # num_items unused
        want = 0.3 * _hand_ce(out.logits, batch, LABEL) + 0.7 * _hand_ce(out.logits, batch, RATIONALE)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        assert set(metrics) == {"label_ce", "rationale_ce"}

        # a micro-batch with one task only: just that task's weighted term
        only = {k: v[batch["task"] == LABEL] for k, v in batch.items()}
        loss1, metrics1 = method.loss(forward_head(student, only, hidden=False), TeacherTargets(), only, None)
        torch.testing.assert_close(loss1, 0.3 * _hand_ce(out.logits, batch, LABEL), rtol=1e-12, atol=1e-12)
        assert set(metrics1) == {"label_ce"}

        # + token KD on the rationale rows from a live teacher
        kd_params = RationaleParams(alpha=0.3, kd_weight=2.0, kind="rkl")
        kd_method = Rationale(kd_params)
        kd_method.attach(teacher, student, chunked_head_ok=True)
        loss2, metrics2 = kd_method.loss(out, kd_method.teacher_targets(batch), batch, None)
        r = batch["task"] == RATIONALE
        kd = divergence(out.logits[r, :-1], teacher(input_ids=batch["input_ids"][r],
                        attention_mask=batch["attention_mask"][r]).logits[:, :-1], "rkl",
                        mask=shifted_mask(batch["labels"][r]))
        torch.testing.assert_close(loss2, want + 2.0 * kd, rtol=1e-10, atol=1e-10)
        assert metrics2["kd"] > 0


def _write_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        lines.append(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b),
                                 "rationale": f"{a} + {b} = {a + b}.", "correct": True}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_training_lowers_both_task_losses(tiny_pair, tmp_path):
    data = _write_jsonl(tmp_path / "rationales.jsonl", 96)
    cfg = config_from_dict({
        "output_dir": str(tmp_path / "run"), "max_steps": 40, "learning_rate": 3e-3,
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "logging_steps": 10,
        "use_cpu": True, "save_strategy": "no", "seed": 0, "disable_tqdm": True,
        "model": {"teacher": tiny_pair[0], "student": tiny_pair[1], "teacher_mode": "offline"},
        "data": {"recipe": "gsm_symbolic", "path": str(data), "num_train": 80, "num_eval": 16},
        "method": {"name": "rationale", "alpha": 0.5}})
    trainer = build_trainer(cfg)
    assert trainer.teacher is None and len(trainer.train_dataset) == 160
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    for key in ("eval_label_ce", "eval_rationale_ce"):
        assert after[key] < 0.7 * before[key], (key, before[key], after[key])
    # per-micro-batch task means / grad-accum steps: the logged loss is the weighted mean of the
    # logged task CEs (not 2x it), as long as micro-batches hold both tasks (8 shuffled rows do)
    logged = [h for h in trainer.state.log_history if "label_ce" in h]
    assert len(logged) == 4
    for h in logged:
        assert h["loss"] == pytest.approx(0.5 * h["label_ce"] + 0.5 * h["rationale_ce"], rel=2e-3), h


def test_recipe_data_without_rationale_fails_before_models(tiny_pair, tmp_path):
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n"
                            for a in range(4)))
    cfg = config_from_dict({
        "output_dir": str(tmp_path / "run"), "use_cpu": True,
        "model": {"teacher": tiny_pair[0], "student": tiny_pair[1]},
        "data": {"recipe": "gsm_symbolic", "path": str(data), "num_train": 2, "num_eval": 2},
        "method": {"name": "rationale"}})
    with pytest.raises(ValueError, match="rationale.*llmkd generate"):
        build_trainer(cfg)


def test_generate_then_distill_then_eval_cli(tiny_pair, tmp_path):
    """`llmkd generate` (rationale mode, hf backend) -> `llmkd distill` with the shipped
    configs/distill/rationale.yaml -> `llmkd eval --prompt-prefix`."""
    from llmkd.cli import main

    teacher = tiny_pair[0]
    questions = tmp_path / "questions.jsonl"
    rng = random.Random(1)
    questions.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                                 for a, b in ((rng.randint(1, 9), rng.randint(1, 9)) for _ in range(16))))
    recipe = tmp_path / "sums.yaml"
    recipe.write_text(yaml.safe_dump({
        "source": "local", "path": str(questions), "answer_kind": "numeric",
        "fewshot": [{"question": "What is 2 + 2?", "rationale": "2 + 2 = 4.", "answer": "4"}]}))
    gen = tmp_path / "gen"
    assert main(["generate", str(REPO / "configs/generate/rationale.yaml"), "--no-progress",
                 "--set", f"model={teacher}", "--set", "backend=hf", "--set", f"recipe={recipe}",
                 "--set", "num_prompts=16", "--set", "n=1", "--set", "temperature=0.0",
                 "--set", "max_new_tokens=24", "--set", "max_model_len=256", "--set", "topk=4",
                 "--set", "keep_incorrect=true", "--set", f"output_dir={gen}"]) == 0
    out = tmp_path / "student"
    assert main(["distill", str(REPO / "configs/distill/rationale.yaml"),
                 "--set", f"model.teacher={teacher}", "--set", f"data.path={gen}",
                 "--set", "data.num_train=12", "--set", "data.num_eval=4", "--set", "method.keep_incorrect=true",
                 "--set", "max_steps=3", "--set", "save_strategy='no'", "--set", "disable_tqdm=true",
                 "--set", f"output_dir={out}"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_label_ce"] > 0 and results["eval_rationale_ce"] > 0
    assert main(["eval", "--model", str(out), "--recipes", str(recipe), "--backend", "hf",
                 "--num-examples", "4", "--max-new-tokens", "8", "--prompt-prefix", "[rationale] ",
                 "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "student" / "sums" / "metrics.json").read_text())
    assert metrics["prompt_prefix"] == "[rationale] " and metrics["n"] == 4
