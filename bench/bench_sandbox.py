"""Sandbox throughput: runs per second of a small passing solution, by pool size.

    .venv/bin/python bench/bench_sandbox.py [--runs 200]
"""

from __future__ import annotations

import argparse
import time

from tether.sandbox import Limits, SandboxPool, available

CODE = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    if available():
        raise SystemExit(f"sandbox unavailable: {available()}")
    print(f"{'workers':>7} {'runs':>5} {'runs/s':>7} {'statuses':>10}")
    for workers in (1, 2, 4):
        with SandboxPool(workers=workers, limits=Limits(timeout_s=5)) as pool:
            t0 = time.perf_counter()
            results = pool.map([(CODE, TESTS)] * args.runs)
            dt = time.perf_counter() - t0
        ok = sum(r.status == "passed" for r in results)
        print(f"{workers:>7} {args.runs:>5} {args.runs / dt:>7.1f} {ok:>4}/{args.runs} ok")


if __name__ == "__main__":
    main()
