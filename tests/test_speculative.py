"""Measured speculative decoding (transformers assisted generation) on tiny models: lossless greedy
output, forward calls counted for real (checked against a replay of the acceptance rule), CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmkd.cli
from llmkd.data.collate import chat_prompt_ids
from llmkd.eval.speculative import check_draft, measure_speculative

GAMMA = 3
MAX_NEW = 12


@pytest.fixture(scope="module")
def models(tiny_pair: tuple[str, str]) -> dict:
    teacher_dir, student_dir = tiny_pair
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    target, student = load(teacher_dir), load(student_dir)
    # a draft that agrees with the target often but not always: the target, perturbed
    noisy = load(teacher_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if "mlp" in name:
                p.add_(2.0 * p.std() * torch.randn(p.shape, generator=g))
    prompts = [chat_prompt_ids(tok, f"Calculate {b} + {a}. Reply with just the number.")
               for a, b in [(3, 41), (7, 5), (9, 88), (1, 12), (4, 60), (2, 2)]]
    return {"target": target, "student": student, "noisy": noisy, "copy": load(teacher_dir),
            "prompts": prompts,
            "eos": [tok.eos_token_id], "pad": tok.pad_token_id}


def run(models: dict, draft: str, gamma: int = GAMMA) -> dict:
    return measure_speculative(models["target"], models[draft], models["prompts"], gamma=gamma,
                               max_new_tokens=MAX_NEW, eos_ids=models["eos"], pad_id=models["pad"])


@pytest.fixture(scope="module")
def results(models: dict) -> dict[str, dict]:
    """One measured run per draft: random student, perturbed target, exact copy of the target."""
    return {draft: run(models, draft) for draft in ("student", "noisy", "copy")}


def replay_target_calls(target, draft, prompt: list[int], response: list[int], gamma: int) -> int:
    """Target calls that greedy speculative decoding needs, replayed from per-position top-1
    agreement along the target's own greedy response: a round at position i accepts the leading
    agreements among its (at most gamma) drafted positions and adds the target's next token."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        agree = (target(ids).logits[0].argmax(-1) == draft(ids).logits[0].argmax(-1)).tolist()
    agree = agree[len(prompt) - 1: len(prompt) - 1 + len(response)]   # position i predicts token i
    i, calls = 0, 0
    while i < len(response):
        drafted = min(gamma, MAX_NEW - i - 1)
        k = 0
        while k < drafted and i + k < len(response) and agree[i + k]:
            k += 1
        i += min(k + 1, len(response) - i)
        calls += 1
    return calls


@pytest.mark.parametrize("draft", ["student", "noisy", "copy"])
def test_greedy_speculative_output_equals_target_and_counts_are_real(models: dict, results: dict,
                                                                    draft: str) -> None:
    m = results[draft]
    assert m["identical_outputs"] == m["prompts"] == len(models["prompts"])
    for prompt, row in zip(models["prompts"], m["rows"]):
        assert row["speculative_tokens"] == row["target_tokens"]        # token for token
        assert row["target_calls_plain"] == row["new_tokens"]           # plain greedy: 1 token a call
        assert row["target_calls"] == replay_target_calls(
            models["target"], models[draft], prompt, row["target_tokens"], GAMMA)
    assert m["tokens_per_target_call_plain"] == 1.0
    assert m["new_tokens"] == sum(r["new_tokens"] for r in m["rows"])
    assert m["drafted"] == m["draft_calls"]          # one draft forward per drafted token
    assert m["measured_acceptance"] == m["accepted"] / m["drafted"]
    if draft == "copy":          # a perfect draft: every drafted token accepted
        assert m["measured_acceptance"] == 1.0
        assert m["tokens_per_target_call"] > 2.5


def test_better_draft_means_fewer_target_calls(results: dict) -> None:
    random_draft, noisy, perfect = results["student"], results["noisy"], results["copy"]
    assert random_draft["tokens_per_target_call"] < noisy["tokens_per_target_call"] \
        < perfect["tokens_per_target_call"]
    assert 0 < noisy["measured_acceptance"] < 1


def test_bad_inputs(models: dict, tiny_pair: tuple[str, str]) -> None:
    for gamma in (0, -1, 1.5):
        with pytest.raises(ValueError, match="gamma"):
            run(models, "student", gamma=gamma)
    with pytest.raises(ValueError, match="separate copy"):
        run(models, "target")
    from llmkd.models.tiny import tiny_model, tiny_tokenizer

    other = tiny_model(tiny_tokenizer(vocab_size=300), layers=1)
    with pytest.raises(ValueError, match="vocabulary"):
        check_draft(models["target"], other)
    with pytest.raises(ValueError, match="vocabulary"):
        measure_speculative(models["target"], other, models["prompts"], eos_ids=models["eos"],
                            pad_id=models["pad"])


# -- CLI ---------------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> object:
    monkeypatch.setattr(llmkd.cli, "COMMAND_MODULES", ("llmkd.cli.eval",))

    def call(*argv: object) -> tuple[int, str]:
        rc = llmkd.cli.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return rc, captured.out + captured.err
    return call


def test_cli_speculative_then_report(cli, tiny_pair: tuple[str, str], tmp_path: Path) -> None:
    teacher, student = tiny_pair
    out = tmp_path / "ev"
    rc, text = cli("eval", "--model", teacher, "--recipes", "arithmetic", "--speculative", student,
                   "--gamma", "2", "--num-examples", "3", "--max-new-tokens", "6", "--out", out)
    assert rc == 0, text
    m = json.loads((out / "teacher+student" / "arithmetic" / "metrics.json").read_text())
    assert m["gamma"] == 2 and m["prompts"] == 3 and m["identical_outputs"] == 3
    assert m["backend"] == "hf-assisted" and m["draft"] == student
    assert m["tokens_per_target_call"] >= 1.0 and m["target_calls"] <= m["new_tokens"]
    assert 0 <= m["acceptance_rate"] <= 1 and 1 <= m["block_efficiency"] <= 3
    assert m["target_s"] > 0 and m["speculative_s"] > 0 and m["speedup"] > 0
    assert len((out / "teacher+student" / "arithmetic" / "predictions.jsonl").read_text().splitlines()) == 3
    rc, text = cli("report", out)
    assert rc == 0, text
    assert "| teacher+student | arithmetic |" in (out / "report" / "report.md").read_text()


def test_cli_speculative_bad_inputs(cli, tiny_pair: tuple[str, str], tmp_path: Path) -> None:
    rc, text = cli("eval", "--model", tiny_pair[0], "--recipes", "arithmetic", "--speculative",
                   tiny_pair[1], "--gamma", "0", "--out", tmp_path)
    assert rc == 2 and "gamma=0" in text
    rc, text = cli("eval", "--model", tiny_pair[0], "--recipes", "arithmetic", "--speculative",
                   tmp_path / "nodraft", "--out", tmp_path)
    assert rc == 2 and "does not exist" in text
    # options the speculative path would otherwise ignore
    rc, text = cli("eval", "--model", tiny_pair[0], "--recipes", "arithmetic", "--gamma", "3",
                   "--out", tmp_path)
    assert rc == 2 and "--gamma 3 only applies with --speculative" in text
    rc, text = cli("eval", "--model", tiny_pair[0], "--recipes", "arithmetic", "--speculative",
                   tiny_pair[1], "--backend", "vllm", "--out", tmp_path)
    assert rc == 2 and "drop --backend vllm" in text
