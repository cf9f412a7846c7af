"""A :class:`tether.rollout.RolloutEngine` on vLLM: the same prompts and :class:`SamplingParams` in,
the same :class:`Rollout` out, so that ``engine=vllm`` changes where completions are sampled and
nothing else in a trainer.

Colocated, as TRL's ``vllm_mode=colocate``: one process holds the policy (trained where tether
trains it) and a vLLM ``LLM`` on one GPU (tensor parallel 1) that keeps ``gpu_memory_utilization`` of
it. After each policy update :meth:`VLLMEngine.sync_weights` hands the policy's weights, by their
transformers names, to the model inside vLLM (its ``load_weights`` maps them onto vLLM's fused
layout) and drops vLLM's prefix cache, whose keys and values were computed with the old weights.

What tether asks of vLLM, and why:

- ``logprobs_mode="processed_logprobs"`` (vLLM ≥ 0.10.2): the log-probs of the distribution each
  token was drawn from, after temperature (vLLM's default, ``raw_logprobs``, ignores the temperature,
  and the importance ratio would then compare different distributions). With top-k, top-p or min-p
  they are renormalised over the kept tokens, where :class:`tether.rollout.TorchEngine` reports them
  before truncation; with all three off (the trainers' default) the two agree.
- One seed per request, drawn from the run's seed and a count of sampled ``generate`` calls kept in
  :meth:`state_dict`, so that a resumed run draws the seeds it would have drawn. vLLM's batched
  kernels are not bitwise reproducible across batch compositions, so resume is exact in the seeds, not
  in every bit.
- ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core runs in this process, where
  ``collective_rpc`` reaches the worker's model with the weights as they are (no serialisation).

Not run by tether's CI: vLLM pins its own CUDA build of torch, and no GPU is at hand. The conversion
of vLLM's outputs, the seeds, the weight hand-over and a trainer's loop on this engine are tested
against a stand-in with vLLM's output types (``tests/test_vllm_engine.py``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import lora
from .config import ConfigError
from .modeling import padding_id
from .rollout import Rollout, SamplingParams, check_prompts


def _make_llm(model_path: str, dtype: str, seed: int, gpu_memory_utilization: float, max_model_len: int | None):
    """vLLM's ``LLM`` for ``model_path`` (a transformers folder: tether's checkpoints are)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        from vllm import LLM
    except ImportError as e:
        raise ConfigError("engine=vllm needs vLLM on a CUDA machine: pip install 'tether[vllm]'") from e
    return LLM(model=model_path, dtype={"bf16": "bfloat16", "fp32": "float32"}.get(dtype, "auto"), seed=seed,
               gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
               enable_prefix_caching=True, logprobs_mode="processed_logprobs", tensor_parallel_size=1)


def _vllm_sampling(**kwargs):
    from vllm import SamplingParams as VSamplingParams

    return VSamplingParams(**kwargs)


def _load_weights(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Run on vLLM's worker (``collective_rpc``): its model takes transformers-named tensors."""
    worker.model_runner.model.load_weights(weights=weights)


def rollout_from_outputs(outputs: list[Any], prompts: list[list[int]], n: int, tokenizer, pad: int) -> Rollout:
    """A :class:`Rollout` from vLLM's ``RequestOutput`` list (one per prompt, ``n`` completions each, in
    order): each completion's ``token_ids`` (EOS included when it stopped there, as tether's mask
    counts it), the log-prob of each sampled token, ``finish_reason == "length"`` as truncated."""
    ids, lps, truncated = [], [], []
    for out in outputs:
        if len(out.outputs) != n:
            raise ValueError(f"vLLM returned {len(out.outputs)} completions for a prompt, expected {n}")
        for c in out.outputs:
            toks = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(toks):
                raise ValueError("vLLM returned no log-prob for some sampled token (SamplingParams.logprobs=0)")
            ids.append(toks)
            lps.append([float(pos[t].logprob) for pos, t in zip(c.logprobs, toks)])
            truncated.append(c.finish_reason == "length")
    width = max(1, max(map(len, ids)))
    length = torch.tensor([len(r) for r in ids])
    mask = (torch.arange(width)[None] < length[:, None]).long()
    comp = torch.tensor([r + [pad] * (width - len(r)) for r in ids], dtype=torch.long)
    logprobs = torch.tensor([r + [0.0] * (width - len(r)) for r in lps], dtype=torch.float32)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    rows = [p for p in prompts for _ in range(n)]
    return Rollout(rows, comp, mask, logprobs, texts, torch.tensor(truncated),
                   {"gen_tokens": float(length.sum()), "gen_steps": float(width)})


class VLLMEngine:
    """Sampling on vLLM, colocated with the trainer (see the module docstring)."""

    def __init__(self, model_path: str, tokenizer, dtype: str = "bf16", seed: int = 0,
                 gpu_memory_utilization: float = 0.3, max_model_len: int | None = None, llm: Any = None):
        self.tokenizer = tokenizer
        self.pad = padding_id(tokenizer)
        self.seed, self.calls = seed, 0
        self.llm = llm if llm is not None else _make_llm(model_path, dtype, seed, gpu_memory_utilization,
                                                         max_model_len)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollout:
        check_prompts(prompts)
        # one seed per request: the run's seed, this sampled call, the prompt (a resumed run redraws
        # them); greedy calls (evaluation) draw none, as TorchEngine's draw no random number
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=g).tolist()
        self.calls += params.temperature > 0
        sampling = [_vllm_sampling(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                   top_k=params.top_k, min_p=params.min_p, max_tokens=params.max_new_tokens,
                                   stop=list(params.stop) or None, include_stop_str_in_output=True, logprobs=0,
                                   seed=s) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling, use_tqdm=False)
        return rollout_from_outputs(outputs, prompts, params.n, self.tokenizer, self.pad)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """π_old ← π_θ in vLLM: the policy's weights by name (tied ones once), then a fresh prefix cache."""
        weights = lora.plain_parameters(model)  # a LoRA policy's merged weights, by their plain names
        self.llm.collective_rpc(_load_weights, args=(weights,))
        self.llm.reset_prefix_cache()

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
