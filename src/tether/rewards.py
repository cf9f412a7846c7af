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

import asyncio
import importlib
import importlib.util
import inspect
import json
import logging
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from . import verifiers
from .config import ConfigError
from .verifiers import Verdict, final_number_equal

log = logging.getLogger(__name__)

RewardValue = float | int | Verdict | None


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], completions: list[str],
                 metadata: list[dict[str, Any]]) -> Sequence[RewardValue]: ...


@dataclass
class RewardContext:
    """What a trainer's step knows besides the texts, for the reward functions that take TRL's
    keywords (:class:`TRLReward`): each completion's token ids (up to and including the token that
    stopped it, as TRL's ``completion_ids``), the run's progress for ``trainer_state``, and where
    ``log_metric`` and ``log_extra`` put what a function logs."""

    completion_ids: list[list[int]] | None = None
    global_step: int = 0  # the run's steps (rollouts) done before this one
    max_steps: int = 0
    epoch: float = 0.0  # passes over the prompts so far, this step's included
    metrics: dict[str, list[float]] = field(default_factory=dict)  # log_metric: averaged over the step's calls
    extra: dict[str, list[Any]] = field(default_factory=dict)  # log_extra: one value per sample

    def log_metric(self, name: str, value: float) -> None:
        """TRL's ``log_metric(name, value)``: a scalar, logged as ``reward/<name>``, averaged over the step."""
        self.metrics.setdefault(str(name), []).append(float(value))

    def log_extra(self, column: str, values: Sequence[Any]) -> None:
        """TRL's ``log_extra(column, values)``: one value per sample of the call, shown with the logged
        completions (completions.jsonl)."""
        self.extra.setdefault(str(column), []).extend(values)

    def trainer_state(self):
        """transformers' ``TrainerState`` with the run's progress (``global_step``, ``max_steps``,
        ``epoch``), as TRL's reward functions receive it. Imported on first use: transformers' trainer
        module takes ~2 s to import."""
        from transformers.trainer_callback import TrainerState

        return TrainerState(global_step=self.global_step, max_steps=self.max_steps, epoch=self.epoch)

    def logged_metrics(self) -> dict[str, float]:
        return {f"reward/{k}": sum(v) / len(v) for k, v in self.metrics.items() if v}


def arith_exact_match(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> list[Verdict]:
    """1.0 when the completion's final integer equals ``metadata["answer"]`` (the arithmetic
    world's verifier, :func:`tether.verifiers.final_number_equal`), else 0.0. A row without an
    answer is invalid on its own (``m["answer"]`` raised KeyError and invalidated the whole batch)."""
    return [final_number_equal(c, m.get("answer")) for c, m in zip(completions, metadata)]


def answer_in_numbers(prompts: list[str], completions: list[str],
                      metadata: list[dict[str, Any]]) -> list[float | Verdict]:
    """1.0 when ``metadata["answer"]`` is one of the completion's whole numbers (maximal digit runs, and
    a run after a minus sign that starts a number: "= -5", not the operator of "10 - 5") anywhere, else
    0.0: a lenient verifier (the peer benchmark's reward, which it equals on non-negative answers). A
    row without an answer, or with one that is not a whole number ("3.5"; 7.0 is 7), is invalid (NaN,
    reasons ``no_reference`` and ``unparsable_reference``), as in the other verifiers: such answers never
    matched, so they scored a silent 0."""
    out: list[float | Verdict] = []
    for c, m in zip(completions, metadata):
        golds = verifiers.reference_answers(m, ("answer",))
        wholes = [w for w in map(verifiers.whole_number, golds or []) if w is not None]
        if not wholes:
            out.append(Verdict(math.nan, "no_reference" if golds is None else "unparsable_reference"))
        else:
            found = {int(x) for x in _DIGITS.findall(c)} | {-int(x) for x in _NEGATIVE.findall(c)}
            out.append(float(any(w in found for w in wholes)))
    return out


_DIGITS = re.compile(r"\d+")
_NEGATIVE = re.compile(r"(?:^|[\s=(:,])-(\d+)")  # a minus that starts a number, not one between operands

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

    def __call__(self, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]],
                 context: RewardContext | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(rewards (N,) float32 with NaN for dropped samples, metrics). ``context``: what TRL-style
        functions receive besides the texts (a trainer's step passes one; without it they get none of
        TRL's keywords), and what they log with ``log_metric`` joins the metrics."""
        each, metrics = self.score_each(prompts, completions, metadata, context)
        return self.total(each), metrics

    def score_each(self, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]],
                   context: RewardContext | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(scores (N, K) float32, one column per function in ``fns`` order, metrics): the invalid
        policy applied, an invalid score replaced by ``fallback``, or under ``drop`` the whole sample's
        row NaN. GDPO's decoupled normalisation works on these (:func:`tether.losses.policy.decoupled_advantages`)."""
        n = len(completions)
        each = torch.zeros(n, len(self.fns))
        dropped = torch.zeros(n, dtype=torch.bool)
        metrics: dict[str, float] = {}
        for k, (name, fn) in enumerate(self.fns.items()):
            values, invalid, reasons = self._score(name, fn, prompts, completions, metadata, context)
            if self.on_invalid == "drop":
                dropped |= invalid
            each[:, k] = values.masked_fill(invalid, self.fallback)
            ok = values[~invalid]
            metrics[f"reward/{name}/mean"] = float(ok.mean()) if len(ok) else float("nan")
            metrics[f"reward/{name}/std"] = float(ok.std()) if len(ok) > 1 else 0.0
            metrics[f"reward/{name}/invalid"] = float(invalid.sum())
            metrics[f"reward/{name}/invalid_frac"] = float(invalid.float().mean()) if n else 0.0
            for reason, count in reasons.items():  # a verifier's verdicts: why the scores are what they are
                metrics[f"reward/{name}/{reason}"] = float(count)
        each[dropped] = float("nan")
        metrics["reward/dropped"] = float(dropped.sum())
        if context is not None:  # a name tether logs itself keeps tether's value
            for k, v in context.logged_metrics().items():
                if k not in metrics:
                    metrics[k] = v
                elif k not in _CLASHES:
                    _CLASHES.add(k)
                    log.warning("log_metric(%r, ...): tether logs %s itself and keeps its own value; "
                                "give the metric another name", k[len("reward/"):], k)
        return each, metrics

    def weight_vector(self) -> torch.Tensor:
        """(K,) each function's weight, in ``fns`` order (1 where none is given)."""
        return torch.tensor([float(self.weights.get(name, 1.0)) for name in self.fns])

    def total(self, each: torch.Tensor) -> torch.Tensor:
        """r = Σ_k w_k r_k per sample (N,) from :meth:`score_each`'s (N, K); NaN where dropped."""
        return (each * self.weight_vector()).sum(-1)

    @staticmethod
    def _score(name: str, fn: RewardFn, prompts, completions, metadata, context: RewardContext | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        try:
            out = fn(prompts, completions, metadata, context) if isinstance(fn, TRLReward) else \
                fn(prompts, completions, metadata)
            if inspect.isawaitable(out):  # an async def reward function (TRL runs those too)
                out = _run_coroutine(out)
            raw = list(out)
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


_LOOP: asyncio.AbstractEventLoop | None = None
_CLASHES: set[str] = set()  # log_metric names that clash with tether's own, warned about once


def _run_coroutine(coro):
    """The result of an async reward function's coroutine, run on one event loop for the whole process
    (a daemon thread's, as TRL keeps one for the run): a semaphore, client or connection pool an
    async reward function created on its first call stays usable on the next. From inside a running
    event loop (a notebook's) too, as the coroutine runs in that other thread."""
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="tether-reward-loop", daemon=True).start()
        _LOOP = loop
    return asyncio.run_coroutine_threadsafe(coro, _LOOP).result()


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
        self.kind, self.path = kind, path
        if kind in ("rm", "attributes", "judge"):
            check_scorer_folder(kind, path)
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


# The classes transformers names a checkpoint with: a causal LM's, and a scorer's (what `tether reward`
# and `tether attributes` save: AutoModelForSequenceClassification, e.g. Qwen2ForSequenceClassification).
_LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_SCORER_ARCHITECTURE = "ForSequenceClassification"
_SCORE_HEADS = ("score", "classifier")  # what the head is called in a LoRA adapter's modules_to_save


def check_scorer_folder(kind: str, path: str) -> Path:
    """Refuse, with a :class:`~tether.config.ConfigError` naming ``path``, a model reward whose folder
    cannot be what ``kind`` needs, before transformers loads it:

    * a path that does not exist, or a folder without ``config.json`` (transformers would take the
      name for a Hugging Face hub id and fail with a network traceback that never names the path);
    * for ``rm:`` / ``attributes:``, a causal LM (``LlamaForCausalLM``, …) or a LoRA adapter without a
      trained head: ``AutoModelForSequenceClassification`` loads one with a *randomly initialised*
      score head, and training would silently optimise noise. Accepted: what ``tether reward`` and
      ``tether attributes`` save, a ``*ForSequenceClassification`` folder, or a LoRA checkpoint whose
      adapter carries the head in ``modules_to_save``;
    * for ``judge:``, a sequence-classification model (it has no LM head to say yes or no with).
    """
    spec = f"reward {kind}:{path}"
    folder = Path(path).expanduser()
    if not path or not folder.exists():
        raise ConfigError(f"{spec}: no such model folder: {folder} (a local transformers folder is needed, "
                          f"e.g. a `tether reward` run's final/; hub ids are not downloaded)")
    if not folder.is_dir():
        raise ConfigError(f"{spec}: {folder} is a file, not a model folder")
    from . import lora

    if lora.is_adapter_folder(folder):
        saved = json.loads((folder / lora.ADAPTER_CONFIG).read_text()).get("modules_to_save") or []
        if kind != "judge" and not any(h in saved for h in _SCORE_HEADS):
            raise ConfigError(f"{spec}: {folder} is a LoRA adapter of a causal language model (no trained score head "
                              f"in its modules_to_save); its head would be random. Use a `tether reward` run's "
                              f"checkpoint or final/, or judge:{path} to score with a generative judge")
        return folder
    if not (folder / "config.json").is_file():
        hint = f"; did you mean {folder / 'final'}?" if (folder / "final" / "config.json").is_file() else ""
        raise ConfigError(f"{spec}: {folder} is not a transformers model folder (no config.json){hint}")
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    scorer = any(a.endswith(_SCORER_ARCHITECTURE) for a in archs)
    if kind in ("rm", "attributes") and archs and not scorer:
        what = "a causal language model" if any(a.endswith(_LM_ARCHITECTURES) for a in archs) else "not a reward model"
        raise ConfigError(f"{spec}: {folder} is {what} ({', '.join(archs)}), with no sequence-classification head: "
                          f"loaded as a reward model its score head would be randomly initialised. Train one from it "
                          f"with `tether reward model={path}`, or use judge:{path} to score with it as a generative "
                          "judge (log p(yes) - log p(no))")
    if kind == "judge" and archs and scorer:
        raise ConfigError(f"{spec}: {folder} is a sequence-classification model ({', '.join(archs)}), not a causal LM "
                          f"that can judge; use rm:{path} for a Bradley-Terry reward model")
    config = json.loads((folder / "config.json").read_text())
    labels = config.get("id2label")
    heads = len(labels) if isinstance(labels, dict) else config.get("num_labels")
    if scorer and kind == "rm" and heads and heads != 1:  # transformers would stop on the head's shape
        raise ConfigError(f"{spec}: {folder} has {heads} score heads, a multi-attribute model (tether attributes) or "
                          f"a classifier; a Bradley-Terry reward model has one. Use attributes:{path} for the former")
    if scorer and kind == "attributes" and heads == 1:
        raise ConfigError(f"{spec}: {folder} has one score head, a Bradley-Terry reward model: use rm:{path}")
    return folder


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


# TRL's convention (GRPOTrainer reward_funcs, TRL 1.16): f(prompts=, completions=, completion_ids=,
# trainer_state=, log_extra=, log_metric=, **columns), every data column but prompt/completion a
# keyword holding one value per sample, returning one float (or None) per sample.
_TRL_KEYWORDS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"})
# columns that are not passed as keywords: TRL's own exclusions, and the two names tether fills itself
_NOT_COLUMNS = frozenset({"prompt", "completion", "completion_ids", "prompts", "completions"})
# what tether's form calls its third parameter (the docs' `metadata`; `meta` in the tests and examples)
_METADATA_NAMES = frozenset({"metadata", "meta"})


class TRLReward:
    """A TRL-style reward function as a tether one: called ``fn(prompts=, completions=, **columns)``
    with one list per data column of the batch's metadata (``answer=[...]``), as TRL's GRPOTrainer
    calls it. ``conversational``: pass the prompts as the rows' chat messages and each completion as
    ``[{"role": "assistant", "content": text}]``, as TRL does for chat data; None (default) decides
    per batch: conversational when every row's metadata holds its ``prompt`` as a list of messages.
    Called with a :class:`RewardContext` (a trainer's step), it also gets TRL's ``completion_ids``,
    ``trainer_state`` (transformers' ``TrainerState``: ``global_step`` counts the run's steps done,
    ``max_steps`` its steps, so their ratio is the run's progress as in TRL), ``log_metric`` and
    ``log_extra``, where it takes them. TRL's ``environments`` (its tool-use environments) has no
    counterpart in tether."""

    def __init__(self, fn: Callable[..., Sequence[RewardValue]], name: str = "", conversational: bool | None = None):
        params = inspect.signature(fn).parameters.values()
        self.fn, self.name, self.conversational = fn, name or getattr(fn, "__name__", "reward"), conversational
        self.var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
        named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self.accepted = {p.name for p in named}
        self.required = [p.name for p in named if p.default is p.empty]

    def __call__(self, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]],
                 context: RewardContext | None = None) -> Sequence[RewardValue]:
        conversational = self.conversational
        if conversational is None:
            conversational = bool(metadata) and all(isinstance(m.get("prompt"), list) for m in metadata)
        prompt_arg: list[Any] = prompts
        completion_arg: list[Any] = completions
        if conversational:
            if not all(isinstance(m.get("prompt"), list) for m in metadata):
                raise ValueError(f"{self.name}: conversational, but the rows' metadata holds no 'prompt' messages")
            prompt_arg = [m["prompt"] for m in metadata]
            completion_arg = [[{"role": "assistant", "content": c}] for c in completions]
        columns = dict.fromkeys(k for m in metadata for k in m if k not in _NOT_COLUMNS)
        kwargs = {"prompts": prompt_arg, "completions": completion_arg,
                  **{k: [m.get(k) for m in metadata] for k in columns}}
        if context is not None:  # TRL's keywords, where the function takes them (its trainer state is built then)
            wanted = _TRL_KEYWORDS if self.var_keyword else self.accepted & _TRL_KEYWORDS
            if "completion_ids" in wanted and context.completion_ids is not None:
                kwargs["completion_ids"] = context.completion_ids
            if "trainer_state" in wanted:
                kwargs["trainer_state"] = context.trainer_state()
            kwargs.update({k: getattr(context, k) for k in ("log_metric", "log_extra") if k in wanted})
        if not self.var_keyword:  # only what it names: a column it does not take is not an error
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepted}
        missing = [k for k in self.required if k not in kwargs]
        if missing and set(missing) <= _TRL_KEYWORDS:
            raise ValueError(f"{self.name} needs {', '.join(missing)}, which a trainer's step passes (RewardContext)")
        if missing:
            raise ValueError(f"{self.name} needs {', '.join(missing)}, which the rows do not have as data columns "
                             f"(columns: {', '.join(columns) or 'none'})")
        return self.fn(**kwargs)


def load_python_reward(ref: str) -> RewardFn:
    """A reward function of the user's own, named ``FILE.py:NAME`` or ``package.module:NAME`` (what
    ``reward=py:REF`` loads), in one of two forms, told apart by its signature:

    * tether's ``f(prompts, completions, metadata)``: exactly three positional parameters (more only
      with defaults), called positionally, ``metadata`` one dict per sample;
    * TRL's ``f(prompts, completions, **kwargs)``: called with keywords, one list per data column
      (``answer=[...]``), so TRL reward functions run unchanged (:class:`TRLReward`, conversational
      prompts and completions as TRL passes them when the rows carry their chat messages).

    A function is TRL's when it takes ``**kwargs``, when a parameter after the first two is one of
    TRL's keywords (``completion_ids``, ``trainer_state``, …) or keyword-only, or when it needs more
    than three arguments. With exactly three and no ``**kwargs`` the third's name decides: ``metadata``
    (or ``meta``) is tether's form; a name that is a data column of the batch (``answer``) receives
    that column, TRL's way; any other name gets the metadata (tether's form, as before). Refused here,
    before any training, if it cannot be found or called either way."""
    target, sep, name = ref.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"reward py:{ref}: expected py:FILE.py:NAME or py:package.module:NAME")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ValueError(f"reward py:{ref}: no file {path}")
        spec = importlib.util.spec_from_file_location(f"tether_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as e:  # noqa: BLE001 - the user's file: say which, and what it raised
            raise ValueError(f"reward py:{ref}: running {path} raised {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"reward py:{ref}: cannot import {target!r} ({e})") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward py:{ref}: {target} has no function {name!r}")
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    neither = ValueError(f"reward py:{ref}: {name}{sig} takes neither (prompts, completions, metadata) "
                         "nor TRL's (prompts, completions, **kwargs)")
    # The old test was "3+ positional parameters means tether's form", which sent the metadata dicts
    # to `answer` in TRL's `f(prompts, completions, answer, **kwargs)`; TRL's form is told by **kwargs
    # and by keyword names instead, tether's by being callable with exactly three arguments.
    try:
        sig.bind(None, None, None)
        tether_callable = True
    except TypeError:
        tether_callable = False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    extra_names = {p.name for p in positional[2:]} | {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    by_keyword = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    # TRL calls with keywords only: prompts= and completions= must land somewhere, and nothing may
    # need to be passed positionally
    trl_callable = ((var_keyword or {"prompts", "completions"} <= by_keyword)
                    and not any(p.kind is p.POSITIONAL_ONLY and p.default is p.empty for p in params))
    keyword_only = any(p.kind is p.KEYWORD_ONLY for p in params)
    if trl_callable and (var_keyword or extra_names & _TRL_KEYWORDS or keyword_only or not tether_callable):
        if any(p.name == "environments" and p.default is p.empty for p in params):
            raise ValueError(f"reward py:{ref}: {name}{sig} requires environments (TRL's tool-use environments), "
                             "which tether does not have; give it a default")
        return TRLReward(fn, f"py:{ref}")
    if not tether_callable:
        raise neither
    third = positional[2].name if len(positional) >= 3 else None
    if not trl_callable or third is None or third in _METADATA_NAMES:
        return fn
    trl = TRLReward(fn, f"py:{ref}")

    def by_column(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> Sequence[RewardValue]:
        # f(prompts, completions, answer): the third parameter names a data column, TRL's way
        if third not in _NOT_COLUMNS and any(third in m for m in metadata):
            return trl(prompts, completions, metadata)
        return fn(prompts, completions, metadata)

    return by_column


def make_rewards(spec: str | dict[str, float], on_invalid: str = "fallback", fallback: float = 0.0,
                 registry: dict[str, RewardFn] | None = None) -> RewardSet:
    """A :class:`RewardSet` from a config value: a name (``"exact_match"``) or ``{name: weight}``.
    ``rm:PATH``, ``attributes:PATH`` and ``judge:PATH`` load a trained model as a reward,
    ``py:FILE.py:NAME`` / ``py:module:NAME`` a function of the user's (:func:`load_python_reward`)."""
    reg = registry or REWARDS
    weights = {spec: 1.0} if isinstance(spec, str) else dict(spec)
    if not weights:
        raise ValueError("reward={} names no reward function: give one name or {name: weight, ...}")
    bad = {k: w for k, w in weights.items() if not isinstance(w, (int, float)) or not math.isfinite(w)}
    if bad:
        raise ValueError(f"reward weights must be finite numbers: {bad}")
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

