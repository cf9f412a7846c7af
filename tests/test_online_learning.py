"""Learning runs of the online trainers on the arithmetic world (slow: SLOW=1 or CI=true).

From the quickstart's SFT model (39.7% on this evaluation), with the exact-match reward and fixed seeds,
each trainer must raise greedy held-out accuracy by the issue's 15 points and its sampled reward, and
keep the KL to the reference bounded, in a fixed number of steps: GRPO 125, PPO 110, each about two
minutes of training on the 2-core Intel Xeon host (0.95 s and 1.1 s a step). Wall time is measured, not
asserted (README, where the figures of other seeds and budgets are)."""

import pytest

from tether import grpo, ppo
from tether.modeling import default_dtype
from tether.runlog import read_metrics

pytestmark = pytest.mark.slow


def check(result, min_gain: float):
    """Greedy held-out accuracy gains ``min_gain``, the sampled reward (1,024 samples a step, 8 steps
    averaged) rises by 3 points, and the KL to the reference stays bounded."""
    before, after = result.eval_before["accuracy"], result.eval_after["accuracy"]
    recs = [m for m in read_metrics(result.run_dir / "metrics.jsonl") if "reward" in m]
    first = sum(m["reward"] for m in recs[:8]) / 8
    last = sum(m["reward"] for m in recs[-8:]) / 8
    # accuracies are k / 300: a gain of exactly 15 points must not fail by one rounding ulp (1e-9)
    assert after - before >= min_gain - 1e-9, (before, after)
    assert last >= first + 0.03, (first, last)
    # KL per sequence, over 5-step windows: one step's k3 estimate can spike when a few sampled tokens
    # are far likelier under the reference (its e^(log π_ref - log π) term)
    kl = [m["kl"] for m in recs]
    assert max(sum(kl[i:i + 5]) / 5 for i in range(len(kl) - 4)) < 1.0


def test_grpo_learns_arithmetic(sft_model, tmp_path):
    r = grpo.train(grpo.GRPOConfig(model=str(sft_model), output_dir=str(tmp_path / "grpo"), max_steps=125,
                                   eval_samples=300, progress=False, report=False, dtype=default_dtype()))
    # measured on the Intel host: +16.6 (seed 0; 116 s of training, KL over 5 steps ≤ 0.59), +17.6 (seed 1)
    check(r, min_gain=0.15)


def test_ppo_learns_arithmetic(sft_model, tmp_path):
    r = ppo.train(ppo.PPOConfig(model=str(sft_model), output_dir=str(tmp_path / "ppo"), max_steps=110,
                                eval_samples=300, progress=False, report=False, dtype=default_dtype()))
    # measured on the Intel host: +17.3 at 110 steps (seed 0, old values read from the engine's sampled
    # states; KL over 5 steps ≤ 0.52; +16.3 with the earlier separate values forward). Seed 1 is slower
    # to start: +12.6 at step 100, +19.6 at 125 (the earlier version; README)
    check(r, min_gain=0.15)
