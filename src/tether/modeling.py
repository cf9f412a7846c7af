"""Loading models and tokenizers, and the forward passes the trainers share."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError
from .data import IGNORE, TokenBatch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_model_path(model: str) -> Path:
    """``"embedded"`` is the arithmetic model shipped with tether; anything else must be a local
    transformers checkpoint folder, or a LoRA adapter folder (:func:`load_causal_lm`)."""
    if model == "embedded":
        from .embedded import ensure_embedded

        return ensure_embedded()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"model {model!r}: not a local transformers checkpoint (no config.json there); "
            "use model=embedded for the built-in arithmetic model")
    return path


def padding_id(tokenizer) -> int:
    """The id used to fill padding: the pad token, else EOS (masks never depend on it)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS and every EOS of the model's generation
    config, which is where ``generate`` and vLLM stop too (chat models end a turn with their own token:
    Llama 3's ``<|eot_id|>``, Qwen's ``<|im_end|>``, often not the tokenizer's EOS)."""
    ids = [tokenizer.eos_token_id]
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen if isinstance(gen, (list, tuple)) else [gen]
    return sorted({int(i) for i in ids if i is not None})


# what a saved transformers tokenizer leaves in its folder (one of them at least)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_tokenizer(path: str | Path, chat_template_kwargs: dict[str, Any] | None = None):
    """The tokenizer saved in ``path``; for a LoRA adapter folder without one, its base model's.
    ``chat_template_kwargs``: variables every rendering of its chat template gets (Qwen3's
    ``enable_thinking``; TRL's ``chat_template_kwargs``), bound to this tokenizer object only."""
    from transformers import AutoTokenizer

    from . import lora

    if lora.is_adapter_folder(path) and not (Path(path) / "tokenizer_config.json").is_file():
        return load_tokenizer(lora.adapter_base(path), chat_template_kwargs)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        # transformers would go on to blame a missing sentencepiece or tiktoken
        raise FileNotFoundError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the model's "
                                "tokenizer there with tokenizer.save_pretrained")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if chat_template_kwargs:  # an instance attribute: saving the tokenizer keeps the template as it was
        own = [n for n, p in inspect.signature(tokenizer.apply_chat_template).parameters.items()
               if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n in chat_template_kwargs]
        if own:  # tether sets these per call (add_generation_prompt, tokenize...): a fixed value corrupts rows
            raise ConfigError(f"chat_template_kwargs: {', '.join(own)} are apply_chat_template's own arguments, "
                              "which tether sets for each rendering; only the template's variables go here "
                              "(e.g. enable_thinking)")
        tokenizer.apply_chat_template = functools.partial(tokenizer.apply_chat_template, **chat_template_kwargs)
    return tokenizer


def load_causal_lm(path: str | Path):
    """A causal LM in float32 from a transformers folder, or from a LoRA adapter folder (a LoRA run's
    checkpoint, ``final/adapter``) as its base model with the adapter merged in."""
    from transformers import AutoModelForCausalLM

    from . import lora

    if lora.is_adapter_folder(path):
        return lora.load_merged(path, load_causal_lm)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def disable_dropout(model: torch.nn.Module) -> int:
    """Zero every dropout rate of ``model``, so that its training forward computes the function its
    eval forward does (TRL's ``disable_dropout``): ``nn.Dropout`` modules, and the float rates that
    attention modules read at call time (``attention_dropout`` in transformers' Llama/Qwen attention).
    With dropout on, an RL update's log-probs are a random perturbation of the sampler's (GPT-2's
    default 0.1 put them 0.05 nats a token apart) and a KL to an eval-mode reference is biased from
    step 0. Returns how many rates were non-zero. The saved config keeps the model's own rates."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                changed += value > 0
                setattr(module, name, 0.0)
    return changed


def with_cache(model, cache) -> dict:
    """The keyword that hands a KV cache to ``model``'s forward: ``cache`` since transformers 5.24,
    ``past_key_values`` before (deprecated in 5.24, removed in 5.40)."""
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {key: cache, "use_cache": True}


def context_length(model) -> int | None:
    """The longest sequence ``model`` declares it takes (``max_position_embeddings``, GPT-2's
    ``n_positions``), or None where its config names none (ALiBi models)."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_context(model, needed: int, what: str) -> None:
    """Refuse ``needed`` positions past the model's context: a model with learned positions (GPT-2,
    OPT) fails deep in its embedding with an IndexError, a rotary one runs past what it was trained on."""
    n = context_length(model)
    if n is not None and needed > n:
        raise ConfigError(f"{what} needs {needed} positions, past the model's context of {n} "
                          f"({type(model).__name__})")


def default_dtype() -> str:
    """"bf16" where the CPU (or GPU) computes bf16 natively, else "fp32". Emulated bf16 is slower
    than fp32, so tether only autocasts where it pays."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    flags = _cpuinfo()
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def _cpuinfo() -> str:
    """/proc/cpuinfo's text ("" where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_description() -> str:
    """The CPU's model name and its bf16 units, e.g. "AMD EPYC 9R14 (AVX512-BF16), 2 threads": bf16
    kernels round differently on AMX and AVX512-BF16, so fixed-seed figures are per host (docs/hosts.md)."""
    info = _cpuinfo()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    units = [label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")) if flag in info]
    return f"{name} ({', '.join(units) or 'no bf16 units'}), {torch.get_num_threads()} threads"


@contextlib.contextmanager
def autocast(dtype: str, math_attention: bool = False):
    """The context of tether's forward passes on CPU.

    bf16: autocast (AVX512-BF16 makes matmuls ~2x faster), attention by SDPA's default kernel, or
    its math kernel with ``math_attention``.
    fp32: SDPA's math kernel, faster at tether's row lengths (one query per decoded token; tens of
    tokens per row), where the CPU flash kernel's per-call set-up dominates: an fp32 64 × 32-token
    rollout 10-15% faster, training steps 2-4%.

    The math kernel is faster under bf16 too, and as accurate (it computes bf16 inputs in float32;
    its q/k/v gradients are closer to float64 than the flash kernel's). The trainers that start from
    an SFT model ask for it: the online trainers' forward over completions (a few query tokens after
    a shared, cached context), where the flash kernel's backward took 39% of a GRPO update, and the
    reward-model, attribute and DPO forwards (steps ~18% faster on the peer fixture). SFT, and with
    it the embedded model's pretraining, keeps the flash kernel: switching changes the trajectory of
    the quickstart's SFT stage, which stops mid-transition, and its seed-0 model then is a
    poor start for RL (on one host GRPO lost 3 points from it; on another PPO learned nothing from it
    in two minutes, with either critic). The learning tests now start from a shipped SFT model, so
    the kernel could switch; that waits for a version that re-measures the quickstart's figures
    (docs/benchmarks.md). With CUDA present the default kernel choice stands."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with contextlib.ExitStack() as stack:
        if dtype == "bf16":
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        if (dtype != "bf16" or math_attention) and not torch.cuda.is_available():
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def same_attention_kernels() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` of ``torch.utils.checkpoint``: the recompute in the backward runs with the SDPA
    kernels its forward had. :func:`autocast` picks them for the forward, and the backward runs
    outside that context; a recompute under other kernels saves other tensors, which checkpoint
    refuses ("different metadata")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flags = {SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled(),
             SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
             SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
             SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled()}
    return contextlib.nullcontext(), sdpa_kernel([b for b, on in flags.items() if on])


class _CompiledWhenTraining:
    """A decoder block's ``forward``: compiled where gradients are on (the training forwards), eager
    elsewhere. Generation and no-grad scoring keep the eager path: the KV-cache paths would each
    compile again for little work."""

    def __init__(self, forward):
        self.eager = forward
        self.compiled = torch.compile(forward, dynamic=True)  # dynamic: one graph for every batch shape

    def __call__(self, *args, **kwargs):
        return (self.compiled if torch.is_grad_enabled() else self.eager)(*args, **kwargs)


def decoder_blocks(model) -> list[torch.nn.Module]:
    """The model's repeated transformer blocks: the modules transformers names in
    ``_no_split_modules`` (the unit FSDP and accelerate shard by), of the model or of the
    transformers model inside a wrapper (the attribute heads)."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model) -> None:
    """Compile each of ``model``'s decoder blocks for its training forwards (regional compilation).

    Inductor fuses the element-wise work (RMSNorm, rotary, SiLU, autocast's casts) that takes two
    thirds of a small model's step on CPU. The blocks share their code, so one block's graphs serve
    them all: on 2 cores the first step spends about 40 s compiling (7 s once inductor's on-disk
    cache has the kernels) against about 70 s for the whole backbone as one graph, and the steps
    after it are faster too (docs/benchmarks.md). The parameters and the state dict are untouched:
    only each block's ``forward`` is wrapped (:class:`_CompiledWhenTraining`)."""
    if not torch.cuda.is_available() and not has_cxx_compiler():
        raise ConfigError("torch_compile=true needs a C++ compiler (g++ or clang++): inductor builds its CPU kernels with it")
    blocks = decoder_blocks(model)
    if not blocks:
        raise ConfigError(f"torch_compile=true: {type(model).__name__} names no decoder block class in _no_split_modules")
    for block in blocks:
        if not isinstance(block.forward, _CompiledWhenTraining):
            block.forward = _CompiledWhenTraining(block.forward)


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler that inductor's CPU backend can use is on the PATH."""
    return any(shutil.which(c) for c in ("g++", "clang++", "c++"))


# Per-model checks: a few tokens through the model's own forward against tether's way of computing the
# same thing, once per model (the answer is kept on it), so that no architecture trains on other numbers.
@contextlib.contextmanager
def _probing(model):
    """How the checks run: eval mode (no dropout), no gradient, float32."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(next(model.parameters()).device.type, enabled=False):
            yield
    finally:
        model.train(was)


def _probe_ids(model, n: int) -> torch.Tensor:
    device = next(model.parameters()).device
    return (torch.arange(n, device=device) * 7 + 3)[None] % model.config.vocab_size


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max().clamp(min=1)))


class _GivenStates(torch.nn.Module):
    """Stands in for a causal LM's backbone and returns the final hidden states it is given."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(last_hidden_state=self.hidden)


def _logits_through_model(model, hidden: torch.Tensor) -> torch.Tensor:
    """``model``'s own head on final hidden states (M, H): its forward runs with the backbone swapped
    for the given states, so whatever it does around the LM head happens (with gradient)."""
    prefix = model.base_model_prefix
    backbone = model._modules[prefix]
    model._modules[prefix] = _GivenStates(hidden[None])
    try:
        ids = torch.zeros(1, hidden.shape[0], dtype=torch.long, device=hidden.device)
        return model(input_ids=ids, use_cache=False).logits[0]
    finally:
        model._modules[prefix] = backbone


def _head_kind(model) -> str:
    """"plain" where the logits are the output embedding of the final hidden states, "model" where the
    model post-processes them (Gemma 2's soft-capping, Cohere's logit scale, Granite's logit scaling,
    MiniCPM3's hidden scaling…). Decided once per model by comparing both with its own forward on a
    few tokens; an architecture whose head neither reproduces is refused rather than trained on wrong
    log-probs."""
    kind = getattr(model, "_tether_head", None)
    if kind is not None:
        return kind
    ids = _probe_ids(model, 5)
    with _probing(model):
        want = model(input_ids=ids, use_cache=False).logits[0].float()
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]
        if _close(model.get_output_embeddings()(hidden).float(), want):
            kind = "plain"
        elif _close(_logits_through_model(model, hidden).float(), want):
            kind = "model"
        else:
            raise ConfigError(f"{type(model).__name__}: its logits are not a function of the backbone's final "
                              "hidden states that tether can reproduce; this architecture is not supported")
    model._tether_head = kind
    return kind


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (M, V) of final hidden states (M, H), as ``model``'s forward computes them: the output
    embedding, then whatever the architecture does to logits (:func:`_head_kind`). Every trainer that
    runs the backbone and the head apart (to compute logits only where a loss needs them) goes
    through here, so its log-probs are the model's."""
    if _head_kind(model) == "plain":
        return model.get_output_embeddings()(hidden)
    return _logits_through_model(model, hidden)


def target_logits(model, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n, V) and targets (n,) at the positions that carry a loss, and only there.

    The backbone runs on the whole batch; the LM head (a (hidden × V) matmul) runs only on the
    hidden states whose next token is a target: prompts and padding never become logits.
    """
    sel = batch.targets != IGNORE
    kwargs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                  attention_mask=None if batch.position_ids is not None else batch.attention_mask)
    hidden = model.base_model(**kwargs).last_hidden_state  # (B, T, H)
    return head_logits(model, hidden[sel]), batch.targets[sel]


def token_logps(model, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log π(target) as a (B, T) tensor (0 where there is no target) and the (B, T)
    target mask. Logits exist only at target positions (see :func:`target_logits`)."""
    logits, targets = target_logits(model, batch)
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    mask = batch.targets != IGNORE
    full = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device)
    return full.masked_scatter(mask, lp), mask


def _pair_mask(model, batch) -> torch.Tensor:
    """The packed pair batch's (B, 1, T, T) attention (:func:`attention_mask_4d`)."""
    return attention_mask_4d(model, batch.allowed[:, None])


def packed_pair_hidden(model, batch) -> torch.Tensor:
    """Backbone hidden states (B·T, H) of a :class:`tether.data.PairBatch`, under its custom
    attention (a 4D mask transformers passes through unchanged)."""
    hidden = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                              attention_mask=_pair_mask(model, batch), use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def packed_pair_last_hidden(model, batch) -> torch.Tensor:
    """Final hidden states (2B, H) at each completion's last token, chosen then rejected: the
    last decoder layer runs only there (:func:`hidden_at`)."""
    flat = torch.cat([batch.chosen_last, batch.rejected_last])
    T = batch.input_ids.shape[1]
    return hidden_at(model, flat // T, flat % T, input_ids=batch.input_ids, position_ids=batch.position_ids,
                     attention_mask=_pair_mask(model, batch))


def packed_token_logps(hidden: torch.Tensor, batch, head) -> torch.Tensor:
    """log π of every completion token of a packed pair batch, (n,) in the order of ``batch.tgt``.
    ``head`` maps hidden states to logits; it runs once per row of ``batch.logit_pos``."""
    logits = head(hidden[batch.logit_pos]).float()  # (m, V)
    return logits[batch.src, batch.tgt] - torch.logsumexp(logits, -1)[batch.src]


def packed_pair_logps(model, batch, ld_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs (chosen (B,), rejected (B,)) of a packed pair batch.

    The LM head runs once per position of ``batch.logit_pos``: a context token's log-prob is
    computed once and counted in both sequences. With ``ld_alpha`` (LD-DPO) the tokens past the
    shorter completion count ``ld_alpha`` times, as in :func:`tether.losses.dpo.sequence_logps`.
    """
    lp = packed_token_logps(packed_pair_hidden(model, batch), batch, lambda h: head_logits(model, h))
    B = batch.lengths.shape[0] // 2
    if ld_alpha is not None:
        public = torch.minimum(batch.lengths[:B], batch.lengths[B:]).repeat(2)[batch.seq]
        lp = torch.where(batch.tok < public, lp, ld_alpha * lp)
    seqs = torch.zeros(2 * B, dtype=lp.dtype, device=lp.device).index_add(0, batch.seq, lp)
    return seqs[:B], seqs[B:]


# ---------------------------------------------------------------------------------------------
# The last layer at a few positions
# ---------------------------------------------------------------------------------------------
# Decoder layers whose forward is h + attn(norm1(h)), then h + mlp(norm2(h)), with q/k/v/o
# projections, rotary embeddings and (qwen3) per-head q/k norms: the last layer can be run at a
# few query positions by hand. Other architectures take the full forward.
_PRE_NORM_DECODERS = {"llama", "mistral", "qwen2", "qwen3"}


class _LastLayerInputs(Exception):
    """Raised by a pre-hook on the last decoder layer to stop the backbone there."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict):
        self.hidden, self.kwargs = hidden, kwargs


def sliding_window(model) -> int | None:
    """The attention window of ``model``'s sliding-window layers (Mistral, Gemma 2/3, Qwen2 with
    ``use_sliding_window``, Phi-3…), None where no layer slides."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False or (
            types is not None and not any("sliding" in t for t in types)):
        return None
    return int(window)


def attention_mask_4d(model, allowed: torch.Tensor) -> torch.Tensor:
    """A (B, 1, T, T) mask of which positions each query may attend to, as ``model``'s attention takes
    it: boolean for SDPA, additive (0 / float32 min) for eager and the others."""
    if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _packed_like_plain(model, ids: torch.Tensor, rows: list[list[int]], **packed) -> bool:
    """Whether ``model``'s backbone, run on the packed row ``ids`` (1, n) with the inputs ``packed``
    (position ids, a mask), gives at the columns of each of ``rows`` the states of those tokens run
    alone as one plain row (:func:`_probing`); a forward that raises is a no."""
    with _probing(model):
        base = model.base_model
        try:
            got = base(input_ids=ids, use_cache=False, **packed).last_hidden_state[0]
        except Exception:  # noqa: BLE001 - a model that cannot take these inputs is answered "no"
            return False
        return all(_close(got[cols], base(input_ids=ids[:, cols], use_cache=False).last_hidden_state[0])
                   for cols in rows)


def _masks_honoured(model) -> bool:
    """Whether ``model`` computes a packed row under a 4-D mask and explicit position ids as it computes
    the plain rows packed into it. Decided once per model on a small tree: [a b c1 … c8] and [a b e] in
    one row, e at column 10 and position 2, seeing a, b and itself (shorter in a shorter window). ALiBi
    models (BLOOM, MPT, Falcon with alibi) take their position bias from the 2-D mask or the column and
    fail or differ (by 8 columns' bias here), flash attention takes no 4-D mask."""
    if getattr(model, "_tether_masks", None) is None:
        n = min(11, max(4, sliding_window(model) or 11))  # within a window, which a 4-D mask would not apply
        ids = _probe_ids(model, n)
        allowed = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        allowed[n - 1, 2:n - 1] = False  # e sees a, b and itself
        pos = torch.tensor([[*range(n - 1), 2]], device=ids.device)
        model._tether_masks = _packed_like_plain(model, ids, [list(range(n - 1)), [0, 1, n - 1]], position_ids=pos,
                                                 attention_mask=attention_mask_4d(model, allowed[None, None]))
    return model._tether_masks


def packing_honoured(model) -> bool:
    """Whether ``model`` keeps examples packed into one row apart by their restarting position ids alone
    (what SFT's ``packing=true`` relies on: transformers derives the block-diagonal attention from them).
    Decided once per model on two examples of 4 and 3 tokens. BLOOM, MPT, OPT and XGLM do not: their
    attention would cross the examples."""
    if getattr(model, "_tether_packing", None) is None:
        ids = _probe_ids(model, 7)
        pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=ids.device)
        model._tether_packing = _packed_like_plain(model, ids, [[0, 1, 2, 3], [4, 5, 6]], position_ids=pos)
    return model._tether_packing


def custom_masks_exact(model, longest: int) -> bool:
    """Whether tether's own 4-D masks (packed prefix trees, pair rows) give ``model`` the attention it
    would compute itself on sequences of up to ``longest`` positions: the model must honour such masks
    and position ids at all (:func:`_masks_honoured`), and as transformers hands a 4-D mask to every
    layer as it is, a sliding window would not apply: exact while every sequence fits in it. Where not,
    the callers run plain rows under the model's own masks."""
    window = sliding_window(model)
    return (window is None or longest <= window) and _masks_honoured(model)


def _last_layer_at_supported(base) -> bool:
    cfg = base.config
    layers = getattr(base, "layers", None)
    return (getattr(cfg, "model_type", None) in _PRE_NORM_DECODERS and layers is not None and len(layers) > 0
            and sliding_window(base) is None
            and len(layers) == cfg.num_hidden_layers and getattr(cfg, "attention_dropout", 0.0) == 0.0
            and (getattr(cfg, "layer_types", None) or ["full_attention"])[-1] == "full_attention"
            and getattr(cfg, "_attn_implementation", "sdpa") in ("sdpa", "eager"))


def hidden_at(model, rows: torch.Tensor, cols: torch.Tensor, **forward: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the last norm) at positions ``(rows[i], cols[i])``, shape (n, H).

    The last decoder layer only matters at the positions read (a reward head reads one or two per
    row): its keys and values are computed everywhere, its queries, output projection and MLP only
    there, which skips most of one layer of the forward and the backward. ``forward`` holds the
    backbone's inputs (input_ids, position_ids, attention_mask). Architectures outside
    ``_PRE_NORM_DECODERS`` run the full backbone and gather.
    """
    base = model.base_model
    if not _last_layer_at_supported(base):
        return base(**forward, use_cache=False).last_hidden_state[rows, cols]
    layer = base.layers[-1]

    def stop(_module, args, kwargs):
        raise _LastLayerInputs(args[0] if args else kwargs["hidden_states"], kwargs)

    handle = layer.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        base(**forward, use_cache=False)
        raise RuntimeError("the backbone did not reach its last layer")
    except _LastLayerInputs as e:
        h, kw = e.hidden, e.kwargs
    finally:
        handle.remove()
    attn = layer.self_attn
    hd = attn.head_dim
    x = layer.input_layernorm(h)  # (B, T, H)
    x_q = x[rows, cols]  # (n, H)
    q = attn.q_proj(x_q).view(len(rows), -1, hd)  # (n, heads, hd)
    k = attn.k_proj(x).view(*x.shape[:2], -1, hd)  # (B, T, kv heads, hd)
    v = attn.v_proj(x).view(*x.shape[:2], -1, hd)
    if getattr(attn, "q_norm", None) is not None:  # qwen3: RMSNorm per head before the rotation
        q, k = attn.q_norm(q), attn.k_norm(k)
    # rotary tables (B, T, hd); transformers builds them (1, T, hd) when no position_ids are given
    cos, sin = (t.expand(x.shape[0], -1, -1) for t in kw["position_embeddings"])
    q = q * cos[rows, cols][:, None] + _rotate_half(q) * sin[rows, cols][:, None]
    k = k * cos[:, :, None] + _rotate_half(k) * sin[:, :, None]
    k, v = k[rows].transpose(1, 2), v[rows].transpose(1, 2)  # (n, kv heads, T, hd): each query's own row
    mask = kw.get("attention_mask")
    if mask is None:  # plain causal: keys up to the query's column
        allowed = torch.arange(x.shape[1], device=x.device)[None] <= cols[:, None]
        mask = allowed[:, None, None]  # (n, 1, 1, T)
    else:
        mask = mask[rows, :, cols][:, :, None] if mask.dim() == 4 else mask  # (n, 1, 1, T)
    if mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k, v, attn_mask=mask, scale=attn.scaling,
        enable_gqa=q.shape[1] != k.shape[1])  # (n, heads, 1, hd)
    h_q = h[rows, cols] + attn.o_proj(out.reshape(len(rows), -1))
    h_q = h_q + layer.mlp(layer.post_attention_layernorm(h_q))
    return base.norm(h_q)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
