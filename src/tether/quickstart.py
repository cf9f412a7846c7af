"""``tether quickstart``: the whole pipeline on the embedded arithmetic world, no GPU, no download.

Stages: build (or reuse) the embedded model → SFT → held-out accuracy before and after → a run
report (markdown + PNG) with each stage's wall time. Later stages (reward model, DPO, GRPO, PPO)
append themselves here.
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
    sft_steps: int = Field(300, ge=1, description="SFT optimizer steps")
    sft_lr: float = Field(1e-3, gt=0, description="SFT peak learning rate")
    sft_batch_size: int = Field(64, ge=1, description="SFT examples per step")
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="autocast dtype; auto: bf16 where the CPU computes it natively")
    eval_samples: int = Field(300, ge=1, description="held-out prompts scored by greedy exact match")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    progress: bool = Field(True, description="show progress bars")


def run(cfg: QuickstartConfig) -> dict:
    from . import sft

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.time()
    print("[1/2] embedded model: building on first use (a few minutes on 2 cores), cached afterwards")
    model_dir = ensure_embedded(BuildConfig(), progress=cfg.progress)
    timings["build (or cache hit)"] = time.time() - t0
    print(f"      {model_dir}")

    t0 = time.time()
    print("[2/2] SFT on the arithmetic world")
    r = sft.train(sft.SFTConfig(
        model=str(model_dir), output_dir=str(out / "sft"), overwrite=True, seed=cfg.seed, max_steps=cfg.sft_steps,
        lr=cfg.sft_lr, batch_size=cfg.sft_batch_size, micro_batch_size=cfg.sft_batch_size,
        eval_samples=cfg.eval_samples, eval_every=max(1, cfg.sft_steps // 6), threads=cfg.threads, progress=cfg.progress,
        dtype=default_dtype() if cfg.dtype == "auto" else cfg.dtype))
    timings["sft"] = time.time() - t0

    before, after = r.eval_before["accuracy"], r.eval_after["accuracy"]
    summary = {
        "embedded model": str(model_dir),
        "held-out accuracy, pretrained model": f"{before:.1%}",
        "held-out accuracy, after SFT": f"{after:.1%}",
        "held-out prompts": r.eval_after["n"],
        **{f"wall time: {k} (s)": round(v, 1) for k, v in timings.items()},
        "SFT model": str(r.final_dir),
    }
    from .report import write_report

    stages = {"sft": read_metrics(r.run_dir / "metrics.jsonl")}
    md, png = write_report(out, "quickstart", stages["sft"], summary, stages)
    (out / "summary.json").write_text(json.dumps(
        {"accuracy": {"pretrained": before, "sft": after}, "timings_s": timings, "samples": r.eval_after["samples"]},
        indent=1))
    print()
    print(f"held-out accuracy: pretrained {before:.1%} -> SFT {after:.1%}  ({r.eval_after['n']} prompts)")
    print(f"checkpoint: {r.final_dir}")
    print(f"report:     {md}  (plot: {png})")
    return summary
