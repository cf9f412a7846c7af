"""The sampler-mismatch correction (truncated / masked importance sampling, token or sequence level) and
DeepSeek-V3.2's off-policy sequence mask: against TRL 1.16.0's own code on fixed tensors
(``tests/assets/trl_sampler_reference.json``, made by the script beside it), then in the trainers."""

import json
import math
from pathlib import Path

import pytest
import torch

from tether.losses.policy import PolicyLossConfig, off_policy_mask, policy_loss, sampler_weights

REF = json.loads((Path(__file__).parent / "assets" / "trl_sampler_reference.json").read_text())
TRL_NAMES = {"epsilon": "epsilon_low", "importance_sampling_level": "importance_level"}
SAMPLER_KEYS = ("vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max", "off_policy_mask_threshold")


def case_id(c: dict) -> str:
    return "-".join(f"{k.removeprefix('vllm_importance_sampling_')}={v}" for k, v in c["config"].items()
                    if k not in ("epsilon",)) + ("-onpolicy" if c["on_policy"] else "")


@pytest.mark.parametrize("case", REF["cases"], ids=[case_id(c) for c in REF["cases"]])
def test_matches_trl(case):
    inp = {k: torch.tensor(v, dtype=torch.float64) for k, v in REF["inputs"].items() if k != "lengths"}
    trl = case["config"]
    cfg = PolicyLossConfig(**{TRL_NAMES.get(k, k): v for k, v in trl.items() if k not in SAMPLER_KEYS},
                           epsilon_high=trl["epsilon"], max_completion_length=inp["mask"].shape[1])
    mask, adv = inp["mask"], inp["advantages"]
    logps = (inp["old"] if case["on_policy"] else inp["logps"]).clone().requires_grad_(True)
    correct = trl.get("vllm_importance_sampling_correction", True)
    rho = None
    if correct:
        rho = sampler_weights(inp["old"], inp["sampler"], mask, trl["vllm_importance_sampling_mode"],
                              trl.get("vllm_importance_sampling_clip_min"),
                              trl.get("vllm_importance_sampling_clip_max", 3.0))
        torch.testing.assert_close(rho, torch.tensor(case["importance_sampling_ratio"], dtype=torch.float64),
                                   rtol=1e-12, atol=0)
        assert not rho.requires_grad
    keep = None
    if trl.get("off_policy_mask_threshold") is not None:
        keep = off_policy_mask(adv, logps, inp["sampler"], mask, trl["off_policy_mask_threshold"])
        assert 0 < keep.sum() < len(keep)  # the case drops some sequences, not all
    # TRL computes π_old with the trainer when it corrects, and takes sg(π) when it does not
    old = inp["old"] if correct else None
    loss, _ = policy_loss(logps, old, adv, mask, cfg, inp["ref"], num_tokens=float(mask.sum()),
                          sampler_weights=rho, keep=keep)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(case["loss"], dtype=torch.float64), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(logps.grad, torch.tensor(case["dloss_dlogps"], dtype=torch.float64),
                               rtol=1e-6, atol=1e-12)


def test_weights_are_one_when_the_sampler_is_the_trainer():
    lp = -torch.rand(4, 6)
    mask = torch.ones(4, 6)
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        assert torch.equal(sampler_weights(lp, lp, mask, mode), torch.ones_like(sampler_weights(lp, lp, mask, mode)))


def test_masked_weights_drop_and_truncated_ones_clip():
    old = torch.zeros(2, 3)
    sampler = torch.tensor([[0.0, -2.0, 0.0], [0.0, 0.0, 0.0]])  # token 1 of row 0: ρ = e² ≈ 7.4
    mask = torch.ones(2, 3)
    assert sampler_weights(old, sampler, mask, "token_truncate")[0, 1] == 3.0
    assert sampler_weights(old, sampler, mask, "token_mask")[0, 1] == 0.0
    assert torch.equal(sampler_weights(old, sampler, mask, "sequence_mask"), torch.tensor([[0.0], [1.0]]))
    # off the mask the sampler's log-prob does not count; a NaN one neither
    assert sampler_weights(old, sampler, torch.tensor([[1.0, 0, 1], [1, 1, 1]]), "sequence_mask")[0, 0] == 1.0
    nan = sampler.clone()
    nan[0, 1] = float("nan")
    assert sampler_weights(old, nan, mask, "token_mask")[0, 1] == 1.0
    with pytest.raises(ValueError, match="sampler correction"):
        sampler_weights(old, sampler, mask, "none")


def test_weights_scale_the_policy_term_not_the_kl():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 5, generator=g, dtype=torch.float64)
    ref = lp - 0.1 * torch.rand(3, 5, generator=g, dtype=torch.float64)
    adv, mask = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64)
    cfg = PolicyLossConfig(beta=0.1)
    rho = torch.full((3, 5), 0.5, dtype=torch.float64)
    half, _ = policy_loss(lp, None, adv, mask, cfg, ref, sampler_weights=rho)
    plain, _ = policy_loss(lp, None, adv, mask, PolicyLossConfig(beta=0.0), ref)
    full, _ = policy_loss(lp, None, adv, mask, cfg, ref)
    # (policy + β KL) with the policy term halved = full - policy/2
    torch.testing.assert_close(half, full - plain / 2)


# ---------------------------------------------------------------------------------------------
# in the trainers: a sampler whose log-probs are off by a known amount
# ---------------------------------------------------------------------------------------------
SHIFT = 1.5  # nats: e^1.5 ≈ 4.5, past the default clip of 3


def _by_length(prompts, completions, meta):
    return [float(len(c) % 5) for c in completions]


def run(module, cls, tiny_model, tmp_path, monkeypatch, shift_all=False, shift=SHIFT, unscored=None, **kw):
    """A few steps where the engine reports each completion's first token ``shift`` nats less likely
    than it sampled it (every token, with ``shift_all``), as a sampler that rounds differently would,
    or reports ``unscored`` (NaN, -inf) for it, as an engine that could not score it."""
    from tether import rollout, rewards

    monkeypatch.setitem(rewards.REWARDS, "by_length", _by_length)
    generate = rollout.TorchEngine.generate

    def skewed(self, prompts, params):
        r = generate(self, prompts, params)
        if params.temperature > 0:  # not the greedy evaluation
            which = r.mask.float() if shift_all else torch.zeros_like(r.logprobs).index_fill_(1, torch.tensor([0]), 1.0)
            if unscored is None:
                r.logprobs -= shift * which * r.mask
            else:
                r.logprobs[(which * r.mask).bool()] = unscored
        return r

    monkeypatch.setattr(rollout.TorchEngine, "generate", skewed)
    base = dict(model=str(tiny_model), output_dir=str(tmp_path / "run"), max_steps=2, prompts_per_step=2,
                num_generations=4, max_new_tokens=6, eval_data="none", progress=False, report=False, lr=1e-3,
                ema_decay=0.0, dtype="fp32", reward="by_length")
    r = module.train(cls(**{**base, **kw}))
    return [m for m in (json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


@pytest.mark.parametrize("mini_batches", [1, 2])  # π_old as sg(π_θ) in the loss, or a forward of its own
def test_masked_correction_drops_exactly_the_mismatched_tokens(tiny_model, tmp_path, monkeypatch, mini_batches):
    from tether import grpo

    recs = run(grpo, grpo.GRPOConfig, tiny_model, tmp_path, monkeypatch, sampler_correction="token_mask",
               mini_batches=mini_batches, beta=0.0)
    for m in recs:
        # one token of every completion is dropped: 8 completions of 1-6 tokens
        assert m["sampler_dropped"] == pytest.approx(8 / (m["completion_length"] * 8), rel=1e-6)
        assert m["sampler_ratio_max"] == pytest.approx(1.0, abs=1e-4)  # the others agree to float noise
        assert m["sampler_gap_max"] == pytest.approx(SHIFT, abs=1e-4)  # the mismatch, before any update
        assert m["sampler_gap"] == pytest.approx(SHIFT / m["completion_length"], rel=1e-3)
        assert ("time/old_logps" in m) == (mini_batches > 1)


def test_truncated_correction_clips_at_the_bound(tiny_model, tmp_path, monkeypatch):
    from tether import grpo

    recs = run(grpo, grpo.GRPOConfig, tiny_model, tmp_path, monkeypatch, sampler_correction="token_truncate",
               sampler_clip_max=2.0, mini_batches=1)
    for m in recs:
        assert m["sampler_ratio_max"] == 2.0 and m["sampler_dropped"] == 0
        share = 1 / m["completion_length"]  # the first token's share of all tokens
        assert m["sampler_ratio"] == pytest.approx(2.0 * share + (1 - share), rel=1e-4)


def test_no_correction_leaves_the_update_alone(tiny_model, tmp_path, monkeypatch):
    """sampler_correction=none (auto, with the sampler the trainer's own forward) logs nothing of it and
    runs the same update as before: the loss of a run whose sampler is skewed equals the unskewed one's
    where the update is on-policy."""
    from tether import grpo

    skewed = run(grpo, grpo.GRPOConfig, tiny_model, tmp_path / "a", monkeypatch, mini_batches=1)
    monkeypatch.undo()
    plain = run(grpo, grpo.GRPOConfig, tiny_model, tmp_path / "b", monkeypatch, mini_batches=1)
    assert "sampler_ratio" not in skewed[0]
    assert [m["loss"] for m in skewed] == [m["loss"] for m in plain]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
@pytest.mark.parametrize("unscored", [float("nan"), float("-inf")])
def test_unscored_sampler_tokens_take_the_trainers_old_log_probs(tiny_model, tmp_path, monkeypatch, algo, unscored):
    """Without a correction and with two updates a rollout, π_old is the sampler's log-probs; where the
    engine could not score a token, it comes from the trainer's forward instead: the run's losses and
    KL equal those of a run whose engine scored every token, and the tokens are counted."""
    import importlib

    module = importlib.import_module(f"tether.{algo}")
    cls = module.GRPOConfig if algo == "grpo" else module.PPOConfig
    kw = dict(sampler_correction="none", mini_batches=2, beta=0.04)
    bad = run(module, cls, tiny_model, tmp_path / "a", monkeypatch, unscored=unscored, **kw)
    monkeypatch.undo()
    clean = run(module, cls, tiny_model, tmp_path / "b", monkeypatch, shift=0.0, **kw)
    assert [m["sampler_nonfinite"] for m in bad] == [8.0, 8.0]  # one token of each of the 8 completions
    assert "sampler_nonfinite" not in clean[0]
    for b, c in zip(bad, clean):
        assert b["loss"] == pytest.approx(c["loss"], rel=1e-4, abs=1e-6)
        assert b["kl"] == pytest.approx(c["kl"], rel=1e-4, abs=1e-6)


def test_ppo_reads_the_trainers_old_log_probs(tiny_model, tmp_path, monkeypatch):
    """PPO's loss takes π_old from the experience: under a correction, the trainer's own forward (so its
    ratio starts at 1 and ρ carries the mismatch), not the sampler's."""
    from tether import ppo

    recs = run(ppo, ppo.PPOConfig, tiny_model, tmp_path, monkeypatch, sampler_correction="sequence_mask",
               epochs=1, mini_batches=1)  # one update: where GRPO would take sg(π_θ) instead
    for m in recs:
        assert "time/old_logps" in m
        assert m["sampler_dropped"] == 1.0  # every sequence carries one token at ρ = e^1.5 > 3
    # the first update's ratio is 1: π_old is the trainer's (against the sampler's it would be e^±1.5)
    assert recs[0]["ratio_dev"] < 1e-4


def test_off_policy_mask_drops_negative_advantages_far_from_the_sampler(tiny_model, tmp_path, monkeypatch):
    from tether import grpo

    # the sampler reports every token 1.5 nats likelier than π: mean log π_s - log π = 1.5
    near = run(grpo, grpo.GRPOConfig, tiny_model, tmp_path / "a", monkeypatch, shift_all=True, shift=-1.5,
               off_policy_mask_threshold=2.0, sampler_correction="none", mini_batches=1)
    assert all(m["off_policy_dropped"] == 0 for m in near)
    monkeypatch.undo()
    far = run(grpo, grpo.GRPOConfig, tiny_model, tmp_path / "b", monkeypatch, shift_all=True, shift=-1.5,
              off_policy_mask_threshold=1.0, sampler_correction="none", mini_batches=1)
    # past the threshold: every completion with A < 0 goes, those with A >= 0 stay
    assert all(0 < m["off_policy_dropped"] < 1 for m in far)
    assert [m["loss"] for m in far] != [m["loss"] for m in near]


def test_auto_turns_on_for_another_sampling_dtype():
    from tether import grpo

    assert grpo.GRPOConfig(dtype="fp32").sampler_mode() == "none"
    assert grpo.GRPOConfig(dtype="fp32", rollout_dtype="bf16").sampler_mode() == "token_truncate"
    assert grpo.GRPOConfig(dtype="bf16", rollout_dtype="bf16").sampler_mode() == "none"
    assert grpo.GRPOConfig(dtype="fp32", engine="vllm").sampler_mode() == "token_truncate"
    assert grpo.GRPOConfig(dtype="fp32", engine="vllm", loss_type="vespo").sampler_mode() == "token_truncate"
    from tether.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="vespo"):
        grpo.GRPOConfig(loss_type="vespo", sampler_correction="sequence_truncate")


@pytest.mark.parametrize("rollout_dtype,correction,forwards", [
    ("same", "auto", False),  # the engine's states, sampled in the trainer's dtype
    ("bf16", "auto", False),  # the states of the trainer's forward of π_old for the correction
    ("bf16", "none", True),  # a forward of their own
])
def test_ppo_value_head_states_come_from_a_forward_in_the_trainers_dtype(tiny_model, tmp_path, monkeypatch,
                                                                           rollout_dtype, correction, forwards):
    """A value head's old values read the states the engine sampled from, which a bf16 sampler computes
    in bf16: for an fp32 trainer they come from the trainer's forward instead, the one a sampler
    correction runs for π_old when there is one."""
    from tether import online, ppo, rewards, rollout

    monkeypatch.setitem(rewards.REWARDS, "by_length", _by_length)  # returns that vary: the head moves
    asked, hidden = [], []
    generate, forward = rollout.TorchEngine.generate, online.Session.hidden
    monkeypatch.setattr(rollout.TorchEngine, "generate",
                        lambda self, p, params: asked.append(params.return_hidden) or generate(self, p, params))
    monkeypatch.setattr(online.Session, "hidden", lambda self, *a: hidden.append(1) or forward(self, *a))
    r = ppo.train(ppo.PPOConfig(model=str(tiny_model), output_dir=str(tmp_path / "run"), max_steps=2,
                                prompts_per_step=2, num_generations=2, max_new_tokens=4, eval_data="none",
                                progress=False, report=False, dtype="fp32", rollout_dtype=rollout_dtype,
                                sampler_correction=correction, ema_decay=0.0, lr=1e-2, reward="by_length"))
    assert asked == [rollout_dtype == "same"] * 2
    assert bool(hidden) == forwards
    recs = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all(math.isfinite(m["value_loss"]) for m in recs) and recs[-1]["value_mean"] != 0


def test_ppo_old_values_from_the_correction_forward_equal_a_forward_of_their_own(tiny_model, tmp_path, monkeypatch):
    """The states kept from the trainer's forward of π_old give the old values a separate forward of the
    policy gives (to float rounding: the two batch the rows differently)."""
    from tether import online, ppo, rewards

    monkeypatch.setitem(rewards.REWARDS, "by_length", _by_length)
    cfg = dict(model=str(tiny_model), max_steps=3, prompts_per_step=2, num_generations=4, max_new_tokens=6,
               eval_data="none", progress=False, report=False, dtype="fp32", rollout_dtype="bf16", ema_decay=0.0,
               lr=1e-2, reward="by_length")
    kept = ppo.train(ppo.PPOConfig(output_dir=str(tmp_path / "a"), **cfg))
    experience = online.Session.experience

    def without_states(self, *a, **kw):
        exp = experience(self, *a, **kw)
        exp.extra.pop("states", None)
        return exp

    monkeypatch.setattr(online.Session, "experience", without_states)
    own = ppo.train(ppo.PPOConfig(output_dir=str(tmp_path / "b"), **cfg))
    a, b = ([json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
            for r in (kept, own))
    assert a[-1]["value_mean"] != 0
    for x, y in zip(a, b):
        for k in ("value_mean", "explained_variance", "loss"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-7), (k, x["step"])
