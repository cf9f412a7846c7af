"""Held-out exact-match accuracy: greedy decoding, and pass@k / majority vote of sampled completions."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch

from pydantic import Field

from .arith import ArithSpec, eval_rows, exact_match, extract_answer
from .config import Config
from .data import DataError, chat_prompt_text, prompt_ids, read_rows
from .modeling import padding_id


class EvalConfig(Config):
    """Greedy exact-match evaluation of a model."""

    model: str = Field("embedded", description="local transformers checkpoint folder, or 'embedded'")
    eval_data: str = Field("arith", description="'arith' (held-out problems) or a file of {prompt, answer} rows")
    eval_samples: int = Field(200, ge=1, description="prompts scored")
    max_new_tokens: int = Field(16, ge=1, description="generation budget")
    samples: int = Field(0, ge=0, description="also draw this many completions per prompt at `temperature`: pass@k and majority-vote accuracy, the ceiling RL from this model can reach by sharpening (0: greedy only)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of `samples`")
    seed: int = Field(0, description="sampling seed of `samples`")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, description="variables the tokenizer's chat template gets for chat prompts, e.g. {enable_thinking: false} for Qwen3 (as the trainers)")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="what the greedy completions are computed in: fp32 (as SFT and DPO evaluate), or bf16 with tether's rollout engine, as the online trainers evaluate under dtype=bf16 (greedy answers can differ between the two where two tokens are nearly tied)")


def load_eval_rows(source: str, n: int, spec: ArithSpec | None = None, tokenizer=None) -> list[dict[str, str]]:
    """``"arith"``: ``n`` held-out arithmetic problems; otherwise a file of ``{prompt, answer}``
    rows (the first ``n``), a prompt text or chat messages (rendered with ``tokenizer``'s chat
    template, the assistant turn opened, as the online trainers render their training prompts)."""
    if source == "arith":
        return eval_rows(spec or ArithSpec(), n)
    rows = []
    for r in read_rows(Path(source))[:n]:
        prompt = r.data.get("prompt")
        if isinstance(prompt, list) and tokenizer is not None:
            prompt = chat_prompt_text(tokenizer, prompt, r.where)
        if not isinstance(prompt, str) or "answer" not in r.data:
            raise DataError(f"{r.where}: evaluation rows need 'prompt' (text or chat messages) and 'answer'")
        rows.append({"prompt": prompt, "answer": str(r.data["answer"])})
    if not rows:  # an accuracy of 0 / 0 would read as a score
        raise DataError(f"{source}: no evaluation rows (eval_data=none turns evaluation off)")
    return rows


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 128) -> list[str]:
    """Greedy completions of ``prompts`` (batched, left-padded, KV cache)."""
    was_training = model.training
    model.eval()
    pad = padding_id(tokenizer)
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = _pad_left(tokenizer, prompts[i:i + batch_size], pad)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 temperature=None, top_p=None, top_k=None)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


def _pad_left(tokenizer, prompts: list[str], pad: int) -> dict[str, torch.Tensor]:
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    T = max(map(len, ids))
    input_ids = torch.full((len(ids), T), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, T - len(x):] = torch.tensor(x)
        mask[i, T - len(x):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def rank_accuracy(score_fn, spec: ArithSpec, n: int = 200, seed: int = 0) -> float:
    """Share of held-out problems where ``score_fn(prompts, completions)`` (any scalar scorer: a
    reward model, a judge, weighted attributes) puts the correct answer above a corruption of it."""
    import random

    from .arith import corrupt, sample_problems

    rng = random.Random(f"arith-rank-{seed}")
    problems = sample_problems(spec, n, seed + 15485863, "held_out")
    prompts = [p.prompt for p in problems]
    good = score_fn(prompts, [p.completion for p in problems])
    bad = score_fn(prompts, [corrupt(p, rng)[0] for p in problems])
    return float((good > bad).float().mean())


def accuracy(model, tokenizer, rows: list[dict[str, str]], max_new_tokens: int = 16) -> dict[str, Any]:
    """Exact-match accuracy of greedy completions: the last integer of the completion must equal
    the answer (:func:`tether.arith.exact_match`)."""
    return score_completions(rows, generate_greedy(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens))


def score_completions(rows: list[dict[str, str]], completions: list[str]) -> dict[str, Any]:
    """Exact-match accuracy of ``completions`` against ``rows``' answers, with the first 8 as samples."""
    hits = [exact_match(c, r["answer"]) for c, r in zip(completions, rows)]
    samples = [{"prompt": r["prompt"], "completion": c, "answer": r["answer"], "correct": h}
               for r, c, h in zip(rows[:8], completions, hits)]
    return {"accuracy": sum(hits) / max(1, len(rows)), "n": len(rows), "samples": samples}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021, eq. 1):
    1 - C(n-c, k) / C(n, k), the chance that k of the n drawn without replacement hold a correct one."""
    if not 0 < k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_samples(rows: list[dict[str, str]], groups: list[list[str]]) -> dict[str, Any]:
    """Scores of ``groups[i]``, n sampled completions of ``rows[i]``: the mean sample accuracy, pass@k
    for k = 1, 2, 4, … ≤ n, and majority-vote accuracy (the most frequent final answer, ties to the
    first seen; completions without an answer do not vote)."""
    n = len(groups[0]) if groups else 0
    if n == 0 or any(len(g) != n for g in groups):
        raise ValueError("every prompt needs the same number (>= 1) of sampled completions")
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    out: dict[str, Any] = {"n": len(rows), "samples_per_prompt": n}
    correct = [[exact_match(c, r["answer"]) for c in g] for r, g in zip(rows, groups)]
    out["sample_accuracy"] = sum(map(sum, correct)) / (n * max(1, len(rows)))
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(c), k) for c in correct) / max(1, len(rows))
    votes = 0
    for r, g in zip(rows, groups):
        answers = Counter(a for a in map(extract_answer, g) if a is not None)
        votes += bool(answers) and answers.most_common(1)[0][0] == int(r["answer"])
    out["majority_accuracy"] = votes / max(1, len(rows))
    return out


def engine_texts(engine, tokenizer, prompts: list[str], params, batch_prompts: int = 128) -> list[str]:
    """The completion texts of ``prompts`` from a rollout engine, ``batch_prompts`` prompts per call
    (``params.n`` consecutive completions per prompt)."""
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    return [t for i in range(0, len(ids), batch_prompts) for t in engine.generate(ids[i:i + batch_prompts], params).texts]


def engine_accuracy(engine, tokenizer, rows: list[dict[str, str]], max_new_tokens: int = 16) -> dict[str, Any]:
    """:func:`score_completions` of a rollout engine's greedy completions: how the online trainers
    evaluate, in the engine's dtype (``tether eval dtype=bf16`` the same way)."""
    from .rollout import SamplingParams

    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    return score_completions(rows, engine_texts(engine, tokenizer, [r["prompt"] for r in rows], greedy))


def sampled_accuracy(model, tokenizer, rows: list[dict[str, str]], samples: int, temperature: float = 1.0,
                     max_new_tokens: int = 16, seed: int = 0, batch_prompts: int = 64) -> dict[str, Any]:
    """:func:`score_samples` of ``samples`` completions per prompt drawn by the rollout engine."""
    from .rollout import SamplingParams, TorchEngine

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=samples)
    texts = engine_texts(TorchEngine(model, tokenizer, seed=seed), tokenizer, [r["prompt"] for r in rows], params,
                         batch_prompts)
    return score_samples(rows, [texts[i * samples:(i + 1) * samples] for i in range(len(rows))])
