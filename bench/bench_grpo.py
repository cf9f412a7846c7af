"""tether's GRPO (and PPO on the same batch) against TRL's GRPO, on the peer fixture and settings.

    .venv/bin/python bench/bench_grpo.py [--fixture /tmp/peer-fixture] [--repeats 3] [--steps 10]

Settings (shared/peer/README.md): the fixture's tiny Qwen2 and prompts.jsonl, 8 prompts × 8
completions, 32 new tokens, temperature 1, β 0.04 (a reference model), ε 0.2, loss dapo, scale_rewards
group, lr 1e-5 constant, fp32, 2 threads, reward 1 if the answer is among the completion's numbers.
Each run is a fresh process; tether and TRL runs are interleaved; steady state excludes 2 steps.

Variants:
  grpo-same     identical semantics in fp32
  grpo-default  tether's defaults where they differ: bf16 autocast where the CPU has it
  grpo-model    grpo-same with lean_forward=false: the model's own forward (transformers') for the update and
                the reference instead of tether's packed-tree forward (the same maths, rounded differently)
  grpo-mixed    grpo-same sampled in bf16 (rollout_dtype=bf16; training in fp32), which turns the sampler
                correction on (sequence_mask, free with one update per rollout): the mismatch is logged
  ppo-same      PPO on the same batch: a separate critic (the costlier kind; PPO's default is a value
                head), one update per rollout, fp32
  trl           shared/peer/bench_trl.py --trainers grpo (needs /tmp/peer-venv: bash shared/peer/setup.sh)

Prints s/step, prompt+completion tokens/s, the time split (generation, reference, update), peak RSS.
Figures, not assertions.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import peer_bench_args, run_tether, run_trl  # noqa: E402

TIMES = ["time/generate", "time/reference", "time/update"]


def tether_run(variant: str, fixture: Path, steps: int, workdir: Path) -> dict:
    algo, mode = variant.split("-")
    out = workdir / variant
    args = [algo, f"model={fixture / 'model'}", f"data={fixture / 'prompts.jsonl'}", f"output_dir={out}",
            "overwrite=true", "prompts_per_step=8", "num_generations=8", "max_new_tokens=32", "temperature=1.0",
            "top_p=1.0", "top_k=0", "beta=0.04", "reward=answer_in_numbers", f"max_steps={steps}", "lr=1e-5",
            "schedule=constant", "warmup_steps=0", "weight_decay=0", "max_grad_norm=1", "seed=0", "threads=2",
            "eval_data=none", "progress=false", "report=false", "micro_batch_size=64", "epochs=1", "mini_batches=1"]
    if algo == "grpo":
        args += ["loss_type=dapo", "epsilon=0.2", "scale_rewards=group", "kl_penalty=loss", "kl_estimator=k3"]
    else:
        args += ["critic=separate"]
    if mode == "mixed":
        args += ["dtype=fp32", "rollout_dtype=bf16"]
    elif mode == "default":
        from tether.modeling import default_dtype

        args += [f"dtype={default_dtype()}"]
    else:
        args += ["dtype=fp32"] + (["lean_forward=false"] if mode == "model" else [])
    d = run_tether(out, ["tokens", "logp_gap", *TIMES], args)
    recs = d["recs"]
    walls = [x["wall"] for x in recs]
    steady = [b - a for a, b in zip(walls, walls[1:])][1:]  # steps 3..N
    rest = recs[2:]
    split = {k: statistics.mean(x[f"time/{k}"] for x in rest) for k in ("generate", "reference", "update")}
    return {"s_per_step": statistics.mean(steady), "tokens_per_s": sum(x["tokens"] for x in rest) / sum(steady),
            "rss_mib": d["rss_mib"], "split": split, "logp_gap": statistics.mean(x["logp_gap"] for x in rest)}


def trl_run(fixture: Path, steps: int, workdir: Path) -> dict | None:
    res = run_trl("grpo", fixture, steps, workdir)
    if res is None:
        return None
    gen = res["steady_generation_s_per_step"]
    return {"s_per_step": res["steady_s_per_step"], "tokens_per_s": res["steady_tokens_per_s"],
            "rss_mib": res["peak_rss_mib"], "split": {"generate": gen, "reference": float("nan"),
                                                      "update": res["steady_s_per_step"] - gen}}


def main() -> None:
    args, work = peer_bench_args(__doc__, 10, ("--variants", "grpo-same,grpo-default,ppo-same,trl", "comma-separated variants"))
    variants = args.variants.split(",")
    rows: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for v in variants:
            r = trl_run(args.fixture, args.steps, work) if v == "trl" else tether_run(v, args.fixture, args.steps, work)
            if r is not None:
                rows.setdefault(v, []).append(r)
                print(f"  repeat {rep + 1} {v:<13} {r['s_per_step']:.3f} s/step", file=sys.stderr)
    trl = rows.get("trl")
    trl_s = statistics.median(r["s_per_step"] for r in trl) if trl else None
    print(f"{'variant':<13} {'s/step':>7} {'tok/s':>7} {'vs TRL GRPO':>11} {'generate':>9} {'reference':>9} "
          f"{'update':>7} {'RSS MiB':>8} {'logp gap':>9}")
    for v in variants:
        rs = rows.get(v)
        if not rs:
            continue
        med = sorted(rs, key=lambda r: r["s_per_step"])[len(rs) // 2]
        sp = med["split"]
        speed = f"{trl_s / med['s_per_step']:.2f}x" if trl_s else "-"
        print(f"{v:<13} {med['s_per_step']:7.3f} {med['tokens_per_s']:7.0f} {speed:>11} {sp['generate']:9.3f} "
              f"{sp['reference']:9.3f} {sp['update']:7.3f} {med['rss_mib']:8.0f} {med.get('logp_gap', float('nan')):9.1e}")
    print(f"(median of {args.repeats} repeats, {args.steps} steps each; trl's 'update' is everything but generate; "
          f"runs in {work})")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
