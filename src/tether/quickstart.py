"""``tether quickstart``: the whole pipeline on the embedded arithmetic world, no GPU, no download.

Stages: build (or reuse) the embedded model → SFT → Bradley-Terry reward model → DPO, each scored on
held-out problems, then a run report (markdown + PNG) with every stage's accuracy and wall time.
The online RL stages (GRPO, PPO) append themselves here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from .config import Config
from .embedded import BuildConfig, ensure_embedded
from .modeling import default_dtype
from .runlog import read_metrics


class QuickstartConfig(Config):
    """The main job: every stage on the embedded model, into one run folder."""

    output_dir: str = Field("runs/quickstart", description="run folder (replaced on each run)")
    seed: int = Field(0, description="seed of every stage")
    sft_steps: int = Field(500, ge=1, description="SFT optimizer steps (about half-way through learning the arithmetic: docs/results.md)")
    sft_lr: float = Field(1e-3, gt=0, description="SFT peak learning rate")
    sft_batch_size: int = Field(64, ge=1, description="SFT examples per step")
    reward_steps: int = Field(300, ge=0, description="reward-model optimizer steps (0: skip the stage)")
    dpo_steps: int = Field(400, ge=0, description="DPO optimizer steps (0: skip the stage)")
    dpo_pairs: int = Field(4000, ge=1, description="generated preference pairs DPO trains on (about 3 passes at 400 steps × 32: each pair's reference score is computed once and reused)")
    dpo_lr: float = Field(1e-4, gt=0, description="DPO peak learning rate")
    dpo_loss_type: list[str] = Field(["sigmoid", "sft"], description="DPO loss types (sigmoid + sft: DPO with an NLL anchor, as RPO)")
    grpo_steps: int = Field(125, ge=0, description="GRPO rollout steps from the SFT model (0: skip the stage); about two minutes on 2 cores")
    ppo_steps: int = Field(100, ge=0, description="PPO rollout steps from the SFT model (0: skip the stage); about two minutes on 2 cores")
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="autocast dtype; auto: bf16 where the CPU computes it natively")
    eval_samples: int = Field(300, ge=1, description="held-out prompts scored by greedy exact match")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    progress: bool = Field(True, description="show progress bars")


def run(cfg: QuickstartConfig) -> dict:
    from . import dpo, grpo, ppo, reward, sft

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = default_dtype() if cfg.dtype == "auto" else cfg.dtype
    common = dict(seed=cfg.seed, threads=cfg.threads, progress=cfg.progress, dtype=dtype, overwrite=True)
    n_stages = 2 + sum(n > 0 for n in (cfg.reward_steps, cfg.dpo_steps, cfg.grpo_steps, cfg.ppo_steps))
    timings: dict[str, float] = {}
    stages: dict[str, list] = {}
    table: list[tuple[str, str, str, str]] = []  # stage, greedy accuracy, preference accuracy, model

    t0 = time.time()
    print(f"[1/{n_stages}] embedded model (shipped with tether; 'tether build' rebuilds it locally)")
    model_dir = ensure_embedded(BuildConfig(), progress=cfg.progress)
    timings["embedded model"] = time.time() - t0
    print(f"      {model_dir}")

    t0 = time.time()
    print(f"[2/{n_stages}] SFT on the arithmetic world")
    s = sft.train(sft.SFTConfig(
        model=str(model_dir), output_dir=str(out / "sft"), max_steps=cfg.sft_steps, lr=cfg.sft_lr,
        batch_size=cfg.sft_batch_size, micro_batch_size=cfg.sft_batch_size, eval_samples=cfg.eval_samples,
        eval_every=max(1, cfg.sft_steps // 6), **common))
    timings["sft"] = time.time() - t0
    stages["sft"] = read_metrics(s.run_dir / "metrics.jsonl")
    acc = {"pretrained": s.eval_before["accuracy"], "sft": s.eval_after["accuracy"]}
    table += [("pretrained", f"{acc['pretrained']:.1%}", "", str(model_dir)),
              ("SFT", f"{acc['sft']:.1%}", "", str(s.final_dir))]
    final_dir, extra = s.final_dir, {}

    k = 3
    if cfg.reward_steps:
        t0 = time.time()
        print(f"[{k}/{n_stages}] Bradley-Terry reward model on arithmetic preference pairs")
        r = reward.train(reward.RewardConfig(model=str(s.final_dir), output_dir=str(out / "reward"),
                                             max_steps=cfg.reward_steps, eval_every=max(1, cfg.reward_steps // 6),
                                             **common))
        timings["reward model"] = time.time() - t0
        stages["reward"] = read_metrics(r.run_dir / "metrics.jsonl")
        extra["reward_pairwise_accuracy"] = r.eval_after["pairwise_accuracy"]
        table.append(("reward model", "", f"{r.eval_after['pairwise_accuracy']:.1%} (pairwise)", str(r.final_dir)))
        k += 1
    if cfg.dpo_steps:
        t0 = time.time()
        print(f"[{k}/{n_stages}] DPO from the SFT model")
        d = dpo.train(dpo.DPOConfig(model=str(s.final_dir), output_dir=str(out / "dpo"), max_steps=cfg.dpo_steps,
                                    arith_pairs=cfg.dpo_pairs, lr=cfg.dpo_lr, loss_type=cfg.dpo_loss_type,
                                    eval_samples=cfg.eval_samples, eval_every=max(1, cfg.dpo_steps // 4), **common))
        timings["dpo"] = time.time() - t0
        stages["dpo"] = read_metrics(d.run_dir / "metrics.jsonl")
        acc["dpo"] = d.eval_after["accuracy"]
        extra["dpo_preference_accuracy"] = d.eval_after["pref_accuracy"]
        table.append(("DPO", f"{acc['dpo']:.1%}", f"{d.eval_after['pref_accuracy']:.1%} (implicit reward)",
                      str(d.final_dir)))
        final_dir = d.final_dir
        k += 1
    online = (("GRPO", cfg.grpo_steps, grpo.train, grpo.GRPOConfig), ("PPO", cfg.ppo_steps, ppo.train, ppo.PPOConfig))
    for name, steps, train, cls in online:
        if not steps:
            continue
        t0 = time.time()
        print(f"[{k}/{n_stages}] {name} from the SFT model, exact-match reward")
        o = train(cls(model=str(s.final_dir), output_dir=str(out / name.lower()), max_steps=steps,
                      eval_samples=cfg.eval_samples, eval_every=max(1, steps // 4), **common))
        timings[name.lower()] = time.time() - t0
        stages[name.lower()] = read_metrics(o.run_dir / "metrics.jsonl")
        acc[name.lower()] = o.eval_after["accuracy"]
        last = [m for m in stages[name.lower()] if "reward" in m][-1]
        extra[f"{name.lower()}_final"] = {"reward": last["reward"], "kl": last.get("kl")}
        table.append((name, f"{acc[name.lower()]:.1%}", "", str(o.final_dir)))
        k += 1

    from .report import write_report

    summary = {"held-out prompts": s.eval_after["n"], **{f"wall time: {k} (s)": round(v, 1) for k, v in timings.items()}}
    md, png = write_report(out, "quickstart", stages["sft"], summary, stages)
    lines = ["", "| stage | held-out greedy accuracy | held-out preference accuracy | model |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {m} |" for a, b, c, m in table]
    md.write_text(md.read_text() + "\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"accuracy": acc, **extra, "timings_s": timings, "samples": s.eval_after["samples"]}, indent=1))
    print()
    for a, b, c, _ in table:
        print(f"  {a:<14} accuracy {b or '-':>6}   {c}")
    after = ", ".join(f"{k.upper()} {v:.1%}" for k, v in acc.items() if k not in ("pretrained", "sft"))
    print(f"held-out accuracy: pretrained {acc['pretrained']:.1%} -> SFT {acc['sft']:.1%}"
          + (f" -> {after}" if after else "") + f"  ({s.eval_after['n']} prompts)")
    print(f"checkpoint: {final_dir}")
    print(f"report:     {md}  (plot: {png})")
    return summary
