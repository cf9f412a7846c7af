"""Learning runs of the online trainers on the arithmetic world (slow: SLOW=1 or CI=true).

From the quickstart's SFT model, with the exact-match reward and fixed seeds, each trainer must raise
its sampled reward and greedy held-out accuracy and keep the KL to the reference bounded, in a fixed
number of steps: GRPO 75, PPO (value-head critic) 110, about two minutes each on the AMD EPYC host of
earlier stops (1.6 s and 1.06 s a step) and 4-5 minutes on an Intel Xeon host (3.6 s and 2.6 s). Wall
time is measured, not asserted (README). Issue 5 asks for +15 points in two minutes; what these budgets
reach is in the README and below (+10 to +12 with the weight average that final/ holds), so the
thresholds here are lower. The embedded model was built on
each machine until tether shipped one build (the Intel host's). The SFT model here is the quickstart's
500-step one (39.7% on this evaluation), about where the AMD host's own build reached in 300 steps; the
300-step SFT model of the shipped build (23%) passed the same thresholds."""

import pytest

from tether import grpo, ppo
from tether.modeling import default_dtype
from tether.runlog import read_metrics

pytestmark = pytest.mark.slow


def check(result, min_gain: float):
    """Greedy held-out accuracy gains ``min_gain``, the sampled reward (512-1,024 samples a step, 8 steps
    averaged) rises by 3 points, and the KL to the reference stays bounded."""
    before, after = result.eval_before["accuracy"], result.eval_after["accuracy"]
    recs = [m for m in read_metrics(result.run_dir / "metrics.jsonl") if "reward" in m]
    first = sum(m["reward"] for m in recs[:8]) / 8
    last = sum(m["reward"] for m in recs[-8:]) / 8
    assert after >= before + min_gain, (before, after)
    assert last >= first + 0.03, (first, last)
    # KL per sequence, over 5-step windows: one step's k3 estimate can spike when a few sampled tokens
    # are far likelier under the reference (its e^(log π_ref - log π) term); PPO's seed-0 run has one
    # step at 1.24 nats between steps at 0.48 and 0.55
    kl = [m["kl"] for m in recs]
    assert max(sum(kl[i:i + 5]) / 5 for i in range(len(kl) - 4)) < 1.0


def test_grpo_learns_arithmetic(sft_model, tmp_path):
    r = grpo.train(grpo.GRPOConfig(model=str(sft_model), output_dir=str(tmp_path / "grpo"), max_steps=75,
                                   eval_samples=300, progress=False, report=False, dtype=default_dtype()))
    # measured with the weight average (ema_decay 0.95, the default; Intel host, 500-step SFT): +12.0 (seed 0),
    # +12.3 (seed 1); the last iterates gained +9.0 / +7.3. Before the average: +8.3, +7.3 from the 300-step
    # SFT model, +11.7 on the AMD host
    check(r, min_gain=0.06)


def test_ppo_learns_arithmetic(sft_model, tmp_path):
    r = ppo.train(ppo.PPOConfig(model=str(sft_model), output_dir=str(tmp_path / "ppo"), max_steps=110,
                                eval_samples=300, progress=False, report=False, dtype=default_dtype()))
    # measured with the weight average (the default): +10.3 on the Intel host (the last iterate +8.3). Before
    # it: +12.0 on the AMD host (value head sharing the backbone); on the Intel host, from the 300-step SFT
    # model, +3.7 with the detached head, +1.3 shared. PPO's greedy gain depends on the start more than
    # GRPO's (README), hence the lower bar
    check(r, min_gain=0.03)
