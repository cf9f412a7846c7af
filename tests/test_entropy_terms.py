"""The entropy terms of the policy loss: the bonus -c · H̄ (fixed or under Skywork-OR1's adaptive
control) and the top-entropy token mask of "Beyond the 80/20 rule", against TRL 1.16.0's own code on
fixed tensors (``tests/assets/trl_entropy_reference.json``, made by ``trl_sampler_reference.py``), then
in the trainers."""

import json
from pathlib import Path

import pytest
import torch

from tether import grpo
from tether.losses.policy import EntropyTerms, PolicyLossConfig, high_entropy_mask, policy_loss, sampler_weights
from tether.online import EntropyControl

REF = json.loads((Path(__file__).parent / "assets" / "trl_entropy_reference.json").read_text())
ENTROPY_KEYS = ("top_entropy_quantile", "entropy_coef", "use_adaptive_entropy", "entropy_target",
                "entropy_coef_delta", "entropy_coef_max")
SAMPLER_KEYS = ("vllm_importance_sampling_correction", "vllm_importance_sampling_mode")


def case_id(c: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in c["config"].items() if k not in ("epsilon", "beta", *SAMPLER_KEYS[1:])) + (
        "-onpolicy" if c["on_policy"] else "") + ("" if c["last_entropy"] is None else f"-last={c['last_entropy']}")


@pytest.mark.parametrize("case", REF["cases"], ids=[case_id(c) for c in REF["cases"]])
def test_matches_trl(case):
    inp = {k: torch.tensor(v, dtype=torch.float64) for k, v in REF["inputs"].items() if k != "lengths"}
    trl = case["config"]
    cfg = PolicyLossConfig(**{k.replace("epsilon", "epsilon_low"): v for k, v in trl.items()
                              if k not in ENTROPY_KEYS + SAMPLER_KEYS},
                           epsilon_high=trl["epsilon"], max_completion_length=inp["mask"].shape[1])
    mask, adv = inp["mask"], inp["advantages"]
    logps = (inp["old"] if case["on_policy"] else inp["logps"]).clone().requires_grad_(True)
    entropy = inp["entropy"].clone().requires_grad_(True)
    correct = trl.get("vllm_importance_sampling_correction", True)
    rho = sampler_weights(inp["old"], inp["sampler"], mask, trl["vllm_importance_sampling_mode"]) if correct else None
    control = EntropyControl(grpo.GRPOConfig(
        entropy_coef=trl.get("entropy_coef", 0.0), entropy_coef_delta=trl.get("entropy_coef_delta", 0.005),
        entropy_coef_max=trl.get("entropy_coef_max", 1.0),
        entropy_target=trl.get("entropy_target") if trl.get("use_adaptive_entropy") else None))
    if case["last_entropy"] is not None:
        control.last = case["last_entropy"]
    q = trl.get("top_entropy_quantile", 1.0)
    keep = high_entropy_mask(entropy, mask, q) if q < 1 else None
    loss, _ = policy_loss(logps, inp["old"] if correct else None, adv, mask, cfg, inp["ref"],
                          num_tokens=float(mask.sum()), sampler_weights=rho,
                          entropy=EntropyTerms(entropy, control.applied(), keep))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(case["loss"], dtype=torch.float64), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(logps.grad, torch.tensor(case["dloss_dlogps"], dtype=torch.float64), rtol=1e-6, atol=1e-12)
    want = case["dloss_dentropy"]
    got = entropy.grad if entropy.grad is not None else torch.zeros_like(entropy)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64) if want else torch.zeros_like(entropy),
                               rtol=1e-6, atol=1e-12)
    # the controller after this update, from the update's mean entropy over the tokens the bonus counts
    counted = mask if keep is None else mask * keep
    control.update(float((inp["entropy"] * counted).sum() / counted.sum()))
    assert control.coef == pytest.approx(case["entropy_coef_after"], rel=1e-12)
    assert control.last == pytest.approx(case["last_entropy_after"], rel=1e-12) or control.last == case["last_entropy_after"]


def test_the_reference_exercises_what_it_should():
    """The quantiles give different losses, the adaptive bonus applies only after an entropy at or
    below its target, and its coefficient moves up, down and to its bound."""
    quantile = [c["loss"] for c in REF["cases"][:3]]  # dapo at q = 0.2, 0.5, 0
    assert len(set(quantile)) == 3
    adaptive = [c for c in REF["cases"] if c["config"].get("use_adaptive_entropy")]
    assert adaptive[0]["loss"] != adaptive[1]["loss"]  # the same case, not applied / applied
    assert [c["entropy_coef_after"] for c in adaptive] == [0.025, 0.025, 0.015, 0.022]


def test_high_entropy_mask_keeps_the_top_share():
    ent = torch.tensor([[0.1, 0.5, 0.9, 0.0], [0.3, 0.7, 0.2, 0.8]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])  # 7 real tokens; the padded one has the lowest entropy
    keep = high_entropy_mask(ent, mask, 0.3)  # threshold: the 0.7 quantile of the 7 values, 0.72
    assert keep.tolist() == [[0, 0, 1, 0], [0, 0, 0, 1]]
    assert high_entropy_mask(ent, mask, 1.0).tolist() == mask.tolist()  # q = 1 keeps every real token
    assert high_entropy_mask(ent, mask, 0.0).sum() == 1  # q = 0: the highest only
    assert high_entropy_mask(ent, torch.zeros_like(mask), 0.2).sum() == 0
    # a threshold from a larger batch overrides this one's
    assert high_entropy_mask(ent, mask, 0.3, threshold=0.25).tolist() == [[0, 1, 1, 0], [1, 1, 0, 1]]


# ---------------------------------------------------------------------------------------------
# in the trainers
# ---------------------------------------------------------------------------------------------
def _run(tiny_model, tmp_path, monkeypatch, **kw):
    from tether import rewards

    monkeypatch.setitem(rewards.REWARDS, "by_length", lambda p, c, m: [float(len(x) % 5) for x in c])
    base = dict(model=str(tiny_model), output_dir=str(tmp_path / "run"), max_steps=3, prompts_per_step=2,
                num_generations=4, max_new_tokens=6, eval_data="none", progress=False, report=False, lr=1e-3,
                ema_decay=0.0, dtype="fp32", reward="by_length")
    r = grpo.train(grpo.GRPOConfig(**{**base, **kw}))
    return [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_the_bonus_raises_the_entropy(sft_model, tmp_path, monkeypatch):
    """From the shipped SFT model (entropy ~0.1 nat a token), a large coefficient raises the policy's
    entropy against a run without it (the same first batch): a sign error would lower it."""
    kw = dict(lr=1e-3, mini_batches=1, max_new_tokens=8, prompts_per_step=4)
    plain = _run(sft_model, tmp_path / "a", monkeypatch, **kw)
    bonus = _run(sft_model, tmp_path / "b", monkeypatch, entropy_coef=1.0, **kw)
    assert bonus[0]["entropy"] == pytest.approx(plain[0]["entropy"], rel=1e-5)  # the same first batch
    assert bonus[-1]["entropy"] > 2 * plain[-1]["entropy"], (plain, bonus)


def test_top_entropy_quantile_keeps_its_share(tiny_model, tmp_path, monkeypatch):
    """The logged share of tokens carrying the policy term is at least the quantile's (more where
    entropies tie at the threshold: completions of one prompt share their first position's), and the
    same with the batch in one micro-batch or split into four (the threshold then from a forward of
    the whole batch; per micro-batch, as TRL, each would keep its own top quarter)."""
    runs = {}
    for mbs in (8, 2):
        runs[mbs] = _run(tiny_model, tmp_path / str(mbs), monkeypatch, top_entropy_quantile=0.25,
                         micro_batch_size=mbs, mini_batches=1)
        for m in runs[mbs]:
            assert 0.25 <= m["entropy_kept"] <= 0.5, m
            assert ("time/entropy_quantile" in m) == (mbs < 8)
    assert [m["entropy_kept"] for m in runs[8]] == [m["entropy_kept"] for m in runs[2]]


def test_adaptive_control_steps_the_coefficient(tiny_model, tmp_path, monkeypatch):
    """entropy_target above the policy's entropy: the coefficient rises by its delta at each of the two
    updates a step; below it, it falls to its floor."""
    up = _run(tiny_model, tmp_path / "a", monkeypatch, entropy_target=100.0, entropy_coef=0.01, entropy_coef_delta=0.02)
    assert [round(m["entropy_coef"], 9) for m in up] == [0.05, 0.09, 0.13]
    down = _run(tiny_model, tmp_path / "b", monkeypatch, entropy_target=1e-3, entropy_coef=0.05, entropy_coef_delta=0.02)
    assert [round(m["entropy_coef"], 9) for m in down] == [0.01, 0.0, 0.0]


def test_bounds_are_checked():
    with pytest.raises(ValueError, match="entropy_coef_min"):
        grpo.GRPOConfig(entropy_coef_min=0.5, entropy_coef_max=0.1)
    with pytest.raises(ValueError):
        grpo.GRPOConfig(top_entropy_quantile=1.5)
