"""Memory and time of LoRA and gradient checkpointing on a model bigger than the embedded one.

    .venv/bin/python bench/bench_memory.py [--steps 5] [--layers 8] [--hidden 768] [--tokens 256]

Builds a random Qwen2 (default hidden 768, 8 layers, 12 heads, 4 KV heads, MLP 2048, the embedded
tokenizer's 2048-token vocabulary: 52M parameters) and a file of plain-text rows of ``--tokens``
tokens, then runs ``tether sft`` on it (16 rows a step, one micro-batch, bf16 where the CPU has it)
in a fresh process per variant: full fine-tuning and ``lora_rank=16``, each with and without
``gradient_checkpointing``. Prints the process's peak RSS (imports included: about 450 MiB of it)
and the mean s/step of steps 2..N. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import run_tether  # noqa: E402

VARIANTS = {
    "full": [],
    "full + checkpointing": ["gradient_checkpointing=true"],
    "lora 16": ["lora_rank=16", "lr=1e-3"],
    "lora 16 + checkpointing": ["lora_rank=16", "lr=1e-3", "gradient_checkpointing=true"],
}


def build(folder: Path, layers: int, hidden: int, tokens: int) -> tuple[Path, Path]:
    """A random Qwen2 with the embedded tokenizer, and rows of about ``tokens`` tokens."""
    import random

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tether.modeling import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("embedded"))
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 192),
                      intermediate_size=int(hidden * 8 / 3) // 64 * 64, max_position_embeddings=2 * tokens,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    rng = random.Random(0)
    with open(folder / "rows.jsonl", "w") as f:
        for _ in range(256):
            ids = [rng.randrange(3, len(tok)) for _ in range(tokens)]  # re-tokenized: cut to max_length
            f.write(json.dumps({"text": tok.decode(ids)}) + "\n")
    return folder / "model", folder / "rows.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tether-bench-memory-"))
    model, rows = build(work, args.layers, args.hidden, args.tokens)
    n_params = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 4 / 1e6
    print(f"model: {n_params:.0f}M parameters, {args.layers} layers, hidden {args.hidden}; rows of {args.tokens} tokens, "
          f"16 a step")
    print(f"{'variant':26s} {'peak RSS (MiB)':>15s} {'s/step':>8s}")
    for name, extra in VARIANTS.items():
        out = work / name.replace(" ", "_").replace("+", "")
        d = run_tether(out, ["step_time"], [
            "sft", f"model={model}", f"data={rows}", f"output_dir={out}", "overwrite=true",
            f"max_steps={args.steps}", "batch_size=16", "micro_batch_size=16", f"max_length={args.tokens}", "overlong=truncate",
            "eval_data=none", "progress=false", "report=false", "warmup_steps=0", "threads=2", *extra])
        times = [r["step_time"] for r in d["recs"][1:]]
        print(f"{name:26s} {d['rss_mib']:15.0f} {statistics.mean(times):8.2f}", flush=True)


if __name__ == "__main__":
    main()
