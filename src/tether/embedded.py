"""The embedded default model: a byte-level BPE tokenizer and a tiny Qwen2 pretrained on the
arithmetic world, saved as a plain transformers checkpoint that ``AutoModelForCausalLM`` /
``AutoTokenizer`` load.

Shape (the peer fixture's, ``shared/peer/README.md``): hidden 256, 4 layers, 4 heads, 2 KV heads,
intermediate 688, tied embeddings, vocab 2048, 3.4 M parameters.

tether ships one build of the default recipe (``assets/arith``, 14 MB in float32) and uses it
whenever the default :class:`BuildConfig` is asked for. Why ship rather than build on first use: the
tokenizer and the corpus are deterministic, but bf16 pretraining is not bit-reproducible across CPU
kernels, and 1,000 steps amplify the rounding into a different model (an Intel Xeon's build and an AMD
EPYC's gave 20% and 39% after the same SFT). Shipping gives every machine the same start, and a first
run without the few minutes of the build. ``tether build`` (or any other recipe) still builds locally
into a cache folder named by the recipe's hash, so a changed recipe never reuses a stale model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from .arith import ArithSpec, pretrain_corpus
from .config import Config
from .modeling import default_dtype

EOS, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]  # ids 0..3: eos_token_id 0, pad_token_id 1
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2's pre-tokenization (one token per digit). transformers 5 rebuilds the pre-tokenizer of any
# model_type="qwen2" checkpoint loaded with AutoTokenizer, so training with the same pipeline keeps
# tokenizer.json, PreTrainedTokenizerFast and AutoTokenizer in agreement.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
BUILD_FORMAT = 1  # bump when the recipe changes in a way BuildConfig does not capture
SHIPPED_DIR = Path(__file__).parent / "assets" / "arith"


class BuildConfig(Config):
    """How the embedded model is built. Its hash names the cache folder."""

    seed: int = Field(0, description="seed of the corpus, the initial weights and pretraining")
    arith: ArithSpec = Field(default_factory=ArithSpec, description="difficulty of the arithmetic world")
    vocab_size: int = Field(2048, description="tokenizer and embedding size")
    hidden_size: int = Field(256, description="model width")
    num_hidden_layers: int = Field(4, description="transformer blocks")
    num_attention_heads: int = Field(4, description="query heads")
    num_key_value_heads: int = Field(2, description="key/value heads (grouped-query attention)")
    intermediate_size: int = Field(688, description="MLP width")
    max_position_embeddings: int = Field(512, description="longest sequence the model takes")
    corpus_facts: int = Field(200000, description="arithmetic facts in the pretraining corpus")
    corpus_sentences: int = Field(3000, description="lines of English-like text in the corpus")
    pretrain_steps: int = Field(1000, description="optimizer steps of pretraining (0: random weights)")
    pretrain_batch_size: int = Field(8, description="packed rows of pretrain_max_length tokens per step")
    pretrain_max_length: int = Field(256, description="tokens per packed pretraining row")
    pretrain_lr: float = Field(2e-3, description="peak learning rate of pretraining (cosine schedule)")
    pretrain_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="autocast dtype of pretraining; auto: bf16 where the CPU computes it natively")

    def resolved_dtype(self) -> str:
        return default_dtype() if self.pretrain_dtype == "auto" else self.pretrain_dtype

    def key(self) -> str:
        values = {**self.model_dump(mode="json"), "pretrain_dtype": self.resolved_dtype()}
        blob = json.dumps({"format": BUILD_FORMAT, **values}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$TETHER_CACHE``, else ``$XDG_CACHE_HOME/tether``, else ``~/.cache/tether``."""
    if os.environ.get("TETHER_CACHE"):
        return Path(os.environ["TETHER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tether"


def train_tokenizer(lines: list[str], vocab_size: int, max_length: int):
    """Byte-level BPE trained with ``tokenizers`` on ``lines``, wrapped for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=max_length,
        padding_side="right", clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_model(cfg: BuildConfig, tokenizer):
    """A randomly initialised ``Qwen2ForCausalLM`` (seeded) of the configured shape."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def build_init(cfg: BuildConfig, out: Path) -> list[str]:
    """Write the tokenizer and the untrained model to ``out``; return the pretraining corpus."""
    lines = pretrain_corpus(cfg.arith, cfg.corpus_facts, cfg.corpus_sentences, cfg.seed)
    tokenizer = train_tokenizer(lines, cfg.vocab_size, cfg.max_position_embeddings)
    model = init_model(cfg, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return lines


def build(cfg: BuildConfig, out: Path, progress: bool = True) -> Path:
    """Build the embedded model into ``out`` (tokenizer, random init, then pretraining)."""
    from . import sft

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    init_dir = out / "init"
    lines = build_init(cfg, init_dir)
    if cfg.pretrain_steps > 0:
        corpus = out / "corpus.jsonl"
        with open(corpus, "w") as f:
            for line in lines:
                f.write(json.dumps({"text": line}) + "\n")
        run = sft.SFTConfig(
            model=str(init_dir), data=str(corpus), eval_data="none", output_dir=str(out / "pretrain"),
            seed=cfg.seed, max_steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch_size,
            micro_batch_size=cfg.pretrain_batch_size, packing=True, max_length=cfg.pretrain_max_length,
            lr=cfg.pretrain_lr, warmup_steps=max(1, cfg.pretrain_steps // 20), schedule="cosine",
            save_every=0, progress=progress, report=False, dtype=cfg.resolved_dtype(),
        )
        result = sft.train(run)
        final = Path(result.final_dir)
    else:
        final = init_dir
    model_dir = out / "model"
    shutil.copytree(final, model_dir)
    (out / "build.json").write_text(json.dumps(
        {"key": cfg.key(), "config": cfg.model_dump(mode="json"), "seconds": round(time.time() - t0, 1)}, indent=2))
    return model_dir


def shipped_model(cfg: BuildConfig | None = None) -> Path | None:
    """The shipped build's folder when ``cfg`` is the recipe it was built with, else None.

    The recipe is compared as written (``pretrain_dtype="auto"``, not what this CPU resolves it to):
    the shipped weights serve every machine, whatever its kernels.
    """
    meta = SHIPPED_DIR / "build.json"
    if not meta.is_file():  # a source tree without the asset
        return None
    info = json.loads(meta.read_text())
    recipe = (cfg or BuildConfig()).model_dump(mode="json")
    return SHIPPED_DIR if info["format"] == BUILD_FORMAT and info["config"] == recipe else None


def ensure_embedded(cfg: BuildConfig | None = None, cache_dir: Path | None = None, progress: bool = True,
                    shipped: bool = True) -> Path:
    """Path of the embedded model: the shipped build for the default recipe (unless ``shipped`` is
    False), else the cached local build of ``cfg``, building it first if needed.

    The build runs in a temporary folder beside the cache entry and is renamed into place when
    complete, under a file lock, so concurrent callers neither collide nor see half a model.
    """
    from filelock import FileLock

    cfg = cfg or BuildConfig()
    if shipped and (path := shipped_model(cfg)) is not None:
        return path
    root = cache_dir or default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"arith-{cfg.key()}"
    if (final / "model" / "config.json").is_file():
        return final / "model"
    with FileLock(str(root / f"arith-{cfg.key()}.lock")):
        if (final / "model" / "config.json").is_file():
            return final / "model"
        tmp = root / f".arith-{cfg.key()}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build(cfg, tmp, progress=progress)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return final / "model"
