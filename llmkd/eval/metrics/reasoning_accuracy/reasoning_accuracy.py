"""`evaluate` metric: reasoning accuracy with a 95 % Wilson confidence interval.

Shipped inside llmkd and loaded by local path (`llmkd.eval.metrics.load_metric`), because
`evaluate.load("accuracy")` needs the hub. Correctness is decided by
`llmkd.eval.reasoning.is_correct`, so the metric and the per-example predictions agree.
"""
import datasets
import evaluate

from llmkd.data.answers import KINDS, is_correct, wilson_interval

_DESCRIPTION = """Fraction of model responses whose final answer matches the gold answer
(numeric via math-verify, multiple-choice letters, yes/no, or exact normalised text), with a
Wilson score interval."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): model responses (or already extracted answers).
    references (list of str): gold answers.
    kind (str): "numeric" | "choice" | "yesno" | "exact" (default "numeric").
    z (float): normal quantile of the interval (default 1.96, i.e. 95 %).
Returns:
    accuracy, ci_low, ci_high (floats), n, num_correct (ints), correct (list of bool, per example).
Example:
    >>> metric = load_metric("reasoning_accuracy")
    >>> metric.compute(predictions=["The answer is 42."], references=["42"])["accuracy"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReasoningAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, kind="numeric", z=1.96):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is unknown; use one of {KINDS}")
        correct = [is_correct(p, r, kind) for p, r in zip(predictions, references)]
        n, k = len(correct), sum(correct)
        low, high = wilson_interval(k, n, z)
        return {"accuracy": k / n if n else 0.0, "ci_low": low, "ci_high": high,
                "n": n, "num_correct": k, "correct": correct}
