"""Verifiers (seed §2): rewards computed by checking the answer, not by a model.

Each verifier returns a :class:`Verdict`, a score with a short reason ("correct", "wrong",
"no_answer", "unparsable", …) that :class:`tether.rewards.RewardSet` counts in the metrics, so a
run shows *why* its rewards are what they are. Registered as reward functions (``reward=math``,
``qa_em``, ``qa_f1``, ``format``, ``code``) reading the reference from the row's metadata (``answer``,
or ``answers`` for several; ``tests`` for code).

A sample whose reference is missing or unusable (no ``answer``, ``None``, an empty list, a reference
the checker cannot read, no ``tests``) gets a NaN score with a reason (``no_reference``,
``unparsable_reference``, ``no_tests``, ``bad_tests``): that is the reward set's invalid-score path
(counted in ``reward/<name>/invalid``, then the ``fallback`` or ``drop`` policy), never a 0 ("wrong",
a label error taught to the policy) nor a 1 (a reward for nothing), and never an exception that
would invalidate the whole batch.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Verdict:
    score: float
    reason: str

    def __float__(self) -> float:
        return self.score


def _invalid(reason: str) -> Verdict:
    """A sample the verifier cannot score: NaN, so RewardSet counts it as invalid (module docstring)."""
    return Verdict(math.nan, reason)


# ---------------------------------------------------------------------------------------------
# References: the gold answers of a row
# ---------------------------------------------------------------------------------------------
def gold_answers(value: Any) -> list[str]:
    """``value`` as a list of non-blank gold answer strings (empty when it holds none). A scalar is
    one answer: a string, or a number through ``str()`` (``{"answer": 42}``, as JSON loaders type it);
    a list or tuple is several; a SQuAD-style ``{"text": [...], ...}`` is its texts. ``None``, NaN (a
    pandas/parquet null), blank strings and anything else are no answer: a reference that is not there
    must not be scored against (``list(42)`` raised and invalidated the whole batch; ``str(None)`` made
    "None" the answer)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, numbers.Number):
        return [] if isinstance(value, float) and math.isnan(value) else [str(value)]
    if isinstance(value, dict):
        return gold_answers(value.get("text"))
    if isinstance(value, (list, tuple)):
        return [g for v in value for g in gold_answers(v)]
    return []


def reference_answers(meta: dict[str, Any], keys: Sequence[str] = ("answers", "answer")) -> list[str] | None:
    """The gold answers of a row: those of the first of ``keys`` that holds any (:func:`gold_answers`),
    or None when none does (the sample is then invalid, not wrong)."""
    for key in keys:
        golds = gold_answers(meta.get(key))
        if golds:
            return golds
    return None


# ---------------------------------------------------------------------------------------------
# Maths: the math-verify package (LaTeX, fractions, equivalent forms, the boxed or last answer)
# ---------------------------------------------------------------------------------------------
def math_equal(completion: str, answer: str | int | float | Sequence[str] | None) -> Verdict:
    """1.0 when the completion's final answer (``\\boxed{…}`` if present, else the last expression)
    equals ``answer`` mathematically: 1/2, 0.5 and \\frac{1}{2} are one value."""
    from math_verify import LatexExtractionConfig, parse, verify

    golds = gold_answers(answer)
    if not golds:
        return _invalid("no_reference")
    if len(golds) > 1:  # several references: the best verdict (correct against any of them)
        return max((math_equal(completion, g) for g in golds), key=lambda v: -1.0 if math.isnan(v.score) else v.score)
    gold = parse(golds[0]) or parse(f"${golds[0]}$")
    if not gold:  # a label math-verify cannot read says nothing about the completion
        return _invalid("unparsable_reference")
    pred = parse(completion)
    if not pred:
        return Verdict(0.0, "no_answer")
    if _UNEVALUATED.search(pred[1]) and not parse(completion, extraction_config=[LatexExtractionConfig()]):
        # plain text whose last expression is a sum or product ("41 + 31 =", the question restated): an
        # answer is a value, and math-verify would evaluate it into the right one
        return Verdict(0.0, "no_answer")
    return Verdict(1.0, "correct") if verify(gold, pred) else Verdict(0.0, "wrong")


# a binary +, -, * or × between two operands (a fraction a/b and a leading minus are values)
_UNEVALUATED = re.compile(r"[\w.)]\s*[-+*×]\s*[\w.(]")


def final_number_equal(completion: str, answer: str | int | float | None) -> Verdict:
    """The arithmetic world's check: the completion's last integer equals ``answer``. A missing answer
    (``None``) or one that is not a whole number (``"7.5"``, ``"seven"``) is invalid for this sample
    alone (``int(None)`` raised and invalidated the whole batch)."""
    from .arith import extract_answer

    gold = whole_number(answer)
    if gold is None:
        return _invalid("no_reference" if not gold_answers(answer) else "unparsable_reference")
    got = extract_answer(completion)
    if got is None:
        return Verdict(0.0, "no_answer")
    return Verdict(1.0, "correct") if got == gold else Verdict(0.0, "wrong")


def whole_number(answer: Any) -> int | None:
    """``answer`` as an int when it is a whole number (7, 7.0, " 7", "7.0"), else None (7.5 is not 7)."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, numbers.Integral):
        return int(answer)
    if isinstance(answer, numbers.Real):
        x = float(answer)
    elif isinstance(answer, str):
        try:
            return int(answer.strip())
        except ValueError:
            pass
        try:
            x = float(answer)
        except ValueError:
            return None
    else:
        return None
    return int(x) if math.isfinite(x) and x.is_integer() else None


# ---------------------------------------------------------------------------------------------
# QA: exact match and token F1 with the SQuAD normalisation (Rajpurkar et al. 2016)
# ---------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def qa_exact_match(prediction: str, answers: str | int | float | Sequence[str] | None) -> Verdict:
    """1.0 when the normalised prediction equals any normalised reference. ``answers``: one answer
    (a string or a number) or several; none at all is invalid (:func:`gold_answers`)."""
    golds = gold_answers(answers)
    if not golds:
        return _invalid("no_reference")
    hit = any(normalize_answer(prediction) == normalize_answer(g) for g in golds)
    return Verdict(1.0, "correct") if hit else Verdict(0.0, "wrong")


def qa_f1(prediction: str, answers: str | int | float | Sequence[str] | None) -> Verdict:
    """Best token-level F1 against any reference: 2PR/(P+R) over normalised tokens (multiset overlap).
    ``answers`` as in :func:`qa_exact_match`; none at all is invalid."""
    golds = gold_answers(answers)
    if not golds:
        return _invalid("no_reference")
    pred = normalize_answer(prediction).split()
    best = 0.0
    for g in golds:
        gold = normalize_answer(g).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return Verdict(best, "exact" if best == 1.0 else ("partial" if best > 0 else "no_overlap"))


# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------
ANSWER_TAG = r"<answer>.+?</answer>"


def format_ok(completion: str, pattern: str = ANSWER_TAG) -> Verdict:
    """1.0 when the completion contains ``pattern`` (a regex; by default an ``<answer>…</answer>`` tag)."""
    return Verdict(1.0, "ok") if re.search(pattern, completion, re.DOTALL) else Verdict(0.0, "missing")


def extract_tagged(completion: str, tag: str = "answer") -> str:
    """The content of the last ``<tag>…</tag>``, or the whole completion when there is none."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", completion, re.DOTALL)
    return found[-1].strip() if found else completion


# ---------------------------------------------------------------------------------------------
# As reward functions: r(prompts, completions, metadata) → verdicts
# ---------------------------------------------------------------------------------------------
# Each reads its row's reference with reference_answers, so a row without one is invalid on its own
# (a missing key used to raise KeyError, invalidating every sample of the batch).
def math_reward(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> list[Verdict]:
    return [math_equal(extract_tagged(c), reference_answers(m, ("answer",))) for c, m in zip(completions, metadata)]


def qa_em_reward(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> list[Verdict]:
    return [qa_exact_match(extract_tagged(c), reference_answers(m)) for c, m in zip(completions, metadata)]


def qa_f1_reward(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> list[Verdict]:
    return [qa_f1(extract_tagged(c), reference_answers(m)) for c, m in zip(completions, metadata)]


def format_reward(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> list[Verdict]:
    """The row's own pattern (a ``format`` column: a regular expression) or :data:`ANSWER_TAG`; a row
    whose pattern is not a string, or not a valid expression, is invalid on its own (``bad_format``)."""
    out = []
    for c, m in zip(completions, metadata):
        pattern = m.get("format")
        pattern = ANSWER_TAG if pattern is None else pattern
        try:
            out.append(format_ok(c, pattern) if isinstance(pattern, str) else _invalid("bad_format"))
        except re.error:
            out.append(_invalid("bad_format"))
    return out


# ---------------------------------------------------------------------------------------------
# Code: run the completion against the row's tests in the sandbox (tether.sandbox)
# ---------------------------------------------------------------------------------------------
_CODE_BLOCK = re.compile(r"```[\w+-]*[ \t]*\n(.*?)```", re.DOTALL)  # any language tag: python3, Python, py…
_POOL = None


def extract_code(completion: str) -> str:
    """The last fenced code block of the completion; else, where the completion only closes a fence
    (its prompt opened it, as ``examples/grpo_code.yaml``'s do), what comes before the closing fence;
    else the whole completion."""
    blocks = _CODE_BLOCK.findall(completion)
    if blocks:
        return blocks[-1]
    head, fence, _ = completion.partition("```")
    return head if fence else completion


def code_tests(meta: dict[str, Any]) -> list[str] | Verdict:
    """The row's ``tests`` as a list of Python statements, or the invalid verdict saying why there are
    none to run. One string is one test (``list("assert f(2) == 4")`` made each character a "test");
    a missing key, ``None``, an empty list or blank strings are ``no_tests`` (an empty list scored 1.0
    for any code that loaded: a reward for nothing, which a policy learns to exploit), and anything but
    strings is ``bad_tests``."""
    tests = meta.get("tests")
    if isinstance(tests, str):
        tests = [tests]
    if tests is None:
        return _invalid("no_tests")
    if not isinstance(tests, (list, tuple)) or not all(isinstance(t, str) for t in tests):
        return _invalid("bad_tests")
    tests = [t for t in tests if t.strip()]
    return tests if tests else _invalid("no_tests")


def code_reward(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> list[Verdict]:
    """The fraction of ``metadata["tests"]`` (Python statements such as ``assert f(2) == 4``; one
    string is one test) that the completion's code passes, run in parallel sandboxes. A sandbox
    failure is not a wrong answer: its score is NaN, so the reward set's invalid-score policy applies
    (reason ``error``); so is a row without tests (:func:`code_tests`), which never reaches a sandbox."""
    global _POOL
    from .sandbox import SandboxPool

    out: list[Verdict | None] = [None] * len(completions)
    jobs, where = [], []
    for i, (c, m) in enumerate(zip(completions, metadata)):
        tests = code_tests(m)
        if isinstance(tests, Verdict):
            out[i] = tests
        else:
            jobs.append((extract_code(c), tests))
            where.append(i)
    if jobs:
        if _POOL is None:
            _POOL = SandboxPool(workers=max(1, min(8, os.cpu_count() or 1)))
        for i, r in zip(where, _POOL.map(jobs)):
            out[i] = Verdict(float("nan") if r.status == "error" else r.score, r.status)
    return out  # type: ignore[return-value]  # every slot is filled above
