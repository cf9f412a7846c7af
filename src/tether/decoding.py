"""One decode step of a pre-norm decoder (Llama, Mistral, Qwen2, Qwen3) on its weights directly.

A decode step feeds one token per row. At the sizes tether trains on a CPU, transformers' forward
spends as long in per-op overhead (mask building, cache bookkeeping, twelve small projections per
layer, and under autocast a bf16 copy of every weight at every step) as in the matmuls. This step
does the same arithmetic with fewer, larger ops:

- q, k, v as one projection and gate, up as one (weights concatenated once per generation);
- bf16 weights cast once, not at every step, when the engine samples in bf16;
- keys and values written in place into the engine's preallocated cache, and grouped-query
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
        hasattr(layer.mlp, "gate_proj") for layer in base.layers)


def _norm_eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _cat_linear(mods: list[torch.nn.Linear], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (sum of outputs × in) weight and bias for several projections of the same input."""
    w = torch.cat([m.weight.detach() for m in mods]).to(dtype)
    if all(m.bias is None for m in mods):
        return w, None
    b = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in mods])
    return w, b.to(dtype)


class LeanDecoder:
    """The decode step of ``model`` in ``dtype`` ("fp32" or "bf16"); see the module docstring.

    The fused (and, for bf16, cast) weights are a snapshot of the model's taken at construction
    (half a millisecond for the 3.4M-parameter fixture model): make one per generation, so that the
    engine always samples the current policy. Parameter version counters cannot tell when to
    rebuild: the fused AdamW kernel updates weights in place without bumping them."""

    @torch.no_grad()
    def __init__(self, model, dtype: str):
        self.model = model
        self.dtype = dt = torch.bfloat16 if dtype == "bf16" else torch.float32
        base = model.base_model
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append({
                "qkv": _cat_linear([a.q_proj, a.k_proj, a.v_proj], dt), "o": _cat_linear([a.o_proj], dt),
                "gate_up": _cat_linear([m.gate_proj, m.up_proj], dt), "down": _cat_linear([m.down_proj], dt),
                "norm1": (layer.input_layernorm.weight.detach(), _norm_eps(layer.input_layernorm)),
                "norm2": (layer.post_attention_layernorm.weight.detach(), _norm_eps(layer.post_attention_layernorm)),
                "q_norm": getattr(a, "q_norm", None), "k_norm": getattr(a, "k_norm", None),
                "heads": a.q_proj.out_features // a.head_dim, "kv_heads": a.k_proj.out_features // a.head_dim,
                "head_dim": a.head_dim, "scale": a.scaling,
            })
        self.head = _cat_linear([model.get_output_embeddings()], dt)
        self.final_norm = (base.norm.weight.detach(), _norm_eps(base.norm))

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
            x = F.rms_norm(h, (h.shape[-1],), w["norm1"][0], w["norm1"][1]).to(dt)
            qkv = F.linear(x, *w["qkv"])
            qk = qkv[:, :(nh + nkv) * hd].view(B, 1, nh + nkv, hd)
            v = qkv[:, (nh + nkv) * hd:].view(B, nkv, hd)
            if w["q_norm"] is not None:  # qwen3: RMSNorm per head before the rotation
                qk = torch.cat([w["q_norm"](qk[:, :, :nh]), w["k_norm"](qk[:, :, nh:])], dim=2)
            qk = qk * cos + _rotate_half(qk) * sin  # q and k heads rotated together; float32 as under autocast
            q, k = qk[:, :, :nh], qk[:, :, nh:]
            t = cl.n
            cl.kbuf[:, :, t] = k[:, 0]
            cl.vbuf[:, :, t] = v
            cl.n = t + 1
            cl.keys, cl.values = cl.kbuf[:, :, :t + 1], cl.vbuf[:, :, :t + 1]
            # grouped-query attention: the query heads of one kv head attend together, (B, kv, group, n)
            qg = q.reshape(B, nkv, nh // nkv, hd).to(cl.keys.dtype)
            scores = torch.matmul(qg, cl.keys.transpose(-1, -2)).float() * w["scale"]
            p = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(cl.values.dtype)
            out = torch.matmul(p, cl.values).reshape(B, nh * hd).to(dt)
            h = h + F.linear(out, *w["o"]).float()
            x = F.rms_norm(h, (h.shape[-1],), w["norm2"][0], w["norm2"][1]).to(dt)
            gate, up = F.linear(x, *w["gate_up"]).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, *w["down"]).float()
        h = F.rms_norm(h, (h.shape[-1],), self.final_norm[0], self.final_norm[1])  # float32, as the trainer's
        return F.linear(h.to(dt), *self.head).float(), h


def lean_decoder(model, dtype: str) -> LeanDecoder | None:
    """The :class:`LeanDecoder` of ``model``, or None where its architecture is not covered."""
    return LeanDecoder(model, dtype) if _supported(model) else None
