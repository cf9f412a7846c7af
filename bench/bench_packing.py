"""The online trainers' forward over completions: plain rows, one packed tree row per prompt, and the
cost-based split over packed rows that tether uses (``online._tree_rows``).

On the peer fixture's model (8 prompts × 8 completions, fp32 or bf16, 2 threads) with random
completions that share no prefix (the case where one packed row per prompt is widest), for each
completion length: the update's forward and backward (log-probs of every token, summed) and the
reference's no-grad forward, median of interleaved repeats in one process.

    .venv/bin/python bench/bench_packing.py [--fixture /tmp/peer-fixture] [--lengths 32,200] [--dtype fp32]

Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tether import online
from tether.modeling import load_causal_lm, load_tokenizer

LAYOUTS = {"plain rows": None, "one tree row per prompt": lambda model: 1e12, "split (tether)": online.tree_token_cost}


def run(model, prompts: list[list[int]], comp: torch.Tensor, dtype: str, layout: str) -> tuple[float, float]:
    """Seconds of one update forward + backward and one reference forward in ``layout``."""
    share = LAYOUTS[layout] is not None
    if share:
        online.tree_token_cost = LAYOUTS[layout]
    mask = torch.ones_like(comp)
    t = time.perf_counter()
    lp, _ = online.completion_logps(model, prompts, comp, mask, dtype=dtype, pad=1, share_prompts=share)
    lp.sum().backward()
    t1 = time.perf_counter()
    with torch.no_grad():
        online.completion_logps(model, prompts, comp, mask, dtype=dtype, pad=1, share_prompts=share,
                                with_entropy=False)
    return t1 - t, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", type=Path, default=Path("/tmp/peer-fixture"))
    ap.add_argument("--lengths", default="32,200")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = load_causal_lm(str(args.fixture / "model"))
    tok = load_tokenizer(str(args.fixture / "tokenizer"))
    lines = [json.loads(line)["prompt"] for line in (args.fixture / "prompts.jsonl").open()][:8]
    prompts = [tok(p)["input_ids"] for p in lines for _ in range(8)]
    print(f"{'completion tokens':>17} {'layout':<24} {'update s':>8} {'reference s':>11}")
    for length in map(int, args.lengths.split(",")):
        comp = torch.randint(2, model.config.vocab_size, (len(prompts), length))
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in LAYOUTS}
        for rep in range(args.repeats + 1):  # the first round warms up
            for layout in LAYOUTS:
                model.zero_grad()
                t = run(model, prompts, comp, args.dtype, layout)
                if rep:
                    times[layout].append(t)
        for layout, ts in times.items():
            print(f"{length:>17} {layout:<24} {statistics.median(u for u, _ in ts):8.3f} "
                  f"{statistics.median(r for _, r in ts):11.3f}")
    online.tree_token_cost = LAYOUTS["split (tether)"]


if __name__ == "__main__":
    main()
