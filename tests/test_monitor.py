"""Teacher-hacking monitor: the detector on synthetic series, the config's bad-input errors, each
golden metric on a tiny run against a hand computation, and the best checkpoint chosen by the
golden metric (on resume too)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from llmkd.eval.monitor import Evaluation, detect_hacking, evaluations
from llmkd.training.pipeline import build_trainer

from helpers import StopAt, tiny_config

NOISE = 0.05


def _series(trend: float, noise: float, seed: int, n: int = 30) -> list[Evaluation]:
    """Proxy falls steadily; golden falls for 10 evals then moves by `trend` per eval; each
    golden value carries N(0, noise) and reports its standard error `noise`."""
    rng = random.Random(seed)
    return [Evaluation(step=10 * (i + 1), proxy=1.0 - 0.02 * i,
                       golden=(1.0 - 0.03 * min(i, 10) + trend * max(0, i - 10) + rng.gauss(0, noise)),
                       se=noise) for i in range(n)]


def test_detector_fires_when_proxy_improves_and_golden_worsens() -> None:
    for seed in range(20):
        found = detect_hacking(_series(trend=NOISE, noise=NOISE / 2, seed=seed), patience=3)
        assert found is not None, seed
        assert 100 <= found.began_step <= 200 and found.best_step <= found.began_step < found.flagged_step


def test_detector_stays_quiet_on_noise_of_the_same_size() -> None:
    # no trend after the turn, noise (sd, and reported se) as large as the hacking series' climb
    # over the 3 evaluations of the patience window
    fired = [detect_hacking(_series(trend=0.0, noise=3 * NOISE, seed=s), patience=3) for s in range(200)]
    assert sum(f is not None for f in fired) <= 2


def test_detector_needs_the_proxy_to_improve() -> None:
    evals = [Evaluation(step=e.step, proxy=1.0 + 0.02 * i, golden=e.golden, se=e.se)
             for i, e in enumerate(_series(trend=NOISE, noise=NOISE / 2, seed=0))]
    assert detect_hacking(evals, patience=3) is None


def test_detector_without_standard_errors_uses_the_series_jitter() -> None:
    evals = [Evaluation(e.step, e.proxy, e.golden) for e in _series(trend=NOISE, noise=NOISE / 4, seed=1)]
    assert detect_hacking(evals, patience=3) is not None


def test_accuracy_is_oriented_higher_is_better() -> None:
    log = [{"step": s, "eval_loss": 1.0 - s / 100, "eval_golden_accuracy": a, "eval_golden_accuracy_se": 0.01}
           for s, a in [(10, 0.5), (20, 0.6), (30, 0.5), (40, 0.45), (50, 0.4)]]
    golden, proxy, evals = evaluations(log)
    assert (golden, proxy) == ("eval_golden_accuracy", "eval_loss")
    assert detect_hacking(evals, patience=3).best_step == 20


# -- config-time errors ---------------------------------------------------------------------------
def _raw(pair, out, **monitor):
    return {"output_dir": str(out), "use_cpu": True, "eval_strategy": "steps", "eval_steps": 2,
            "model": {"teacher": pair[0], "student": pair[1]},
            "data": {"recipe": "arithmetic", "num_train": 16, "num_eval": 4}, "monitor": monitor}


def test_golden_metric_without_an_eval_set_fails_at_config_time(tiny_pair, tmp_path) -> None:
    from llmkd.training.config import check_config

    raw = _raw(tiny_pair, tmp_path / "o", golden="gold_nll")
    raw.pop("eval_strategy")
    with pytest.raises(ValueError, match="eval_strategy is 'no'"):
        check_config(raw)


def test_oracle_with_another_tokenizer_fails_at_config_time(tiny_pair, tmp_path) -> None:
    from llmkd.training.config import check_config
    from llmkd.models.tiny import tiny_model, tiny_tokenizer

    other = tmp_path / "oracle"
    tok = tiny_tokenizer(vocab_size=300)
    tiny_model(tok).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="monitor.oracle=.*different tokenizer"):
        check_config(_raw(tiny_pair, tmp_path / "o", golden="oracle_kl", oracle=str(other)))
    with pytest.raises(ValueError, match="needs monitor.oracle"):
        check_config(_raw(tiny_pair, tmp_path / "o", golden="oracle_kl"))
    check_config(_raw(tiny_pair, tmp_path / "o", golden="oracle_kl", oracle=tiny_pair[0]))   # same tokenizer


def test_accuracy_on_a_recipe_without_gold_answers_fails_at_config_time(tiny_pair, tmp_path) -> None:
    from llmkd.training.config import check_config

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"q{i}", "answer": None}) + "\n" for i in range(30)))
    recipe = tmp_path / "noanswers.yaml"
    recipe.write_text(f"source: local\npath: {rows}\n")
    raw = _raw(tiny_pair, tmp_path / "o", golden="accuracy")
    raw["data"]["recipe"] = str(recipe)
    with pytest.raises(ValueError, match="needs the recipe's gold answers.*'answer'"):
        check_config(raw)


def test_bad_monitor_values_name_the_field(tiny_pair, tmp_path) -> None:
    from llmkd.training.config import check_config

    for monitor, match in (({"golden": "gold_nl"}, "monitor.golden='gold_nl'"),
                           ({"golden": "gold_nll", "on_hacking": "halt"}, "monitor.on_hacking"),
                           ({"golden": "gold_nll", "patience": 0}, "monitor.patience"),
                           ({"golden": "gold_nll", "colour": 1}, "colour")):
        with pytest.raises(ValueError, match=match):
            check_config(_raw(tiny_pair, tmp_path / "o", **monitor))
    kwargs = check_config(_raw(tiny_pair, tmp_path / "o", golden="gold_nll") | {"metric_for_best_model": "golden_nll"})
    assert kwargs["greater_is_better"] is False     # transformers' default would keep the worst


# -- golden metrics on a tiny run == hand computations -------------------------------------------------
def _cfg(pair, out, golden, **over):
    monitor = {"golden": golden} | ({"oracle": pair[0]} if golden == "oracle_kl" else {}) | \
        ({"num_prompts": 3, "max_new_tokens": 8} if golden == "accuracy" else {})
    base = dict(max_steps=2, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4,
                method={"kind": "fkl"}, monitor=monitor)
    return tiny_config(pair, out, **(base | over))


def _hand_nll_kl(student, features, reference=None) -> tuple[float, float]:
    """Per example: mean over response tokens of -log q(label) and of sum_v p (log p - log q),
    float64, one example at a time; then the mean over examples."""
    nll, kl = [], []
    for row in features:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor(row["labels"][1:])
        q = torch.log_softmax(student(input_ids=ids).logits[0, :-1].double(), -1)
        keep = labels != -100
        nll.append(float(-q[keep].gather(-1, labels[keep][:, None]).mean()))
        if reference is not None:
            p = torch.log_softmax(reference(input_ids=ids).logits[0, :-1].double(), -1)[keep]
            kl.append(float((p.exp() * (p - q[keep])).sum(-1).mean()))
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    return mean(nll), mean(kl)


@pytest.mark.parametrize("golden", ["gold_nll", "oracle_kl"])
def test_golden_nll_and_oracle_kl_equal_a_hand_computation(tiny_pair, tmp_path, golden) -> None:
    trainer = build_trainer(_cfg(tiny_pair, tmp_path / "run", golden))
    trainer.train()
    log = next(e for e in trainer.state.log_history if "eval_loss" in e)
    model = trainer.model.eval()
    with torch.no_grad():
        if golden == "gold_nll":
            value, _ = _hand_nll_kl(model, trainer.monitor.gold)
            assert log["eval_golden_nll"] == pytest.approx(value, rel=1e-4)
        else:
            _, value = _hand_nll_kl(model, trainer.eval_dataset, trainer.monitor.oracle)
            assert log["eval_golden_oracle_kl"] == pytest.approx(value, rel=1e-4, abs=1e-7)
        _, proxy = _hand_nll_kl(model, trainer.eval_dataset, trainer.teacher)
    assert log["eval_proxy_kl"] == pytest.approx(proxy, rel=1e-4, abs=1e-7)
    assert log["eval_golden_" + ("nll" if golden == "gold_nll" else "oracle_kl") + "_se"] >= 0


def test_golden_accuracy_equals_a_hand_computation(tiny_pair, tmp_path) -> None:
    from llmkd.data.collate import chat_prompt_ids
    from llmkd.data.answers import extract_answer, is_correct, wilson_interval

    trainer = build_trainer(_cfg(tiny_pair, tmp_path / "run", "accuracy"))
    trainer.train()
    log = next(e for e in trainer.state.log_history if "eval_loss" in e)
    mon, tok, model = trainer.monitor, trainer.processing_class, trainer.model.eval()
    correct = 0
    for prompt, gold in zip(mon.prompts, mon.answers):      # one prompt at a time: no padding
        ids = torch.tensor([chat_prompt_ids(tok, prompt)])
        out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, repetition_penalty=1.0)
        correct += is_correct(extract_answer(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
                                             "numeric"), gold, "numeric")
    assert len(mon.prompts) == 3
    assert log["eval_golden_accuracy"] == correct / 3
    assert (log["eval_golden_accuracy_ci_low"], log["eval_golden_accuracy_ci_high"]) == \
        pytest.approx(wilson_interval(correct, 3))


# -- best checkpoint by the golden metric, resume included -------------------------------------------
def test_best_checkpoint_is_chosen_by_the_golden_metric_on_resume_too(tiny_pair, tmp_path) -> None:
    over = dict(max_steps=8, eval_steps=2, save_strategy="steps", save_steps=2, learning_rate=1e-2,
                load_best_model_at_end=True, metric_for_best_model="golden_nll")
    part = build_trainer(_cfg(tiny_pair, tmp_path / "run", "gold_nll", **over))
    part.add_callback(StopAt(4))
    part.train()
    resumed = build_trainer(_cfg(tiny_pair, tmp_path / "run", "gold_nll", **over, resume_from_checkpoint=True))
    resumed.train()
    evals = [e for e in resumed.state.log_history if "eval_golden_nll" in e]
    assert [e["step"] for e in evals] == [2, 4, 6, 8]          # the first run's evaluations kept
    best = min(evals, key=lambda e: e["eval_golden_nll"])
    assert resumed.state.best_model_checkpoint == str(tmp_path / "run" / f"checkpoint-{best['step']}")
    assert resumed.state.best_metric == pytest.approx(best["eval_golden_nll"])
    from safetensors.torch import load_file

    saved = load_file(str(Path(resumed.state.best_model_checkpoint) / "model.safetensors"))
    for name, value in saved.items():      # load_best_model_at_end loaded that checkpoint
        torch.testing.assert_close(resumed.model.state_dict()[name], value)


def test_report_plots_proxy_vs_golden_and_names_the_step_where_hacking_began(tmp_path) -> None:
    from llmkd.eval.report import write_report

    run = tmp_path / "offline"
    run.mkdir()
    history = [{"step": e.step, "eval_proxy_kl": e.proxy, "eval_golden_oracle_kl": e.golden,
                "eval_golden_oracle_kl_se": e.se} for e in _series(trend=NOISE, noise=0.0, seed=0)]
    (run / "log_history.json").write_text(json.dumps(history))
    summary = write_report([run], tmp_path / "report")
    hacking = summary["training"][0]["monitor"]["hacking"]
    assert hacking["began_step"] == 120 and summary["training"][0]["monitor"]["best_step"] == 110
    assert "proxy_vs_golden.png" in summary["plots"] and (tmp_path / "report" / "proxy_vs_golden.png").exists()
    assert "| offline | eval_golden_oracle_kl | eval_proxy_kl | 110 | 120 |" in (tmp_path / "report" / "report.md").read_text()


def test_report_uses_the_runs_own_patience(tmp_path) -> None:
    """A run with monitor.patience 2 that stopped on hacking after two bad evaluations: the report
    names the same onset (the default patience, 3, would say 'not detected')."""
    from llmkd.eval.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    points = [(10, 1.0, 2.0), (20, 0.9, 1.5), (30, 0.8, 1.8), (40, 0.7, 2.1)]
    history = [{"step": s, "eval_proxy_kl": p, "eval_golden_nll": g, "eval_golden_nll_se": 0.01}
               for s, p, g in points]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (run / "training_args.json").write_text(json.dumps({"monitor": {"golden": "gold_nll", "patience": 2}}))
    summary = write_report([run], tmp_path / "report")
    assert summary["training"][0]["monitor"]["hacking"]["began_step"] == 30
    assert "| run | eval_golden_nll | eval_proxy_kl | 20 | 30 |" in (tmp_path / "report" / "report.md").read_text()
    (run / "training_args.json").unlink()     # no config beside the log: the default patience
    summary = write_report([run], tmp_path / "report2")
    assert summary["training"][0]["monitor"]["hacking"] is None
    assert "not detected (patience 3)" in (tmp_path / "report2" / "report.md").read_text()
