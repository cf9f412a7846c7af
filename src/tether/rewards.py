"""The reward interface of online RL (seed §2-§4): r(prompts, completions, metadata) → one float per
sample, composable with weights.

A reward function is any callable with that signature; it may return ``None`` (or NaN / inf) for a
sample it cannot score, or raise. :class:`RewardSet` turns those into a documented policy so a run
never dies or learns from garbage because of one bad score:

* ``on_invalid="fallback"`` (default): the sample gets ``fallback`` (0.0) from that function;
* ``on_invalid="drop"``: the sample is dropped: its total reward is NaN, the trainers give it zero
  advantage and zero loss weight, and group statistics are computed without it.

A function that raises counts every sample of the call as invalid. Every invalid score is counted in
the metrics (``reward/<name>/invalid``), with each function's mean, so a user sees it happening.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from . import verifiers
from .verifiers import Verdict, final_number_equal

log = logging.getLogger(__name__)

RewardValue = float | int | Verdict | None


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], completions: list[str],
                 metadata: list[dict[str, Any]]) -> Sequence[RewardValue]: ...


def arith_exact_match(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> list[Verdict]:
    """1.0 when the completion's final integer equals ``metadata["answer"]`` (the arithmetic
    world's verifier, :func:`tether.verifiers.final_number_equal`), else 0.0."""
    return [final_number_equal(c, m["answer"]) for c, m in zip(completions, metadata)]


def answer_in_numbers(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> list[float]:
    """1.0 when ``metadata["answer"]`` is one of the completion's whole numbers (maximal digit runs)
    anywhere, else 0.0: a lenient verifier (the peer benchmark's reward)."""
    return [float(str(m["answer"]) in _DIGITS.findall(c)) for c, m in zip(completions, metadata)]


_DIGITS = re.compile(r"\d+")

REWARDS: dict[str, RewardFn] = {
    "exact_match": arith_exact_match, "answer_in_numbers": answer_in_numbers, "math": verifiers.math_reward,
    "qa_em": verifiers.qa_em_reward, "qa_f1": verifiers.qa_f1_reward, "format": verifiers.format_reward,
    "code": verifiers.code_reward}


@dataclass
class RewardSet:
    """r = Σ_k w_k r_k over named reward functions, with the invalid-score policy above."""

    fns: dict[str, RewardFn]
    weights: dict[str, float] = field(default_factory=dict)
    on_invalid: Literal["fallback", "drop"] = "fallback"
    fallback: float = 0.0

    def __call__(self, prompts: list[str], completions: list[str],
                 metadata: list[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, float]]:
        """(rewards (N,) float32 with NaN for dropped samples, metrics)."""
        n = len(completions)
        total = torch.zeros(n)
        dropped = torch.zeros(n, dtype=torch.bool)
        metrics: dict[str, float] = {}
        for name, fn in self.fns.items():
            values, invalid, reasons = self._score(name, fn, prompts, completions, metadata)
            w = self.weights.get(name, 1.0)
            if self.on_invalid == "drop":
                dropped |= invalid
            total += w * values.masked_fill(invalid, self.fallback)
            ok = values[~invalid]
            metrics[f"reward/{name}/mean"] = float(ok.mean()) if len(ok) else float("nan")
            metrics[f"reward/{name}/std"] = float(ok.std()) if len(ok) > 1 else 0.0
            metrics[f"reward/{name}/invalid"] = float(invalid.sum())
            metrics[f"reward/{name}/invalid_frac"] = float(invalid.float().mean()) if n else 0.0
            for reason, count in reasons.items():  # a verifier's verdicts: why the scores are what they are
                metrics[f"reward/{name}/{reason}"] = float(count)
        total[dropped] = float("nan")
        metrics["reward/dropped"] = float(dropped.sum())
        return total, metrics

    @staticmethod
    def _score(name: str, fn: RewardFn, prompts, completions, metadata
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        try:
            raw = list(fn(prompts, completions, metadata))
            if len(raw) != len(completions):
                raise ValueError(f"returned {len(raw)} scores for {len(completions)} completions")
        except Exception as e:  # noqa: BLE001 - a broken reward must not kill the run; it is counted
            log.warning("reward %r raised %s: %s; its %d scores count as invalid", name, type(e).__name__, e,
                        len(completions))
            return torch.zeros(len(completions)), torch.ones(len(completions), dtype=torch.bool), {}
        reasons = dict(Counter(v.reason for v in raw if isinstance(v, Verdict)))
        values = torch.tensor([_as_float(v) for v in raw], dtype=torch.float32)
        invalid = ~torch.isfinite(values)
        return torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), invalid, reasons


def _as_float(v: Any) -> float:
    if v is None:
        return math.nan
    if isinstance(v, Verdict):
        return v.score
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


class ModelReward:
    """A trained scorer as a reward: batched, without gradients, on text, so its tokenizer need not
    be the policy's. ``kind``: ``rm`` (Bradley-Terry), ``attributes`` (weighted scalar of a
    regression-head model), ``judge`` (log p(yes) - log p(no))."""

    def __init__(self, kind: str, path: str):
        from pathlib import Path

        self.kind, self.path = kind, path
        if kind == "rm":
            from .reward import RewardScorer

            self.scorer = RewardScorer(path)
        elif kind == "judge":
            from .judge import Judge

            self.scorer = Judge(path)
        elif kind == "attributes":
            from .attributes import AttributeScorer

            names, weights = _attribute_setup(Path(path))
            self.scorer = AttributeScorer(path, names, weights)
        else:
            raise ValueError(f"unknown model reward kind {kind!r}: rm, attributes or judge")

    def __call__(self, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        with torch.no_grad():
            return self.scorer(prompts, completions).float().tolist()


def _attribute_setup(path) -> tuple[list[str], torch.Tensor | None]:
    """Attribute names and weights of a trained attributes model, from its run's config.yaml."""
    import yaml

    from .arith import ATTRIBUTES

    for cfg_file in (path / "config.yaml", path.parent / "config.yaml"):
        if cfg_file.is_file():
            cfg = yaml.safe_load(cfg_file.read_text()) or {}
            names = cfg.get("attributes") or list(ATTRIBUTES)
            w = cfg.get("attribute_weights")
            return names, torch.tensor(w, dtype=torch.float32) if w else None
    return list(ATTRIBUTES), None


def load_python_reward(ref: str) -> RewardFn:
    """A reward function of the user's own, named ``FILE.py:NAME`` or ``package.module:NAME`` (what
    ``reward=py:REF`` loads). It takes tether's ``(prompts, completions, metadata)``, or TRL's keyword
    convention ``(prompts=, completions=, **columns)`` with one list per data column (``answer=[...]``),
    so TRL reward functions run unchanged. Refused here, before any training, if it cannot be found
    or called either way."""
    target, sep, name = ref.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"reward py:{ref}: expected py:FILE.py:NAME or py:package.module:NAME")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ValueError(f"reward py:{ref}: no file {path}")
        spec = importlib.util.spec_from_file_location(f"tether_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"reward py:{ref}: cannot import {target!r} ({e})") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward py:{ref}: {target} has no function {name!r}")
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_KEYWORD for p in params) and len(positional) < 3:
        def trl_style(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]):
            keys = dict.fromkeys(k for m in metadata for k in m if k not in ("prompts", "completions"))
            return fn(prompts=prompts, completions=completions, **{k: [m.get(k) for m in metadata] for k in keys})

        return trl_style
    if len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params):
        return fn
    raise ValueError(f"reward py:{ref}: {name}{inspect.signature(fn)} takes neither (prompts, completions, metadata) "
                     "nor TRL's (prompts, completions, **columns)")


def make_rewards(spec: str | dict[str, float], on_invalid: str = "fallback", fallback: float = 0.0,
                 registry: dict[str, RewardFn] | None = None) -> RewardSet:
    """A :class:`RewardSet` from a config value: a name (``"exact_match"``) or ``{name: weight}``.
    ``rm:PATH``, ``attributes:PATH`` and ``judge:PATH`` load a trained model as a reward,
    ``py:FILE.py:NAME`` / ``py:module:NAME`` a function of the user's (:func:`load_python_reward`)."""
    reg = registry or REWARDS
    weights = {spec: 1.0} if isinstance(spec, str) else dict(spec)
    fns: dict[str, RewardFn] = {}
    unknown = []
    for name in weights:
        kind, sep, path = name.partition(":")
        if sep and kind in ("rm", "attributes", "judge"):
            fns[name] = ModelReward(kind, path)
        elif sep and kind == "py":
            fns[name] = load_python_reward(path)
        elif name in reg:
            fns[name] = reg[name]
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known: {', '.join(reg)}, or rm:PATH, attributes:PATH, judge:PATH, "
                         "py:FILE.py:NAME, py:module:NAME")
    return RewardSet(fns, weights, on_invalid, fallback)  # type: ignore[arg-type]


def length_correlation(lengths: torch.Tensor, rewards: torch.Tensor) -> float:
    """Pearson correlation of completion length and reward over the scored samples (0 when either is
    constant): a policy gaming a length-biased reward shows it here first."""
    ok = ~torch.isnan(rewards)
    x, y = lengths.float()[ok], rewards[ok].float()
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


class RunningNorm:
    """Running mean and variance of rewards (Chan et al.'s parallel update), to normalise them as
    (r - mean) / (std + eps). Its state is saved in checkpoints."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def __call__(self, r: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        ok = r[~torch.isnan(r)].double()
        if len(ok):
            n, mean = float(len(ok)), float(ok.mean())
            delta, total = mean - self.mean, self.count + n
            self.m2 += float(((ok - mean) ** 2).sum()) + delta ** 2 * self.count * n / total
            self.mean += delta * n / total
            self.count = total
        std = (self.m2 / max(self.count - 1, 1.0)) ** 0.5
        return (r - self.mean) / (std + eps)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]

