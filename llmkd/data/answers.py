"""Final-answer extraction and checking, as a grader would score them (no model, no data: a leaf
that recipes, generation and evaluation all use).

Answer kinds (a recipe's `answer_kind`):
- ``numeric``: numbers and LaTeX math, checked with math-verify (``1,234`` = ``1234``,
  ``3/4`` = ``0.75`` = ``\\frac{3}{4}``), with a plain float/fraction fallback;
- ``choice``: option labels such as ``(C)`` (math-verify does not read these, so by hand);
- ``yesno``: yes/no and true/false (the same polarity: ``true`` counts as ``yes``);
- ``exact``: normalised string equality (case, surrounding punctuation and spaces ignored).

Extraction looks, in order, at the last ``\\boxed{...}``, the last ``####``, the last "answer
is"/"answer:" marker, and only then at the whole text (last number for ``numeric``), so that a
model that states its answer and keeps talking is scored on what it stated. Numeric answers are
credited only as a grader would: an unevaluated expression ("4 + 8 + 4") or a compound quantity
("7 hours 30 minutes") is not a number; "−7" (Unicode minus), "1e3" and "3 1/2" (= 7/2) are.
"""
from __future__ import annotations

import math
import re
import threading
from decimal import Decimal
from fractions import Fraction

KINDS = ("numeric", "choice", "yesno", "exact")

_MARKER = re.compile(r"(?:answer\s*(?:is|was|would be|:)|####)\s*:?", re.IGNORECASE)
# a mixed number "3 1/2" (whole part, then a proper fraction), else a plain number: 1,234.5, 1e3, 3/4
_NUMBER = re.compile(r"(?<![\d.,/])-?\d+ +\d+ */ *\d+(?![\d/])"
                     r"|-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_MIXED = re.compile(r"(-?)(\d+) +(\d+) */ *(\d+)")
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-"})
# an operand of an arithmetic operator: the number is part of an unevaluated expression
_OPERATOR = r"(?:[-+*/×·^]|\\times|\\cdot)"
_OPERAND_BEFORE = re.compile(rf"[\d)]\s*{_OPERATOR}\s*$")
_OPERAND_AFTER = re.compile(rf"\s*{_OPERATOR}\s*[(\d]")
# "7 hours 30 minutes": the last number is only part of a quantity in mixed units
_UNIT = (r"(?:years?|months?|weeks?|days?|hours?|hrs?|minutes?|mins?|seconds?|secs?|miles?|"
         r"yards?|yds?|feet|foot|ft|inch(?:es)?|(?:kilo|centi|milli)?met(?:er|re)s?|km|cm|mm|"
         r"pounds?|lbs?|ounces?|oz|(?:kilo)?grams?|kg|dollars?|cents?|gallons?|quarts?|pints?|"
         r"cups?|(?:milli)?lit(?:er|re)s?|ml)")
_COMPOUND_BEFORE = re.compile(rf"\d\s*{_UNIT}\b\.?\s*(?:,\s*|and\s+)?$", re.IGNORECASE)
_YES = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
_YESNO_WORD = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
_LABEL = r"[A-Z]|[1-9]"
_PAREN_LABEL = re.compile(rf"\(\s*({_LABEL})\s*\)")
_BARE_LABEL = re.compile(rf"^\W*?({_LABEL})(?:[.):,\s]|$)")          # after a marker
_LEADING_LABEL = re.compile(rf"^\s*\(?({_LABEL})(?:\)|\.(?:\s|$)|\s*$)")  # "C", "(C) ...", "C. ..."
_EDGE_PUNCT = " \t\n.,;:!?\"'`*"


# -- extraction -------------------------------------------------------------------------------
def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...}, with nested braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: the model was cut off inside the box


def _after_last_marker(text: str) -> str | None:
    """The text after the last answer marker, up to the end of that line."""
    hits = list(_MARKER.finditer(text))
    if not hits:
        return None
    rest = text[hits[-1].end():].strip()
    return rest.split("\n", 1)[0].strip() or None


# two operands joined by an operator (a plain fraction like 3/4 is a value, not an expression)
_EXPRESSION = re.compile(r"\d\s*[-+*×·]\s*-?\d|\d\s*/\s*\d+\s*[-+*/×·]")


def _first_sentence(segment: str) -> str:
    """Cut 'answer is 42. Next, ...' at the sentence end (a '.' that is not a decimal point)."""
    return re.split(r"\.(?:\s|$)", segment, maxsplit=1)[0].strip()


def _mv_timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which only the main thread may set."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def _mv_parse(text: str) -> list:
    from math_verify import parse

    try:
        return parse(text, parsing_timeout=_mv_timeout())
    except Exception:  # math-verify raises on odd LaTeX; treat as "nothing parsed"
        return []


def _rewritten(number: str) -> str | None:
    """A mixed number as a fraction ("3 1/2" -> "7/2"), scientific notation as a decimal ("1e3"
    -> "1000"); None for other numbers. math-verify misreads both ("3 1/2" as 3 * 1/2, "1e3" as 1)."""
    number = number.replace(",", "")
    if m := _MIXED.fullmatch(number):
        value = int(m[2]) + Fraction(int(m[3]), int(m[4]))
        return str(-value if m[1] else value)
    if "e" in number.lower():
        return format(Decimal(number).normalize(), "f")
    return None


def _stated_number(segment: str) -> tuple[str | None, bool]:
    """(the segment's last plain number, whether a grader would accept it as the answer).

    Not accepted: an operand of an unevaluated expression ("4 + 8 + 4" states no value, and its
    last 4 is not one) or part of a mixed-unit quantity ("7 hours 30 minutes" is not 30).
    """
    matches = list(_NUMBER.finditer(segment))
    if not matches:
        return None, True
    m = matches[-1]
    start, number = m.start(), m.group()
    if mixed := _MIXED.fullmatch(number):
        if not 0 < int(mixed[3]) < int(mixed[4]):   # "10 12/5" is 10, then 12/5: not mixed
            fraction = re.search(r"\d+ */ *\d+$", number)
            start, number = start + fraction.start(), fraction.group()
    before, after = segment[:start], segment[m.end():]
    operand = (_OPERAND_BEFORE.search(before) or _OPERAND_AFTER.match(after)
               or (number.startswith("-") and re.search(r"[\d)]\s*$", before)))
    if operand or _COMPOUND_BEFORE.search(before):
        return None, False
    return number, True


def _numeric_from(segment: str) -> str | None:
    """A value from a short segment: math-verify first, then the last plain number.

    An unevaluated expression ("4 + 8 + 4", often the question restated) is not an answer:
    math-verify would evaluate it and credit the model with arithmetic it never did, and its
    last number is not the answer either. What follows the last "=" is the stated value
    ("4 + 8 = 12" states 12).
    """
    if "=" in segment:
        segment = segment.rsplit("=", 1)[1]
    number, accepted = _stated_number(segment)
    if not accepted:
        return None
    if number is not None and (rewritten := _rewritten(number)) is not None:
        return rewritten
    parsed = _mv_parse(segment if "$" in segment or "\\" not in segment else f"${segment}$")
    if len(parsed) >= 2 and (value := str(parsed[1]).strip()) and not _EXPRESSION.search(value):
        return value
    return None if number is None else number.replace(",", "").replace(" ", "")


def extract_answer(text: str | None, kind: str = "numeric") -> str | None:
    """The final answer stated in a model response, as a short string; None when there is none.

    Idempotent on its own output, so `is_correct` may be given a raw response or an extracted
    answer alike.
    """
    if kind not in KINDS:
        raise ValueError(f"answer kind {kind!r} is unknown; use one of {KINDS}")
    if not text or not text.strip():
        return None
    if kind == "numeric":
        text = text.translate(_MINUS)   # "−7" (U+2212) is -7, not 7
    boxed = _last_boxed(text)
    marked = boxed if boxed is not None else _after_last_marker(text)
    if kind == "numeric":
        if boxed is not None:
            return _numeric_from(boxed)
        if marked is not None and (value := _numeric_from(_first_sentence(marked))) is not None:
            return value
        return _numeric_from(text)
    if kind == "choice":
        if marked is not None and (m := _PAREN_LABEL.search(marked) or _BARE_LABEL.match(marked)):
            return m.group(1)
        if m := _LEADING_LABEL.match(text):
            return m.group(1)
        labels = _PAREN_LABEL.findall(text)
        return labels[-1] if labels else None
    if kind == "yesno":
        if marked and (m := _YESNO_WORD.search(marked)):
            return _YES[m.group(1).lower()]
        words = _YESNO_WORD.findall(text)
        if not words:
            return None
        first = _YESNO_WORD.match(text.strip(_EDGE_PUNCT))  # "No, because ..." answers up front
        return _YES[(first.group(1) if first else words[-1]).lower()]
    # exact
    segment = _first_sentence(marked) if marked is not None else text.strip().split("\n")[-1]
    return _normalise_exact(segment) or None


def _normalise_exact(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    return " ".join(text.strip(_EDGE_PUNCT).lower().split())


# -- verification -----------------------------------------------------------------------------
def _as_fraction(text: str) -> Fraction | None:
    """A plain number ('1,234.5', '$12', '3/4', '50%') as an exact fraction, else None."""
    t = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    scale = Fraction(1, 100) if t.endswith("%") else Fraction(1)
    try:
        return Fraction(t.rstrip("%")) * scale
    except (ValueError, ZeroDivisionError):
        return None


def _numeric_equal(pred: str, gold: str) -> bool:
    from math_verify import verify

    pred, gold = pred.translate(_MINUS), gold.translate(_MINUS)
    gold_parsed, pred_parsed = _mv_parse(f"\\boxed{{{gold}}}"), _mv_parse(f"\\boxed{{{pred}}}")
    if gold_parsed and pred_parsed:
        try:
            if verify(gold_parsed, pred_parsed, timeout_seconds=_mv_timeout()):
                return True
        except Exception:  # fall through to the plain comparison
            pass
    a, b = _as_fraction(pred), _as_fraction(gold)
    if a is not None and b is not None:
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    return _normalise_exact(pred) == _normalise_exact(gold)


def is_correct(prediction: str | None, gold: str, kind: str = "numeric") -> bool:
    """Whether a response (or an already extracted answer) states the gold answer."""
    answer = extract_answer(prediction, kind)
    if answer is None:
        return False
    if kind == "numeric":
        return _numeric_equal(answer, str(gold))
    if kind == "choice":
        return answer == str(gold).strip().strip("()").strip().upper()
    if kind == "yesno":
        return answer == _YES.get(str(gold).strip(_EDGE_PUNCT).lower())
    return answer == _normalise_exact(str(gold))


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials: honest at small n and at 0 % / 100 %."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
