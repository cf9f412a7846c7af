"""Verifiers (seed §2): rewards computed by checking the answer, not by a model.

Each verifier returns a :class:`Verdict`, a score with a short reason ("correct", "wrong",
"no_answer", "unparsable", …) that :class:`tether.rewards.RewardSet` counts in the metrics, so a
run shows *why* its rewards are what they are. Registered as reward functions (``reward=math``,
``qa_em``, ``qa_f1``, ``format``) reading the reference from the row's metadata (``answer``, or
``answers`` for several).
"""

from __future__ import annotations

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


# ---------------------------------------------------------------------------------------------
# Maths: the math-verify package (LaTeX, fractions, equivalent forms, the boxed or last answer)
# ---------------------------------------------------------------------------------------------
def math_equal(completion: str, answer: str) -> Verdict:
    """1.0 when the completion's final answer (``\\boxed{…}`` if present, else the last expression)
    equals ``answer`` mathematically: 1/2, 0.5 and \\frac{1}{2} are one value."""
    from math_verify import parse, verify

    gold = parse(str(answer)) or parse(f"${answer}$")
    if not gold:
        return Verdict(0.0, "unparsable_reference")
    pred = parse(completion)
    if not pred:
        return Verdict(0.0, "no_answer")
    return Verdict(1.0, "correct") if verify(gold, pred) else Verdict(0.0, "wrong")


def final_number_equal(completion: str, answer: str | int) -> Verdict:
    """The arithmetic world's check: the completion's last integer equals ``answer``."""
    from .arith import extract_answer

    got = extract_answer(completion)
    if got is None:
        return Verdict(0.0, "no_answer")
    return Verdict(1.0, "correct") if got == int(answer) else Verdict(0.0, "wrong")


# ---------------------------------------------------------------------------------------------
# QA: exact match and token F1 with the SQuAD normalisation (Rajpurkar et al. 2016)
# ---------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def qa_exact_match(prediction: str, answers: str | Sequence[str]) -> Verdict:
    golds = [answers] if isinstance(answers, str) else list(answers)
    hit = any(normalize_answer(prediction) == normalize_answer(g) for g in golds)
    return Verdict(1.0, "correct") if hit else Verdict(0.0, "wrong")


def qa_f1(prediction: str, answers: str | Sequence[str]) -> Verdict:
    """Best token-level F1 against any reference: 2PR/(P+R) over normalised tokens (multiset overlap)."""
    golds = [answers] if isinstance(answers, str) else list(answers)
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
def _answers(meta: dict[str, Any]) -> Any:
    if "answers" in meta:
        return meta["answers"]
    return meta["answer"]


def math_reward(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> list[Verdict]:
    return [math_equal(extract_tagged(c), str(m["answer"])) for c, m in zip(completions, metadata)]


def qa_em_reward(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> list[Verdict]:
    return [qa_exact_match(extract_tagged(c), _answers(m)) for c, m in zip(completions, metadata)]


def qa_f1_reward(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> list[Verdict]:
    return [qa_f1(extract_tagged(c), _answers(m)) for c, m in zip(completions, metadata)]


def format_reward(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> list[Verdict]:
    return [format_ok(c, m.get("format", ANSWER_TAG)) for c, m in zip(completions, metadata)]


# ---------------------------------------------------------------------------------------------
# Code: run the completion against the row's tests in the sandbox (tether.sandbox)
# ---------------------------------------------------------------------------------------------
_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)
_POOL = None


def extract_code(completion: str) -> str:
    """The last fenced code block of the completion, or the whole completion when there is none."""
    blocks = _CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def code_reward(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> list[Verdict]:
    """The fraction of ``metadata["tests"]`` (Python statements such as ``assert f(2) == 4``) that
    the completion's code passes, run in parallel sandboxes. A sandbox failure is not a wrong answer:
    its score is NaN, so the reward set's invalid-score policy applies (reason ``error``)."""
    global _POOL
    from .sandbox import SandboxPool

    if _POOL is None:
        _POOL = SandboxPool(workers=max(1, min(8, os.cpu_count() or 1)))
    results = _POOL.map([(extract_code(c), list(m["tests"])) for c, m in zip(completions, metadata)])
    return [Verdict(float("nan") if r.status == "error" else r.score, r.status) for r in results]
