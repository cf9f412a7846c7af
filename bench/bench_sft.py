"""SFT throughput on the embedded model: tether's step against the plain transformers step.

    .venv/bin/python bench/bench_sft.py [--steps 20] [--batch 32] [--threads 2]

Prints s/step and non-pad tokens/s for:
  * hf-labels    model(input_ids, attention_mask, labels) — full logits, HF's loss (the usual loop)
  * tether-fp32  logits only at completion positions, loss normalised over the step
  * tether-bf16  the same under bf16 autocast
  * tether-pack  bf16 and packing (no padding at all)
Each variant runs on the same rows, after 3 warm-up steps. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tether.data import collate, pack, read_rows, tokenize_sft
from tether.embedded import ensure_embedded
from tether.losses import completion_nll
from tether.modeling import autocast, load_causal_lm, load_tokenizer, target_logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tether.arith import ArithSpec, sft_rows

    path = ensure_embedded(progress=False)
    tok = load_tokenizer(path)
    exs, _ = tokenize_sft(read_rows(sft_rows(ArithSpec(), args.batch * (args.steps + 3), 0)), tok, 128)
    batches = [exs[i:i + args.batch] for i in range(0, len(exs), args.batch)]
    pad = tok.pad_token_id

    def hf_step(model, rows):
        b = collate(rows, pad)
        labels = torch.full_like(b.input_ids, -100)  # HF shifts labels itself: label t is token t
        labels[:, 1:] = b.targets[:, :-1]
        model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss.backward()
        return b.n_tokens

    def tether_step(dtype, packed):
        def step(model, rows):
            items = pack(rows, 128) if packed else rows
            b = collate(items, pad)
            with autocast(dtype):
                logits, targets = target_logits(model, b)
            completion_nll(logits, targets, b.n_targets).backward()
            return b.n_tokens
        return step

    variants = {"hf-labels": hf_step, "tether-fp32": tether_step("fp32", False),
                "tether-bf16": tether_step("bf16", False), "tether-pack": tether_step("bf16", True)}
    print(f"{'variant':<13} {'s/step':>8} {'tokens/s':>9}   (batch {args.batch}, {args.steps} steps, {args.threads} threads)")
    for name, fn in variants.items():
        model = load_causal_lm(path).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times, toks = [], 0
        for i, rows in enumerate(batches[: args.steps + 3]):
            t0 = time.perf_counter()
            n = fn(model, rows)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 3:
                times.append(time.perf_counter() - t0)
                toks += n
        print(f"{name:<13} {statistics.median(times):8.4f} {toks / sum(times):9.0f}")


if __name__ == "__main__":
    main()
