"""tether's DPO and reward-model training against TRL's, on the peer fixture and settings.

    .venv/bin/python bench/bench_preference.py [--fixture /tmp/peer-fixture] [--repeats 3]

Settings (shared/peer/README.md): the fixture's tiny Qwen2 and prefs.jsonl, batch 8 pairs,
max_length 128, 20 steps, lr 1e-5 constant, fp32, 2 threads, β 0.1, sigmoid loss. Each run is a
fresh process; tether and TRL runs are interleaved; steady state excludes the first 2 steps.

Variants:
  tether-same      identical semantics in fp32 (each pair's reference log-probs are computed the
                   first time it is drawn and kept, instead of every step: the same numbers, less work)
  tether-default   tether's defaults where they differ: bf16 autocast where the CPU has it
  trl              shared/peer/bench_trl.py (needs /tmp/peer-venv: bash shared/peer/setup.sh)

Prints s/step (steady mean), non-pad tokens/s, peak RSS and process start -> end of first step.
Figures, not assertions.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import peer_bench_args, run_tether, run_trl  # noqa: E402


def tether_run(kind: str, variant: str, fixture: Path, steps: int, workdir: Path) -> dict:
    out = workdir / f"{kind}-{variant}"
    args = [kind, f"model={fixture / 'model'}", f"data={fixture / 'prefs.jsonl'}", f"output_dir={out}", "overwrite=true",
            "batch_size=8", "micro_batch_size=8", "max_length=128", f"max_steps={steps}", "lr=1e-5",
            "schedule=constant", "warmup_steps=0", "weight_decay=0", "max_grad_norm=1", "seed=0", "threads=2",
            "eval_data=none", "progress=false", "report=false"]
    if kind == "dpo":
        args += ["beta=0.1", "loss_type=sigmoid"]  # tether's default reference: cached
    args += ["dtype=fp32"] if variant == "same" else []
    if variant == "default":
        from tether.modeling import default_dtype

        args += [f"dtype={default_dtype()}"]
    d = run_tether(out, ["tokens"], args)
    walls = [x["wall"] for x in d["recs"]]
    step_s = [b - a for a, b in zip(walls, walls[1:])]  # step i = wall[i] - wall[i-1], i >= 2
    steady = step_s[1:]  # steps 3..N
    toks = [x["tokens"] for x in d["recs"]][2:]
    return {"s_per_step": statistics.mean(steady), "tokens_per_s": sum(toks) / sum(steady), "rss_mib": d["rss_mib"],
            "start_to_first_step_s": walls[0] - d["spawn"]}


def trl_run(kind: str, fixture: Path, steps: int, workdir: Path) -> dict | None:
    res = run_trl(kind, fixture, steps, workdir)
    if res is None:
        return None
    setup = sum(res["setup_s"].values())
    return {"s_per_step": res["steady_s_per_step"], "tokens_per_s": res["steady_tokens_per_s"],
            "rss_mib": res["peak_rss_mib"], "start_to_first_step_s": setup + res["first_steps_s"][0]}


def main() -> None:
    args, work = peer_bench_args(__doc__, 20, ("--kinds", "dpo,reward", "comma-separated trainers"))
    rows: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for kind in args.kinds.split(","):
            for variant in ("same", "default", "trl"):
                r = trl_run(kind, args.fixture, args.steps, work) if variant == "trl" else \
                    tether_run(kind, variant, args.fixture, args.steps, work)
                if r is not None:
                    rows.setdefault((kind, variant), []).append(r)
                    print(f"  repeat {rep + 1} {kind:<6} {variant:<8} {r['s_per_step']:.4f} s/step", file=sys.stderr)
    print(f"{'trainer':<7} {'variant':<15} {'s/step':>8} {'tok/s':>8} {'vs TRL':>7} {'RSS MiB':>8} {'start->1st step s':>18}")
    for kind in args.kinds.split(","):
        trl = rows.get((kind, "trl"))
        trl_s = statistics.median(r["s_per_step"] for r in trl) if trl else None
        for variant in ("same", "default", "trl"):
            rs = rows.get((kind, variant))
            if not rs:
                continue
            med = sorted(rs, key=lambda r: r["s_per_step"])[len(rs) // 2]
            speed = f"{trl_s / med['s_per_step']:.2f}x" if trl_s else "-"
            name = {"same": "tether-same", "default": "tether-default", "trl": "trl"}[variant]
            print(f"{kind:<7} {name:<15} {med['s_per_step']:8.4f} {med['tokens_per_s']:8.0f} {speed:>7} "
                  f"{med['rss_mib']:8.0f} {med['start_to_first_step_s']:18.2f}")
    print(f"(median of {args.repeats} repeats; runs in {work})")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
