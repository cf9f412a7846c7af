"""One decode step of a pre-norm decoder (Llama, Mistral, Qwen2, Qwen3) on its weights directly.

A decode step feeds one token per row. At the sizes tether trains on a CPU, transformers' forward
spends as long in per-op overhead (mask building, cache bookkeeping, twelve small projections per
layer, and under autocast a bf16 copy of every weight at every step) as in the matmuls. This step
does the same arithmetic with fewer, larger ops:

- q, k, v as one projection and gate, up as one (weights concatenated once per generation);
- bf16 weights cast once, not at every step, when the engine samples in bf16;
- each product's weight packed once per generation for oneDNN (:func:`_packed`), so the small
  products of a decode step do not repack it at every call;
- keys and values written in place into the engine's preallocated cache (float32, holding values
  rounded to the model's dtype, as the trainer's attention computes them), and grouped-query
  attention as two batched matmuls over the (kv head, query group) layout;
- RMSNorm as one fused op; rotary tables from the model's own rotary module (so rope scaling types
  behave as in transformers).

Architectures or settings it does not cover (sliding windows, soft-capping, other activations,
flash attention…) return None from :func:`lean_decoder`, and the engine calls the model instead.
The sampler's log-probs stay those of the trainer's forward up to float rounding (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import lora
from .modeling import _last_layer_at_supported, _rotate_half


def _supported(model) -> bool:
    """A layout :func:`tether.modeling.hidden_at` can run by hand, with every layer full attention,
    SiLU gating and a plain linear head."""
    base = getattr(model, "base_model", None)
    if base is None or not _last_layer_at_supported(base):
        return False
    cfg = base.config
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "final_logit_softcapping", None):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return False
    return isinstance(model.get_output_embeddings(), torch.nn.Linear) and all(
        hasattr(layer.mlp, "gate_proj") for layer in base.layers) and lora.mergeable(model)


def _norm(norm) -> tuple[torch.Tensor, float]:
    return norm.weight, float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _cat_linear(mods: list[torch.nn.Linear], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (sum of outputs × in) weight and bias for several projections of the same input (with
    gradient to each projection's own parameters where grad mode is on; a LoRA adapter's W + s·B A,
    :func:`tether.lora.linear_weight`)."""
    wb = [lora.linear_weight(m) for m in mods]
    w = (torch.cat([w for w, _ in wb]) if len(wb) > 1 else wb[0][0]).to(dtype)
    if all(b is None for _, b in wb):
        return w, None
    b = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in wb])
    return w, b.to(dtype)


def _linear(x: torch.Tensor, p: tuple) -> torch.Tensor:
    """``F.linear`` with a projection's (weight, bias), or (weight, bias, packed) from :func:`_packed`."""
    if len(p) == 3:
        return torch.ops.mkldnn._linear_pointwise(x, p[2], p[1], "none", [], "")
    return F.linear(x, p[0], p[1])


def _packed(p: tuple[torch.Tensor, torch.Tensor | None], rows: int) -> tuple:
    """A frozen projection with its weight reordered once into oneDNN's blocked layout (what
    inductor's CPU weight prepacking does), for the many small products of a generation's decode
    steps. On the AMD host a decode step's 17 products of 64 rows, timed alone, take 2.2× less time in
    fp32 (MKL's GEMM repacks its operands at every call) and 1.2× less in bf16; a whole rollout 1.19×
    and 1.02-1.04× (docs/online-rl.md). bf16 results are bit-identical there, fp32 ones sum in another order
    (~5e-7 relative). Where oneDNN cannot pack (not a CPU tensor, no oneDNN build, no kernel for the
    dtype) the plain pair is returned. ``rows``: the expected batch."""
    w, b = p
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return p
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        torch.ops.mkldnn._linear_pointwise(w.new_zeros(1, w.shape[1]), packed, b, "none", [], "")
    except (RuntimeError, AttributeError):
        return p
    return w, b, packed


def _layer_weights(layer, dtype: torch.dtype) -> dict:
    """A decoder layer's projections fused (q, k, v as one; gate, up as one) and cast to ``dtype``."""
    a, m = layer.self_attn, layer.mlp
    return {
        "qkv": _cat_linear([a.q_proj, a.k_proj, a.v_proj], dtype), "o": _cat_linear([a.o_proj], dtype),
        "gate_up": _cat_linear([m.gate_proj, m.up_proj], dtype), "down": _cat_linear([m.down_proj], dtype),
        "norm1": _norm(layer.input_layernorm), "norm2": _norm(layer.post_attention_layernorm),
        "q_norm": getattr(a, "q_norm", None), "k_norm": getattr(a, "k_norm", None),
        "heads": a.q_proj.out_features // a.head_dim, "kv_heads": a.k_proj.out_features // a.head_dim,
        "head_dim": a.head_dim, "scale": a.scaling,
    }


def _rms(h: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    return F.rms_norm(h, (h.shape[-1],), norm[0], norm[1])


def _rotated_qkv(w: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (..., heads, hd), k and v (..., kv heads, hd) of normed inputs ``x`` (..., H): one projection,
    q and k rotated together in float32 (as under autocast) by ``cos``/``sin`` (..., 1, hd)."""
    hd, nh, nkv = w["head_dim"], w["heads"], w["kv_heads"]
    qkv = _linear(x, w["qkv"])
    qk = qkv[..., :(nh + nkv) * hd].unflatten(-1, (nh + nkv, hd))
    v = qkv[..., (nh + nkv) * hd:].unflatten(-1, (nkv, hd))
    if w["q_norm"] is not None:  # qwen3: RMSNorm per head before the rotation
        qk = torch.cat([w["q_norm"](qk[..., :nh, :]), w["k_norm"](qk[..., nh:, :])], dim=-2)
    qk = qk * cos + _rotate_half(qk) * sin
    return qk[..., :nh, :], qk[..., nh:, :], v


def _mlp_residual(w: dict, h: torch.Tensor, attn_out: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """The rest of a layer after attention: output projection, residual, norm, SiLU-gated MLP,
    residual (the residual stream in float32)."""
    h = h + _linear(attn_out.to(dt), w["o"]).float()
    gate, up = _linear(_rms(h, w["norm2"]).to(dt), w["gate_up"]).chunk(2, dim=-1)
    return h + _linear(F.silu(gate) * up, w["down"]).float()


class LeanDecoder:
    """The decode step of ``model`` in ``dtype`` ("fp32" or "bf16"); see the module docstring.

    The fused (and, for bf16, all cast) weights are copies of the model's taken at construction
    (half a millisecond for the 3.4M-parameter fixture model), each product's weight also packed for
    oneDNN (:func:`_packed`, ``pack``; ``rows`` the batch to pack for): make one per generation, so
    that the engine always samples the current policy. Parameter version counters cannot tell when to
    rebuild: the fused AdamW kernel updates weights in place without bumping them."""

    @torch.no_grad()
    def __init__(self, model, dtype: str, pack: bool = True, rows: int = 64):
        self.model = model
        self.dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.layers = [_layer_weights(layer, self.dtype) for layer in model.base_model.layers]
        self.head = _cat_linear([model.get_output_embeddings()], self.dtype)
        if pack:
            for w in self.layers:
                w.update({k: _packed(w[k], rows) for k in ("qkv", "o", "gate_up", "down")})
            self.head = _packed(self.head, rows)
        self.final_norm = _norm(model.base_model.norm)

    @torch.no_grad()
    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, cache, key_mask: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, V) float32 after feeding ``tok`` (B,) at positions ``pos`` (B, 1), and the final
        (normed) hidden states (B, H) they come from. ``cache`` is the engine's buffer cache holding the
        previous positions; ``key_mask`` (B, n) marks the real keys among all n positions, the new one
        included."""
        base, dt = self.model.base_model, self.dtype
        h = base.embed_tokens(tok)  # (B, H) float32: the residual stream stays in float32, as under autocast
        cos, sin = base.rotary_emb(h[:, None], pos)  # (B, 1, hd)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, 1, 1, hd) against (B, 1, heads, hd)
        B, n = key_mask.shape
        allowed = key_mask.bool()[:, None, None, :]  # (B, 1, 1, n)
        for w, cl in zip(self.layers, cache.layers):
            hd, nh, nkv = w["head_dim"], w["heads"], w["kv_heads"]
            q, k, v = _rotated_qkv(w, _rms(h, w["norm1"]).to(dt)[:, None], cos, sin)  # (B, 1, heads, hd)
            if cl.vbuf.dtype != torch.float32:  # once per generation, after the model's own prefill under
                # autocast left float32 keys (rotated in float32) and bf16 values in the cache
                cl._set(cl.kbuf.to(dt).float(), cl.vbuf.float())
            t = cl.n
            # attention as the trainer computes it (SDPA's math kernel, _tree_layer): inputs rounded to
            # the model's dtype, then products, softmax and the weighted sum in float32; a bf16 product of
            # a sliced cache would also round the scores and run 1.3-2x slower on CPU
            cl.kbuf[:, :, t] = k[:, 0].to(dt)
            cl.vbuf[:, :, t] = v[:, 0]
            cl.n = t + 1
            cl.keys, cl.values = cl.kbuf[:, :, :t + 1], cl.vbuf[:, :, :t + 1]
            # grouped-query attention: the query heads of one kv head attend together, (B, kv, group, n)
            qg = q.reshape(B, nkv, nh // nkv, hd).to(dt).float() * w["scale"]
            scores = torch.matmul(qg, cl.keys.transpose(-1, -2))
            p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            h = _mlp_residual(w, h, torch.matmul(p, cl.values).reshape(B, nh * hd), dt)
        h = _rms(h, self.final_norm)  # float32, as the trainer's
        return _linear(h.to(dt), self.head).float(), h


# Where padding is at most this share of the packed rows, :func:`tree_states` computes it with the real
# tokens (in place) rather than moving the real tokens in and out of the padded rows around attention.
PADDING_COMPUTED = 0.05


def tree_states(model, ids: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor, real: torch.Tensor,
                dtype: str) -> torch.Tensor | None:
    """The final (normed) hidden states (N, H) of the N ``real`` (U, S) tokens of packed rows ``ids``
    (U, S) at positions ``pos`` (U, S), in row-major order, where query i of row u attends to key j iff
    ``allowed[u, i, j]`` (every query to at least one key): the backbone of
    :func:`tether.online.completion_states`' prefix-tree rows, with gradient to the model's
    parameters. None where :func:`lean_decoder` would be (the caller runs the model).

    The same arithmetic as the model's forward under tether's autocast with less work: the
    projections, norms and MLP run on the real tokens only (packed rows differ in width, and padding
    them to the widest was a third of a GRPO update's tokens), only attention sees the padded rows;
    fused projections (as the decode step), weights cast once per forward, the boolean mask turned into
    one additive mask for all layers, and grouped-query attention with each kv head's query heads
    stacked along the query axis (no repeated keys). Attention runs in float32, as SDPA's math kernel
    computes bf16 inputs."""
    if not _supported(model):
        return None
    with torch.autocast("cpu", enabled=False):  # casts are explicit here; attention stays float32
        dt = torch.bfloat16 if dtype == "bf16" else torch.float32
        base, sel = model.base_model, real.reshape(-1).nonzero()[:, 0]
        padded = len(sel) >= (1 - PADDING_COMPUTED) * real.numel()
        if padded:
            sel = torch.arange(real.numel())
        h = base.embed_tokens(ids.reshape(-1)[sel]).float()  # (N, H)
        cos, sin = base.rotary_emb(h[None], pos.reshape(-1)[sel][None])  # (1, N, hd)
        cos, sin = cos[0, :, None].float(), sin[0, :, None].float()  # (N, 1, hd) against (N, heads, hd)
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None, None]  # (U, 1, 1, S, S)
        # gradient_checkpointing (runs.train_mode): each layer's activations, fused weights included,
        # are recomputed in the backward instead of kept
        remat = torch.is_grad_enabled() and model.training and any(
            getattr(layer, "gradient_checkpointing", False) for layer in base.layers)
        for layer in base.layers:
            if remat:
                h = checkpoint(_weighted_tree_layer, h, cos, sin, bias, None if padded else sel, layer, dt,
                               use_reentrant=False)
            else:
                h = _weighted_tree_layer(h, cos, sin, bias, None if padded else sel, layer, dt)
        return _rms(h[real.reshape(-1)] if padded else h, _norm(base.norm))


def _weighted_tree_layer(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                         sel: torch.Tensor | None, layer, dt: torch.dtype) -> torch.Tensor:
    return _tree_layer(h, cos, sin, bias, sel, _layer_weights(layer, dt), dt)


def _tree_layer(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor, sel: torch.Tensor,
                w: dict, dt: torch.dtype) -> torch.Tensor:
    """One decoder layer over the real tokens h (N, H) of packed rows; ``sel`` (N,) their flat places in
    the (U, S) rows (None: h is all U·S of them), ``bias`` (U, 1, 1, S, S) 0 where a query may attend to
    a key and -inf elsewhere."""
    (U, _, _, S, _), hd, nh, nkv = bias.shape, w["head_dim"], w["heads"], w["kv_heads"]
    q, k, v = _rotated_qkv(w, _rms(h, w["norm1"]).to(dt), cos, sin)  # (N, heads, hd)
    # bf16 inputs rounded, then computed in float32 (SDPA's math kernel on CPU), in the padded rows
    qkv = torch.cat([q.to(dt).float() * w["scale"], k.to(dt).float(), v.float()], dim=1).flatten(1)
    if sel is not None:
        qkv = qkv.new_zeros(U * S, qkv.shape[1]).index_copy(0, sel, qkv)
    qkv = qkv.view(U, S, nh + 2 * nkv, hd)
    q = qkv[:, :, :nh].permute(0, 2, 1, 3).reshape(U, nkv, nh // nkv * S, hd)
    k, v = qkv[:, :, nh:nh + nkv].transpose(1, 2), qkv[:, :, nh + nkv:].transpose(1, 2)  # (U, kv, S, hd)
    scores = torch.matmul(q, k.transpose(-1, -2)).view(U, nkv, nh // nkv, S, S) + bias
    p = scores.softmax(-1).view(U, nkv, nh // nkv * S, S)
    out = torch.matmul(p, v).view(U, nh, S, hd).transpose(1, 2).reshape(U * S, nh * hd)
    return _mlp_residual(w, h, out if sel is None else out.index_select(0, sel), dt)


def lean_decoder(model, dtype: str, rows: int = 64) -> LeanDecoder | None:
    """The :class:`LeanDecoder` of ``model`` for batches of about ``rows``, or None where its
    architecture is not covered."""
    return LeanDecoder(model, dtype, rows=rows) if _supported(model) else None
