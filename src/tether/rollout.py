"""The rollout engine: prompts and sampling settings in; completion ids, masks and the sampling
log-probs of every token out (seed §5's rollout phase).

:class:`RolloutEngine` is the whole interface a trainer sees. :class:`TorchEngine` is the CPU (and
single-GPU) implementation on the training model itself, with a KV cache, one batched forward per
new token (:mod:`tether.decoding`'s lean step for Llama-family layouts), logits only for the last
position, and an early exit once every row has stopped. A vLLM
engine or a Ray worker slots in by implementing the same methods.

The log-probs are those of the distribution the token was drawn from before top-k/top-p truncation:
log softmax(logits / temperature). That is what the trainer recomputes for the importance ratio
(TRL's GRPO does the same), so on-policy the ratio is exactly 1 up to float noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .decoding import lean_decoder
from .modeling import autocast, padding_id, stop_token_ids, with_cache


@dataclass(frozen=True)
class SamplingParams:
    """How completions are drawn. ``temperature`` 0 is greedy (log-probs then at temperature 1)."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    n: int = 1  # completions per prompt, consecutive in the output
    stop: tuple[str, ...] = ()  # stop strings (the completion keeps them, as vLLM's include_stop_str)
    return_hidden: bool = False  # also the final hidden state that predicted each token (Rollout.hidden)
    min_p: float = 0.0  # keep tokens at least min_p × the likeliest one's probability (Nguyen et al. 2024); 0: off


@dataclass
class Rollout:
    """N = len(prompts) · n completions, right-padded to the longest.

    ``mask`` is 1 up to and including the token that stopped the row (EOS or the end of a stop
    string). ``truncated`` rows hit ``max_new_tokens`` without stopping.
    """

    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor  # (N, L) long, pad after the end
    mask: torch.Tensor  # (N, L) long
    logprobs: torch.Tensor  # (N, L) float32, 0 off the mask
    texts: list[str]
    truncated: torch.Tensor  # (N,) bool
    stats: dict[str, float] = field(default_factory=dict)
    # (N, L, H) float32, 0 off the mask: the last layer's (normed) state that predicted each token, what
    # a value head reads; only when SamplingParams.return_hidden and the engine provides it, else None
    hidden: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollout: ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (after each policy update)."""

    def state_dict(self) -> dict: ...  # sampling RNG, for exact resume

    def load_state_dict(self, state: dict) -> None: ...


def check_prompts(prompts: list[list[int]]) -> None:
    """What every engine refuses: no prompt at all, or an empty one (nothing to condition on)."""
    if not prompts:
        raise ValueError("no prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: a completion needs at least one token to condition on")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every logit below min_p × the likeliest token's probability (min-p sampling:
    log p < log min_p + max log p), then outside the top-k and outside the smallest set whose
    probability reaches top_p (vLLM's order: min-p, then top-k and top-p); the most likely token
    always stays."""
    if min_p > 0:  # a shift of every logit changes no ratio of probabilities: logits work as log-probs
        floor = logits.amax(-1, keepdim=True) + math.log(min_p)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, generator: torch.Generator, rows: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from softmax(logits) by inverting the CDF with one uniform per row; with
    ``rows`` (R,), R tokens, row j drawn from ``logits[rows[j]]`` (completions that share a history
    share its logits).

    ``torch.multinomial`` draws an exponential per vocabulary entry (B·V random numbers, a fifth of a
    small model's decode step on CPU); this draws B (or R)."""
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    V = cdf.shape[-1]
    if rows is None:
        # u in [0, total): the first index with cdf > u never lands on a zero-probability token
        u = torch.rand(cdf.shape[0], 1, generator=generator).to(logits.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).clamp(max=V - 1)[:, 0]
    # Each row searches its node's CDF without copying it per row (R × V: 8 MB a decode step for a
    # 128 × 8 GRPO rollout): the rows' uniforms go into a (B, most rows of a node) grid, one grid row
    # per node, and one batched search serves them all. The same draws and comparisons as searching
    # cdf[rows], so the same tokens.
    u = torch.rand(len(rows), generator=generator).to(logits.device) * cdf[rows, -1]
    counts = torch.bincount(rows, minlength=cdf.shape[0])
    order = torch.argsort(rows, stable=True)
    slot = torch.empty_like(rows)
    slot[order] = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows[order]]
    grid = cdf.new_zeros(cdf.shape[0], max(1, int(counts.max())))
    grid[rows, slot] = u
    return torch.searchsorted(cdf, grid, right=True).clamp(max=V - 1)[rows, slot]


class TorchEngine:
    """Batched sampling with a KV cache on the policy module itself (no weight copy on CPU)."""

    def __init__(self, model: torch.nn.Module, tokenizer, dtype: str = "fp32", seed: int = 0, lean: bool = True):
        self.model, self.tokenizer, self.dtype = model, tokenizer, dtype
        self.stop_ids = torch.tensor(stop_token_ids(model, tokenizer), dtype=torch.long)
        self.pad = padding_id(tokenizer)
        self.generator = torch.Generator().manual_seed(seed)
        self.lean = lean  # decode steps by tether.decoding where the architecture allows (else the model's forward)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # same process, same tensors: nothing to copy

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollout:
        check_prompts(prompts)
        model, was_training = self.model, self.model.training
        model.eval()
        K, n, L = len(prompts), params.n, params.max_new_tokens
        N, P = K * n, max(map(len, prompts))
        device = next(model.parameters()).device
        stops = self.stop_ids.to(device)
        # left padding: every row's next token is at column P, so one step feeds one column
        ids = torch.full((K, P), self.pad, dtype=torch.long)
        attn = torch.zeros(K, P + L, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p)
            attn[i, P - len(p):] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn[:, :P].cumsum(-1) - 1).clamp(min=0)

        # The cache holds one row per distinct history ("node"), not one per completion: the prompt is
        # computed once for its n completions, and completions that sampled the same tokens so far share
        # one forward until they differ. In the arithmetic world a group's completions restate the same
        # equation and differ in the answer's digits, and only a sixth of the rows' decode steps are
        # distinct (docs/online-rl.md). Each row still draws its own token from its node's distribution.
        cache = _kv_cache(model, P + L)
        kv = with_cache(model, cache)
        with autocast(self.dtype):
            logits, hid = _forward(model, params.return_hidden, input_ids=ids, attention_mask=attn[:, :P],
                                   position_ids=pos, **kv)  # (nodes, V), (nodes, H) or None
        attn[:, P:] = 1  # generated columns; rows that stopped leave the batch instead of being masked
        # the lean decode step needs the buffer cache; it snapshots the weights now, as they are
        decoder = lean_decoder(model, self.dtype, N) if self.lean and hasattr(cache.layers[0], "kbuf") else None

        out_ids = torch.full((N, L), self.pad, dtype=torch.long, device=device)
        out_lp = torch.zeros(N, L, device=device)
        out_h = torch.zeros(N, L, hid.shape[-1], device=device) if params.return_hidden else None
        length = torch.zeros(N, dtype=torch.long, device=device)
        stopped = torch.zeros(N, dtype=torch.bool, device=device)
        live = torch.arange(N, device=device)  # rows still generating
        node = torch.div(live, n, rounding_mode="floor")  # each live row's node: its row of the cache
        step_pos = pos[:, -1:]
        stop_checker = _StopStrings(self.tokenizer, params.stop, N) if params.stop else None
        temp = params.temperature if params.temperature > 0 else 1.0
        t, fed = 0, 0
        for t in range(L):
            logp = torch.log_softmax(logits / temp, dim=-1)
            if params.temperature <= 0:
                tok = logp.argmax(-1)[node]
            else:
                tok = sample(filter_logits(logp, params.top_k, params.top_p, params.min_p), self.generator, node)
            out_ids[live, t] = tok
            out_lp[live, t] = logp[node, tok]
            if out_h is not None:
                out_h[live, t] = hid[node].float()
            length[live] += 1
            end = torch.isin(tok, stops)
            if stop_checker is not None:
                end |= stop_checker.update(live, tok)
            if t == L - 1 or bool(end.all()):
                stopped[live] = end
                break
            if bool(end.any()):  # finished rows leave the batch
                stopped[live[end]] = True
                keep = (~end).nonzero()[:, 0]
                live, tok, node = live[keep], tok[keep], node[keep]
            # the next nodes: the distinct (node, token) pairs of the live rows
            V = logits.shape[-1]
            pairs, node = torch.unique(node * V + tok, return_inverse=True)
            parent, tok = torch.div(pairs, V, rounding_mode="floor"), pairs % V
            if len(parent) != len(logits) or bool((parent != torch.arange(len(parent), device=device)).any()):
                cache.batch_select_indices(parent)  # a node that split is copied, a finished one dropped
                attn, step_pos = attn[parent], step_pos[parent]
            step_pos = step_pos + 1
            fed += len(parent)
            if decoder is not None:
                logits, hid = decoder(tok, step_pos, cache, attn[:, :P + t + 1])
            else:
                with autocast(self.dtype):
                    logits, hid = _forward(model, params.return_hidden, input_ids=tok[:, None],
                                           attention_mask=attn[:, :P + t + 1], position_ids=step_pos, **kv)
        model.train(was_training)

        width = max(1, int(length.max()))
        length = length.cpu()
        mask = (torch.arange(width)[None] < length[:, None]).long()
        out_ids = out_ids[:, :width].cpu().masked_fill(mask == 0, self.pad)
        out_lp = out_lp[:, :width].cpu() * mask
        texts = self.tokenizer.batch_decode([r[:k] for r, k in zip(out_ids.tolist(), length.tolist())],
                                            skip_special_tokens=True)
        rows = [p for p in prompts for _ in range(n)]
        if out_h is not None:
            out_h = out_h[:, :width].cpu() * mask[..., None]
        return Rollout(rows, out_ids, mask, out_lp, texts, ~stopped.cpu(),
                       {"gen_tokens": float(length.sum()), "gen_steps": float(t + 1), "gen_forward_rows": float(fed)},
                       out_h)


def _forward(model, with_hidden: bool, **inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own forward at the last position: float32 logits (B, V) (softcapping, logit scales
    and all), and with ``with_hidden`` the last layer's normed state (B, H) they were computed from."""
    out = model(**inputs, logits_to_keep=1, output_hidden_states=with_hidden)
    return out.logits[:, -1].float(), out.hidden_states[-1][:, -1] if with_hidden else None


def _kv_cache(model, capacity: int):
    """A KV cache whose layers write into buffers allocated once for ``capacity`` positions.

    transformers' DynamicCache concatenates every layer's keys and values at every step (a copy of
    the whole cache per token: a fifth of a small model's decode time on CPU); these layers return
    growing views of one buffer instead."""
    from transformers.cache_utils import Cache, DynamicLayer

    class BufferLayer(DynamicLayer):
        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            B, H, _, D = key_states.shape
            self.dtype, self.device = key_states.dtype, key_states.device
            self.kbuf = key_states.new_empty(B, H, capacity, D)
            self.vbuf = value_states.new_empty(B, value_states.shape[1], capacity, value_states.shape[-1])
            self.n = 0
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            self.kbuf[:, :, self.n:self.n + n] = key_states
            self.vbuf[:, :, self.n:self.n + n] = value_states
            self.n += n
            self.keys, self.values = self.kbuf[:, :, :self.n], self.vbuf[:, :, :self.n]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._set(self.kbuf[indices], self.vbuf[indices])

        def _set(self, kbuf: torch.Tensor, vbuf: torch.Tensor) -> None:
            self.kbuf, self.vbuf = kbuf, vbuf
            self.keys, self.values = kbuf[:, :, :self.n], vbuf[:, :, :self.n]

    layers = getattr(model.config, "num_hidden_layers", None)
    if layers is None or getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", False):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)  # architectures this fast path does not cover
    return Cache(layers=[BufferLayer() for _ in range(layers)])


class _StopStrings:
    """Marks rows whose decoded completion ends a stop string (checked on the decoded tail)."""

    def __init__(self, tokenizer, stop: tuple[str, ...], n: int):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.tail = max(map(len, stop)) + 8  # characters: enough for a stop string split over tokens

    def update(self, rows: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """``tok[j]`` was just generated by row ``rows[j]``; True where a stop string is complete."""
        hit = torch.zeros(len(rows), dtype=torch.bool, device=tok.device)
        for j, (i, t) in enumerate(zip(rows.tolist(), tok.tolist())):
            self.tokens[i].append(t)
            text = self.tokenizer.decode(self.tokens[i][-self.tail:], skip_special_tokens=True)
            hit[j] = any(s in text for s in self.stop)
        return hit
