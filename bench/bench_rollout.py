"""Rollout speed: tether's KV-cache engine (and the same without its packed decode weights) vs
transformers' ``generate`` vs a naive loop (no cache).

On the peer fixture (../shared/peer/README.md: 8 prompts × 8 completions, 32 new tokens, temperature
1, fp32, 2 threads) or the embedded model. Prints s/rollout and generated tokens/s, median of repeats.

    .venv/bin/python bench/bench_rollout.py [--model /tmp/peer-fixture/model] [--repeats 5] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def naive(model, prompts, n, max_new, pad):
    """Sample by re-running the whole sequence every step (what a first implementation does)."""
    rows = [p for p in prompts for _ in range(n)]
    P = max(map(len, rows))
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in rows])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in rows])
    for _ in range(max_new):
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits[:, -1]
        tok = torch.multinomial(logits.softmax(-1), 1)
        ids, attn = torch.cat([ids, tok], 1), torch.cat([attn, torch.ones_like(tok)], 1)
    return max_new * len(rows)


def hf_generate(model, prompts, n, max_new, pad):
    rows = [p for p in prompts for _ in range(n)]
    P = max(map(len, rows))
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in rows])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in rows])
    out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                         max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=pad)
    return (out.shape[1] - P) * len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/peer-fixture/model")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether.modeling import resolve_model_path
    from tether.rollout import SamplingParams, TorchEngine

    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(str(args.tokenizer or path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts_file = path.parent / "prompts.jsonl"
    if prompts_file.is_file():
        texts = [json.loads(x)["prompt"] for x in prompts_file.read_text().splitlines()[:args.prompts]]
    else:
        texts = [f"Question: What is {a} + {a + 3}?\nAnswer:" for a in range(args.prompts)]
    prompts = [tok(t)["input_ids"] for t in texts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # the fixture model rarely emits EOS; make every method produce all max_new tokens for a fair count
    engine = TorchEngine(model, tok, dtype=args.dtype)
    engine.eos = None
    params = SamplingParams(max_new_tokens=args.max_new, n=args.n)

    def ours():
        r = engine.generate(prompts, params)
        return int(r.mask.sum())

    def unpacked():  # the decode step without its oneDNN-packed weights (decoding._packed)
        import tether.rollout as rollout
        from tether.decoding import LeanDecoder

        lean_decoder = rollout.lean_decoder
        rollout.lean_decoder = lambda m, d, rows=64: LeanDecoder(m, d, pack=False)
        try:
            return ours()
        finally:
            rollout.lean_decoder = lean_decoder

    methods = {"tether TorchEngine": ours, "  unpacked weights": unpacked,
               "transformers generate": lambda: hf_generate(model, prompts, args.n, args.max_new, pad)}
    if not args.skip_naive:
        methods["naive loop (no cache)"] = lambda: naive(model, prompts, args.n, args.max_new, pad)
    times: dict[str, list[float]] = {k: [] for k in methods}
    tokens: dict[str, int] = {}
    with torch.no_grad():
        for k, f in methods.items():  # warm-up
            f()
        for _ in range(args.repeats):  # interleaved
            for k, f in methods.items():
                t0 = time.perf_counter()
                tokens[k] = f()
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["transformers generate"])
    print(f"{args.prompts} prompts × {args.n} completions × {args.max_new} new tokens, {args.dtype}, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'method':<24} {'s/rollout':>10} {'gen tok/s':>10} {'vs generate':>12}")
    for k in methods:
        m = statistics.median(times[k])
        print(f"{k:<24} {m:>10.3f} {tokens[k] / m:>10.0f} {base / m:>11.2f}×")


if __name__ == "__main__":
    main()
