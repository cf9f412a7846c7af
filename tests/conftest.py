"""Shared fixtures. Slow learning runs are marked ``slow`` and run with SLOW=1 or CI=true."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SLOW") == "1" or os.environ.get("CI", "").lower() in ("1", "true"):
        return
    skip = pytest.mark.skip(reason="slow learning run: set SLOW=1 (CI=true runs it too)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_build_config():
    """A fast build: small corpus, untrained weights (for plumbing tests, not learning)."""
    from tether.embedded import BuildConfig

    return BuildConfig(corpus_facts=3000, corpus_sentences=1500, pretrain_steps=0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_build_config) -> Path:
    """Tokenizer + randomly initialised tiny Qwen2, saved as an HF folder."""
    from tether.embedded import build_init

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_init(tiny_build_config, out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from tether.modeling import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def gpt2_model(tmp_path_factory, tokenizer) -> Path:
    """Another architecture than the embedded Qwen2, as a user's local checkpoint: a tiny random GPT-2
    (absolute positions, LayerNorm, GELU, none of tether's own forwards) with GPT-2's default dropout of
    0.1, and the tiny model's tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=128,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    out = tmp_path_factory.mktemp("gpt2") / "model"
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The real embedded model (pretrained): the build shipped with tether."""
    from tether.embedded import ensure_embedded

    return ensure_embedded(progress=False)


SFT_START = Path(__file__).parent / "assets" / "arith-sft"


@pytest.fixture(scope="session")
def sft_model() -> Path:
    """Where alignment starts in the learning tests: a shipped model of the quickstart's SFT recipe
    (500 steps × 64 from the embedded model; ``assets/arith-sft/provenance.json``). The recipe stops
    mid-transition, so run here it would land anywhere in 30-49% by seed and CPU kernel, and every
    learning test would measure where SFT stopped as much as its algorithm (docs/hosts.md)."""
    return SFT_START
