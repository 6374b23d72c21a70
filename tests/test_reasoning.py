"""Answer extraction / verification on hard strings, Wilson interval, speculative formulas, metric."""
from __future__ import annotations

import math

import pytest
import torch

from llmkd.eval.reasoning import extract_answer, is_correct, wilson_interval
from llmkd.eval.speculative import acceptance_rate, block_efficiency

EXTRACT = [
    # (text, kind, expected)
    ("1,234", "numeric", "1234"),
    ("The total is $1,234.50.", "numeric", "1234.50"),
    ("$1,234.50", "numeric", "1234.50"),
    ("The distance is 12 km", "numeric", "12"),
    (r"So the result is \boxed{\frac{3}{4}}.", "numeric", r"\frac{3}{4}"),
    (r"\boxed{\frac{1}{\sqrt{2}}} and then more", "numeric", r"\frac{1}{\sqrt{2}}"),
    (r"First \boxed{1}, corrected: \boxed{{3}+\frac{1}{2}}", "numeric", r"{3}+\frac{1}{2}"),
    ("The answer is -7.", "numeric", "-7"),
    ("It drops to -12 degrees", "numeric", "-12"),
    ("3/4", "numeric", "3/4"),
    ("0.75", "numeric", "0.75"),
    ("He ran 3.5 km.", "numeric", "3.5"),
    ("The answer is 42. Next, we compute 7 + 1 = 8.", "numeric", "42"),
    ("I have 3 apples and 5 pears, so 8", "numeric", "8"),
    ("3 + 4 = 7, times 2 is 14. The answer is 14.", "numeric", "14"),
    ("The answer is 7.\nCheck: 2 + 2 = 4. Final answer: 9", "numeric", "9"),   # last marker wins
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "numeric", "72"),
    ("#### 1,000", "numeric", "1000"),
    ("The answer is (C)", "numeric", None),
    ("The answer is \u22127.", "numeric", "-7"),                  # Unicode minus sign
    ("It fell to \u221212.5 degrees", "numeric", "-12.5"),
    ("The answer is 4 + 8 + 4.", "numeric", None),                # unevaluated: not its last 4
    ("The total is 4 + 8 + 4", "numeric", None),
    ("First, 3 * 4 is 12. Then add 2 to get 14", "numeric", "14"),
    ("7 hours 30 minutes", "numeric", None),                      # a quantity, not 30
    ("The answer is 7 hours and 30 minutes.", "numeric", None),
    ("She is 5 feet 3 inches tall.", "numeric", None),
    ("1e3", "numeric", "1000"),
    ("The answer is 2.5e-3.", "numeric", "0.0025"),
    ("3 1/2", "numeric", "7/2"),                                  # mixed number = 3.5
    ("He walked -3 1/2 km, i.e. backwards.", "numeric", "-7/2"),
    ("The answer is 3 1/2.", "numeric", "7/2"),
    ("I do not know.", "numeric", None),
    ("", "numeric", None),
    ("The answer is (C)", "choice", "C"),
    ("I think (B) is right", "choice", "B"),
    ("C", "choice", "C"),
    ("(D) 12/25/1937", "choice", "D"),
    ("C. Paris", "choice", "C"),
    ("So the answer is: B, since plants need light.", "choice", "B"),
    ("Between (A) and (D): the answer is D.", "choice", "D"),
    (r"\boxed{\text{(E)}}", "choice", "E"),
    ("I think so", "choice", None),
    ("Yes", "yesno", "yes"),
    ("No, because birds fly.", "yesno", "no"),
    ("The answer is True.", "yesno", "yes"),
    ("It depends on the season, so no.", "yesno", "no"),
    ("maybe", "yesno", None),
    ("The answer is Mother-in-law.", "exact", "mother-in-law"),
    ("son", "exact", "son"),
    ("The answer is son. He is the child of Jennifer.", "exact", "son"),
    ("   ", "exact", None),
]


@pytest.mark.parametrize("text,kind,expected", EXTRACT)
def test_extract_answer(text: str, kind: str, expected: str | None) -> None:
    assert extract_answer(text, kind) == expected


@pytest.mark.parametrize("text,kind,expected", [c for c in EXTRACT if c[2] is not None])
def test_extract_is_idempotent(text: str, kind: str, expected: str) -> None:
    assert extract_answer(expected, kind) == expected


CORRECT = [
    # (prediction, gold, kind, expected)
    ("The answer is 0.75", "3/4", "numeric", True),
    (r"\boxed{\frac{3}{4}}", "0.75", "numeric", True),
    ("That costs $1,234.50 in total.", "1234.5", "numeric", True),
    ("The answer is 8.", "8.0", "numeric", True),
    ("#### 72", "72", "numeric", True),
    (r"The answer is $\boxed{\left( 3, \frac{\pi}{2} \right)}$.", r"\left( 3, \frac{\pi}{2} \right)",
     "numeric", True),
    (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}", "numeric", True),
    ("The answer is -5.", "5", "numeric", False),
    ("The answer is 7.", "8", "numeric", False),
    ("The answer is 0.76", "3/4", "numeric", False),
    ("The answer is \u22127.", "-7", "numeric", True),
    ("The answer is \u22127.", "7", "numeric", False),
    ("The answer is 4 + 8 + 4.", "4", "numeric", False),
    ("7 hours 30 minutes", "30", "numeric", False),
    ("1e3", "1000", "numeric", True),
    ("The answer is 1e3.", "1", "numeric", False),
    ("3 1/2", "3.5", "numeric", True),
    ("3 1/2", "1/2", "numeric", False),
    ("The answer is 2.5e-3.", "1/400", "numeric", True),
    ("no idea", "3", "numeric", False),
    (None, "3", "numeric", False),
    ("The answer is (C).", "C", "choice", True),
    ("The answer is (C).", "(C)", "choice", True),
    ("The answer is (B).", "C", "choice", False),
    ("The answer is true.", "yes", "yesno", True),
    ("No.", "False", "yesno", True),
    ("Yes, it is.", "no", "yesno", False),
    ("The answer is Son.", "son", "exact", True),
    ("The answer is daughter.", "son", "exact", False),
]


@pytest.mark.parametrize("prediction,gold,kind,expected", CORRECT)
def test_is_correct(prediction: str | None, gold: str, kind: str, expected: bool) -> None:
    assert is_correct(prediction, gold, kind) is expected


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="numeric"):
        extract_answer("42", kind="number")


def test_wilson_interval_hand_computed() -> None:
    # 8/10, z = 1.96: centre = (0.8 + 1.96²/20) / (1 + 1.96²/10) = 0.99208 / 1.38416 = 0.716738,
    # half = 1.96·sqrt(0.8·0.2/10 + 1.96²/400) / 1.38416 = 1.96·0.160012 / 1.38416 = 0.226581.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490157, abs=1e-6)
    assert high == pytest.approx(0.943319, abs=1e-6)
    # 0/10: the upper end is (z²/n) / (1 + z²/n) = 0.38416 / 1.38416.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277540), abs=1e-6)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_acceptance_rate_vs_naive() -> None:
    torch.manual_seed(0)
    p = torch.randn(2, 5, 11).softmax(-1)
    q = torch.randn(2, 5, 11).softmax(-1)
    mask = torch.rand(2, 5) > 0.4
    naive = [sum(min(p[b, s, v].item(), q[b, s, v].item()) for v in range(11))
             for b in range(2) for s in range(5)]
    kept = [x for x, m in zip(naive, mask.flatten().tolist()) if m]
    assert float(acceptance_rate(p, q)) == pytest.approx(sum(naive) / len(naive), abs=1e-6)
    assert float(acceptance_rate(p, q, mask)) == pytest.approx(sum(kept) / len(kept), abs=1e-6)
    # β = 1 - TVD, and identical distributions are always accepted.
    tvd = 0.5 * (p - q).abs().sum(-1).mean()
    assert float(acceptance_rate(p, q)) == pytest.approx(1 - float(tvd), abs=1e-6)
    assert float(acceptance_rate(p, p)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        acceptance_rate(p, q[..., :5])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 0.999999])
@pytest.mark.parametrize("gamma", [0, 1, 4, 7])
def test_block_efficiency_vs_formula(alpha: float, gamma: int) -> None:
    expected = (1 - alpha ** (gamma + 1)) / (1 - alpha)
    assert block_efficiency(alpha, gamma) == pytest.approx(expected, rel=1e-6)


def test_block_efficiency_edges() -> None:
    assert block_efficiency(1.0, 4) == 5.0
    assert block_efficiency(torch.tensor(0.5), 2) == pytest.approx(1.75)
    assert math.isclose(block_efficiency(0.0, 3), 1.0)
    with pytest.raises(ValueError):
        block_efficiency(1.2, 3)
    with pytest.raises(ValueError):
        block_efficiency(0.5, -1)


def test_metric_loads_offline(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from llmkd.eval.metrics import available_metrics, load_metric

    assert "reasoning_accuracy" in available_metrics()
    metric = load_metric("reasoning_accuracy", cache_dir=str(tmp_path))
    out = metric.compute(predictions=["The answer is 42.", "(C)", "#### 1,234"],
                         references=["42", "7", "1234"])
    assert out["n"] == 3 and out["num_correct"] == 2 and out["correct"] == [True, False, True]
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx(wilson_interval(2, 3))
    assert metric.compute(predictions=["(C)"], references=["C"], kind="choice")["accuracy"] == 1.0
    with pytest.raises(ValueError, match="not shipped"):
        load_metric("accuracy")


@pytest.mark.parametrize("text, correct", [
    ("The answer is 4 + 8 + 4.", False),      # the question restated is not an answer
    ("The answer is 4 + 8 + 4 = 16.", True),  # the value after '=' is
    ("So the answer is 16.", True),
])
def test_unevaluated_expression_is_not_credited(text, correct):
    assert is_correct(text, "16", "numeric") is correct
