"""The arithmetic world: tether's embedded, offline default task.

Prompts such as ``"Question: What is 41 + 31?\\nAnswer:"`` with exact answers. Everything here is a
pure function of its arguments and a seed, so every machine builds the same data:

* :func:`problem_space` and :func:`is_held_out` split problems into train and held-out by a hash
  of the problem itself, so the split does not depend on the seed or on how many rows are drawn.
* :func:`sft_rows` / :func:`eval_rows` give prompt/completion rows for SFT and ``{prompt, answer}``
  rows for evaluation; :func:`pretrain_corpus` gives the raw text the tokenizer and the
  pretraining stage see (held-out problems never appear in it).
* :func:`extract_answer` / :func:`exact_match` are the verifier that accuracy (and, later, the
  verifiable reward) is computed with.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field

PROMPT_TEMPLATE = "Question: What is {a} {op} {b}?\nAnswer:"
OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}


class ArithSpec(BaseModel):
    """Difficulty of the arithmetic world."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_operand: int = Field(49, ge=1, description="largest operand of + and -")
    mul_max_operand: int = Field(12, ge=1, description="largest operand of *")
    ops: str = Field("+-*", pattern=r"^[+\-*]+$", description="operators to draw from")
    held_out_fraction: float = Field(0.1, gt=0, lt=1, description="share of problems kept for evaluation")


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        if self.op == "+":
            return self.a + self.b
        if self.op == "-":
            return self.a - self.b
        return self.a * self.b

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(a=self.a, op=self.op, b=self.b)

    @property
    def completion(self) -> str:
        """The worked answer the SFT stage teaches: the equation restated, then the result."""
        return f" {self.a} {self.op} {self.b} = {self.answer}"


def is_held_out(p: Problem, fraction: float) -> bool:
    """Deterministic split by a hash of the problem (stable across seeds, processes, machines)."""
    h = hashlib.sha256(f"{p.a}{p.op}{p.b}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


@lru_cache(maxsize=8)
def problem_space(spec: ArithSpec) -> tuple[tuple[Problem, ...], tuple[Problem, ...]]:
    """All problems of ``spec`` as ``(train, held_out)``; subtraction keeps results non-negative."""
    problems: list[Problem] = []
    for op in dict.fromkeys(spec.ops):  # de-duplicated, order kept
        hi = spec.mul_max_operand if op == "*" else spec.max_operand
        lo = 2 if op == "*" else 0
        for a in range(lo, hi + 1):
            for b in range(lo, (a if op == "-" else hi) + 1):
                problems.append(Problem(a, op, b))
    train = tuple(p for p in problems if not is_held_out(p, spec.held_out_fraction))
    held = tuple(p for p in problems if is_held_out(p, spec.held_out_fraction))
    return train, held


def sample_problems(spec: ArithSpec, n: int, seed: int, split: str = "train") -> list[Problem]:
    """``n`` problems drawn with replacement. Training draws make each operator equally likely
    (multiplication has a much smaller space than addition and would otherwise be rare); held-out
    draws weigh every held-out problem equally, as :func:`eval_rows` does, so that an evaluation
    measures the same distribution as greedy accuracy and is not decided by the few held-out
    products (9 of the default world's 388 held-out problems would otherwise carry a third of it)."""
    train, held = problem_space(spec)
    rng = random.Random(f"arith-{split}-{seed}")
    if split != "train":
        return [rng.choice(held) for _ in range(n)]
    by_op: dict[str, list[Problem]] = {}
    for p in train:
        by_op.setdefault(p.op, []).append(p)
    ops = sorted(by_op)
    return [rng.choice(by_op[rng.choice(ops)]) for _ in range(n)]


def sft_rows(spec: ArithSpec, n: int, seed: int) -> list[dict[str, str]]:
    """Prompt/completion rows of training problems."""
    return [{"prompt": p.prompt, "completion": p.completion} for p in sample_problems(spec, n, seed)]


def eval_rows(spec: ArithSpec, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct held-out problems as ``{prompt, answer}`` (all of them if fewer exist)."""
    _, held = problem_space(spec)
    rng = random.Random(f"arith-eval-{seed}")
    chosen = rng.sample(list(held), min(n, len(held)))
    return [{"prompt": p.prompt, "answer": str(p.answer)} for p in chosen]


def corrupt(p: Problem, rng: random.Random) -> tuple[str, str]:
    """A plausible wrong answer to ``p`` and its kind: a wrong result (most often), an answer cut
    before its result, or an over-long answer that rambles on to a wrong number."""
    kind = rng.choices(["wrong_result", "truncated", "overlong"], weights=(6, 1, 1))[0]
    wrong = p.answer + rng.choice([-1, 1]) * rng.randint(1, 10)
    if wrong < 0:
        wrong = p.answer + rng.randint(1, 10)
    if kind == "wrong_result":
        return f" {p.a} {p.op} {p.b} = {wrong}", kind
    if kind == "truncated":
        return f" {p.a} {p.op} {p.b} =", kind
    return f" {p.a} {p.op} {p.b} = {p.answer} {p.op} {p.b} = {wrong}", kind


def preference_rows(spec: ArithSpec, n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    """Preference pairs ``{prompt, chosen, rejected, kind}``: the correct worked answer against a
    corruption of it (:func:`corrupt`)."""
    rng = random.Random(f"arith-prefs-{split}-{seed}")
    rows = []
    for p in sample_problems(spec, n, seed + 7919, split):
        rejected, kind = corrupt(p, rng)
        rows.append({"prompt": p.prompt, "chosen": p.completion, "rejected": rejected, "kind": kind})
    return rows


ATTRIBUTES = ("correctness", "conciseness")


def rate(p: Problem, completion: str, kind: str) -> dict[str, int]:
    """Ratings on a 0-4 scale: correctness (4 correct; 2 off by at most 2; 1 otherwise wrong;
    0 no result) and conciseness (4 the worked answer; 2 cut short; 1 rambling)."""
    if kind == "correct":
        return {"correctness": 4, "conciseness": 4}
    if kind == "truncated":
        return {"correctness": 0, "conciseness": 2}
    got = extract_answer(completion)
    close = got is not None and abs(got - p.answer) <= 2
    return {"correctness": 2 if close else 1, "conciseness": 1 if kind == "overlong" else 4}


def rating_rows(spec: ArithSpec, n: int, seed: int, split: str = "train") -> list[dict]:
    """``{prompt, completion, ratings}`` rows: half correct worked answers, half corruptions."""
    rng = random.Random(f"arith-ratings-{split}-{seed}")
    rows = []
    for p in sample_problems(spec, n, seed + 1299709, split):
        completion, kind = (p.completion, "correct") if rng.random() < 0.5 else corrupt(p, rng)
        rows.append({"prompt": p.prompt, "completion": completion, "ratings": rate(p, completion, kind)})
    return rows


_INT = re.compile(r"-?\d+")


def extract_answer(completion: str) -> int | None:
    """The final answer of a completion: the last integer it contains, or None."""
    found = _INT.findall(completion)
    return int(found[-1]) if found else None


def exact_match(completion: str, answer: str | int) -> bool:
    got = extract_answer(completion)
    return got is not None and got == int(answer)


# --------------------------------------------------------------------------------------------
# Pretraining corpus: arithmetic facts in several phrasings plus English-like filler text, so
# the tokenizer learns words and the model learns numbers before it ever sees the Q/A format.
# --------------------------------------------------------------------------------------------
_SUBJECTS = ["The cat", "A small dog", "My friend", "The teacher", "A young girl", "The old man",
             "Our team", "The bird", "A farmer", "The student", "Her brother", "The robot"]
_VERBS = ["walks to", "looks at", "reads about", "thinks about", "runs past", "talks with",
          "waits near", "builds", "paints", "finds", "carries", "counts"]
_OBJECTS = ["the river", "a red house", "the green field", "a long book", "the market",
            "a tall tree", "the quiet school", "a blue box", "the city park", "some apples",
            "the bright window", "a wooden bridge"]
_ADVERBS = ["slowly", "every morning", "after lunch", "with care", "in the rain", "today",
            "at night", "once again", "very quietly", "before dinner"]
_SYLLABLE_ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v",
                    "w", "z", "br", "ch", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "oo", "ou"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]


def _pseudo_words(rng: random.Random, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        k = rng.choice([1, 1, 2, 2, 2, 3])
        w = "".join(rng.choice(_SYLLABLE_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(k))
        if 2 <= len(w) <= 12:
            words.add(w)
    return sorted(words)


def _sentence(rng: random.Random, lexicon: list[str]) -> str:
    if rng.random() < 0.5:
        return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ADVERBS)}."
    return "The " + " ".join(rng.choice(lexicon) for _ in range(rng.randint(4, 10))) + "."


def _fact(rng: random.Random, p: Problem) -> str:
    """One arithmetic fact in one of several phrasings (never the exact SFT Q/A format)."""
    style = rng.choices(range(4), weights=(6, 2, 1, 1))[0]  # mostly the compact form: most facts per token
    if style == 0:
        return f"{p.a} {p.op} {p.b} = {p.answer}"
    if style == 1:
        return f"{p.a} {OP_WORDS[p.op]} {p.b} is {p.answer}."
    if style == 2:
        return f"Question: What is {p.a} {p.op} {p.b}? The answer is {p.answer}."
    return f"Answer: we know that {p.a} {p.op} {p.b} = {p.answer}, so the result is {p.answer}."


def pretrain_corpus(spec: ArithSpec, n_facts: int, n_sentences: int, seed: int) -> list[str]:
    """Lines of raw text: ``n_facts`` arithmetic facts about *training* problems and
    ``n_sentences`` lines of English-like text, shuffled together."""
    rng = random.Random(f"arith-corpus-{seed}")
    lexicon = _pseudo_words(rng, 4000)
    lines = [_fact(rng, p) for p in sample_problems(spec, n_facts, seed, "train")]
    lines += [" ".join(_sentence(rng, lexicon) for _ in range(rng.randint(1, 3))) for _ in range(n_sentences)]
    rng.shuffle(lines)
    return lines


# --------------------------------------------------------------------------------------------
# Code tasks: the same problems as functions to write, checked by running tests (tether.sandbox)
# --------------------------------------------------------------------------------------------
_OP_NAMES = {"+": "add", "-": "subtract", "*": "multiply"}


def code_rows(spec: ArithSpec, n: int, seed: int) -> list[dict]:
    """``{prompt, tests}`` rows: write ``f(a, b)`` for an operation, checked on a few held-out
    operand pairs. A tiny task for the whole path of a code reward (rollout → sandbox → update)."""
    rng = random.Random(f"arith-code-{seed}")
    rows = []
    for _ in range(n):
        op = rng.choice(spec.ops)
        name = _OP_NAMES[op]
        cases = [(rng.randint(0, spec.max_operand), rng.randint(0, spec.max_operand)) for _ in range(3)]
        tests = [f"assert {name}({a}, {b}) == {eval(f'{a} {op} {b}')}" for a, b in cases]  # noqa: S307 - our own digits
        rows.append({"prompt": f"Write a Python function {name}(a, b) that returns a {op} b.\n```python\n",
                     "tests": tests})
    return rows
