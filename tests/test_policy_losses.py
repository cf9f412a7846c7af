"""Policy-gradient losses against TRL 1.16.0's own numbers (shared/reference/grpo_loss_reference.json),
plus the hand-checkable properties of seed §4-§7: GAE, the PPO clip, RLOO, accumulation invariance.

The vectors are read from $TETHER_REFERENCE_DIR (default ../shared/reference relative to the repository).
"""

import json
import os
from pathlib import Path

import pytest
import torch

from tether.losses.policy import (PolicyLossConfig, decoupled_advantages, gae, group_advantages, informative_groups,
                                  kl_estimate, leave_one_out_advantages, policy_loss, value_loss, whiten)

REF_DIR = Path(os.environ.get("TETHER_REFERENCE_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"))
REF_FILE = REF_DIR / "grpo_loss_reference.json"
needs_ref = pytest.mark.skipif(not REF_FILE.is_file(), reason=f"no reference vectors at {REF_FILE}")
TRL_NAMES = {"epsilon": "epsilon_low", "importance_sampling_level": "importance_level",
             "use_bias_correction_kl": "kl_importance_correction"}


def load():
    return json.loads(REF_FILE.read_text())


def case_ids():
    if not REF_FILE.is_file():
        return []
    return [f"{i}-" + "-".join(f"{k}={v}" for k, v in c["config"].items()) + ("-old" if c["old_per_token_logps_given"] else "-onpolicy")
            for i, c in enumerate(load()["cases"])]


def to_config(trl: dict) -> PolicyLossConfig:
    kw = {TRL_NAMES.get(k, k): v for k, v in trl.items()}
    kw.setdefault("epsilon_high", kw["epsilon_low"])  # TRL: epsilon_high defaults to epsilon
    return PolicyLossConfig(**kw)


@needs_ref
@pytest.mark.parametrize("i", range(len(case_ids())), ids=case_ids())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_trl(i, dtype):
    data = load()
    inputs, case = data["inputs"], data["cases"][i]
    expected = case["float64" if dtype == torch.float64 else "float32"]
    rtol = 1e-6 if dtype == torch.float64 else 1e-5
    T = lambda k: torch.tensor(inputs[k], dtype=dtype)  # noqa: E731
    logps = T("per_token_logps").requires_grad_(True)
    mask = torch.tensor(inputs["completion_mask"])
    old = T("old_per_token_logps") if case["old_per_token_logps_given"] else None
    cfg = to_config({**case["config"], "max_completion_length": inputs["max_completion_length"]})
    loss, metrics = policy_loss(logps, old, T("advantages"), mask, cfg, ref_logps=T("ref_per_token_logps"),
                                num_tokens=float(inputs["num_items_in_batch"]))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(expected["loss"], dtype=dtype), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(logps.grad, torch.tensor(expected["dloss_dper_token_logps"], dtype=dtype),
                               rtol=rtol, atol=1e-9 if dtype == torch.float64 else 1e-7)
    want = expected["metrics"]
    n = float(mask.sum())
    if "kl" in want:
        assert float(metrics["kl_sum"]) / n == pytest.approx(want["kl"], rel=1e-5)
    if "clip_ratio/low_mean" in want and cfg.importance_level == "token":  # TRL counts sequences at sequence level
        assert float(metrics["clip_low"]) / n == pytest.approx(want["clip_ratio/low_mean"], rel=1e-5, abs=1e-7)
        assert float(metrics["clip_high"]) / n == pytest.approx(want["clip_ratio/high_mean"], rel=1e-5, abs=1e-7)


@needs_ref
@pytest.mark.parametrize("key", ["binary/scale_rewards=group", "binary/scale_rewards=batch",
                                 "binary/scale_rewards=none", "graded/scale_rewards=group",
                                 "graded/scale_rewards=batch", "graded/scale_rewards=none"])
def test_group_advantages_match_trl(key):
    ref = load()["advantages_from_trl"][key]
    got = group_advantages(torch.tensor(ref["rewards"]), ref["num_generations"], key.split("=")[1])
    torch.testing.assert_close(got, torch.tensor(ref["advantages"]), rtol=1e-5, atol=1e-6)


def test_group_advantages_ignore_nan_rewards():
    r = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    adv = group_advantages(r, 4, "none")
    assert adv[1] == 0 and torch.isfinite(adv).all()
    torch.testing.assert_close(adv[[0, 2, 3]], torch.tensor([1 / 3, -2 / 3, 1 / 3]))


def test_informative_groups_are_those_whose_rewards_differ():
    nan = float("nan")
    r = torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0, nan, 2, 2, nan, nan, nan, nan, nan, 0, 0, 0, 0.5])
    got = informative_groups(r, 4)
    assert got.tolist() == [False] * 4 + [True] * 4 + [False] * 8 + [True] * 4
    # exactly the groups with a non-zero group-relative advantage somewhere
    assert got.view(-1, 4).any(-1).tolist() == (group_advantages(r, 4).view(-1, 4) != 0).any(-1).tolist()


def _gdpo_by_hand(rows: list[list[float]], weights: list[float], n: int, eps: float = 1e-4) -> list[float]:
    """GDPO's advantage written out with the statistics module, sample by sample (NaN: no score)."""
    import math
    import statistics

    def norm(xs):  # one group of one function: (x - mean) / (Bessel std + eps), NaN kept out
        ok = [x for x in xs if not math.isnan(x)]
        mean, std = statistics.mean(ok), statistics.stdev(ok) if len(ok) > 1 else 0.0
        return [(x - mean) / (std + eps) for x in xs]

    K = len(weights)
    cols = [[norm([rows[g + i][k] for i in range(n)]) for g in range(0, len(rows), n)] for k in range(K)]
    summed = []
    for b, row in enumerate(rows):
        parts = [weights[k] * cols[k][b // n][b % n] for k in range(K) if not math.isnan(row[k])]
        summed.append(sum(parts) if parts else math.nan)
    ok = [x for x in summed if not math.isnan(x)]
    mean, std = statistics.mean(ok), statistics.stdev(ok)
    return [0.0 if math.isnan(x) else (x - mean) / (std + eps) for x in summed]


def test_decoupled_advantages_by_hand():
    """GDPO (TRL's normalize_then_sum): each function normalised within its groups, weighted sum,
    then the batch's normalisation; a partly scored sample adds the scores it has, an unscored one
    gets 0."""
    nan = float("nan")
    rows = [[1, 0], [0, 1], [0, 1], [1, 1], [1, 0.5], [0, nan], [1, 0], [nan, nan], [0, 0.2], [1, 0.9], [0, 0.1], [1, 0]]
    w = [1.0, 0.5]
    got = decoupled_advantages(torch.tensor(rows, dtype=torch.float64), torch.tensor(w), 4)
    torch.testing.assert_close(got, torch.tensor(_gdpo_by_hand(rows, w, 4), dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert got[7] == 0


def test_decoupled_advantages_do_not_let_one_reward_drown_the_others():
    """Scaling one function's scores by 100 leaves GDPO's advantages as they were (each is normalised
    on its own) but hands GRPO's normalised sum to that function."""
    torch.manual_seed(0)
    scores = torch.stack([torch.randint(0, 2, (32,)).double(), torch.rand(32, dtype=torch.float64)], -1)
    louder = scores * torch.tensor([1.0, 100.0], dtype=torch.float64)
    w = torch.ones(2)
    torch.testing.assert_close(decoupled_advantages(louder, w, 8), decoupled_advantages(scores, w, 8), rtol=0, atol=2e-3)  # up to eps
    grpo_a, grpo_b = group_advantages(scores.sum(-1), 8), group_advantages(louder.sum(-1), 8)
    assert (grpo_a - grpo_b).abs().max() > 0.1
    # GDPO's group-relative sums are centred in every group: a group whose scores are all alike gets 0
    flat = scores.clone()
    flat[:8] = flat[0]
    assert decoupled_advantages(flat, w, 8)[:8].abs().max() < 1e-12
    assert informative_groups(flat, 8).tolist() == [False] * 8 + [True] * 24


def test_leave_one_out_is_the_others_mean():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    adv = leave_one_out_advantages(r, 4)
    want = torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 3 - 5 / 3, 1 - 7 / 3, 2 - 2, 2 - 2])
    torch.testing.assert_close(adv, want)
    # the k/(k-1) scaling of the mean baseline
    torch.testing.assert_close(adv, group_advantages(r, 4, "none") * 4 / 3)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    lr = ref - logp  # log(π_ref/π)
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), -lr)
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), lr ** 2 / 2)
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), lr.exp() - 1 - lr)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    # k1 and k3 are unbiased: on a small categorical, their means under π equal the exact KL
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    for est in ("k1", "k3"):
        torch.testing.assert_close((p * kl_estimate(p.log(), q.log(), est)).sum(), exact)


def test_gae_hand_worked():
    # one sequence of 3 tokens, reward 1 at the end, γ = 1, λ = 0.5, values 0.5, 0.25, 0.75
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 0.75, 9.0]])  # the 9 is padding: must be ignored
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # δ = [0 + .25 - .5, 0 + .75 - .25, 1 + 0 - .75] = [-.25, .5, .25]
    # A_2 = .25; A_1 = .5 + .5·.25 = .625; A_0 = -.25 + .5·.625 = .0625
    torch.testing.assert_close(adv, torch.tensor([[0.0625, 0.625, 0.25, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.5625, 0.875, 1.0, 0.0]]))
    # λ = 1, γ = 1: the return is the reward-to-go, whatever the values
    adv1, ret1 = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret1, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_ppo_clip_stops_the_gradient_that_would_push_further():
    """Seed §6: outside [1-ε, 1+ε], in the direction that increases the objective, no gradient."""
    cfg = PolicyLossConfig(loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2)
    old = torch.zeros(1, 4)
    # ratios 1.5 (A>0: clipped), 0.5 (A<0: clipped), 1.5 (A<0: not clipped), 0.5 (A>0: not clipped)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]])).requires_grad_(True)
    mask = torch.ones(1, 4)
    for i, (a, clipped) in enumerate([(1.0, True), (-1.0, True), (-1.0, False), (1.0, False)]):
        adv = torch.zeros(1, 4)
        adv[0, i] = a
        logps.grad = None
        loss, _ = policy_loss(logps, old, adv, mask, cfg)
        loss.backward()
        g = logps.grad[0, i]
        if clipped:
            assert g == 0
        else:  # -w A / 4 tokens: the surrogate's gradient w.r.t. log π is w A
            assert g == pytest.approx(-float(logps[0, i].detach().exp()) * a / 4)


def _random_batch(seed=0, B=8, T=6):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logps, old, ref, mask, adv


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])
def test_accumulation_splits_give_the_same_gradient(loss_type):
    logps, old, ref, mask, adv = _random_batch()
    cfg = PolicyLossConfig(loss_type=loss_type, beta=0.04,
                           importance_level="sequence" if loss_type == "luspo" else "token")
    grads = []
    for n_micro in (1, 2, 8):
        x = logps.clone().requires_grad_(True)
        total = 0.0
        size = 8 // n_micro
        for j in range(0, 8, size):
            s = slice(j, j + size)
            loss, _ = policy_loss(x[s], old[s], adv[s], mask[s], cfg, ref[s], num_sequences=8,
                                  num_tokens=float(mask.sum()))
            loss.backward()
            total += float(loss.detach())
        grads.append((total, x.grad))
    for total, g in grads[1:]:
        assert total == pytest.approx(grads[0][0], rel=1e-12)
        torch.testing.assert_close(g, grads[0][1], rtol=1e-12, atol=1e-15)


def test_empty_completion_gives_a_finite_loss():
    logps = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]])
    for lt in ("grpo", "dapo", "dr_grpo", "bnpo"):
        loss, _ = policy_loss(logps, None, torch.tensor([1.0, -1.0]), mask, PolicyLossConfig(loss_type=lt),
                              ref_logps=torch.zeros(2, 4))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
    empty = torch.zeros(2, 4, dtype=torch.long)
    loss, _ = policy_loss(logps, None, torch.tensor([1.0, -1.0]), empty, PolicyLossConfig(loss_type="dapo"))
    assert float(loss.detach()) == 0


def test_value_loss_clips_pessimistically():
    v_old = torch.tensor([[0.0, 0.0]])
    v = torch.tensor([[1.0, -1.0]], requires_grad=True)
    ret = torch.tensor([[2.0, 0.5]])
    loss = value_loss(v, v_old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: max((1-2)², (0.2-2)²) = 3.24; token 1: max((-1-.5)², (-.2-.5)²) = 2.25 → ½ · mean
    assert float(loss.detach()) == pytest.approx(0.5 * (3.24 + 2.25) / 2)
    loss.backward()
    assert v.grad[0, 0] == 0  # the clipped branch is active: no gradient through V
    assert v.grad[0, 1] != 0


def test_whiten_is_zero_mean_unit_std_on_the_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    w = whiten(x, m)
    assert w[0, 3] == 0
    assert float(w[0, :3].mean()) == pytest.approx(0, abs=1e-6)
    assert float(w[0, :3].std()) == pytest.approx(1, rel=1e-4)


def test_grpo_config_hands_every_variant_parameter_to_the_loss():
    """GRPOConfig's SAPO and VESPO parameters (TRL's names) reach PolicyLossConfig, each to its own field."""
    from tether.grpo import GRPOConfig

    names = {"sapo_temperature_pos": "sapo_tau_pos", "sapo_temperature_neg": "sapo_tau_neg",
             "vespo_k_pos": "vespo_k_pos", "vespo_lambda_pos": "vespo_lambda_pos", "vespo_k_neg": "vespo_k_neg",
             "vespo_lambda_neg": "vespo_lambda_neg"}
    cfg = GRPOConfig(**{k: 1.5 + i for i, k in enumerate(names)}).loss_config()
    assert [getattr(cfg, v) for v in names.values()] == [1.5 + i for i in range(len(names))]
    default = GRPOConfig().loss_config()
    assert [getattr(default, v) for v in names.values()] == [1.0, 1.05, 2.0, 3.0, 3.0, 2.0]  # TRL 1.16's


@pytest.mark.parametrize("kw", [dict(multi_objective_aggregation="normalize_then_sum"), dict(scale_rewards="batch"),
                                dict(scale_rewards="group")])
def test_filtered_groups_leave_the_kept_groups_advantages_as_if_alone(kw):
    """With filter_groups the advantages are those of a batch holding only the kept groups (DAPO refills
    the batch with such groups): the filtered groups' constant scores would otherwise shrink GDPO's or
    scale_rewards=batch's std and inflate the kept advantages. Filtered rows get 0."""
    from tether.grpo import GRPOConfig, advantages

    cfg = GRPOConfig(num_generations=2, **kw)
    each = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.5], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    w = torch.tensor([1.0, 0.5])
    scores = each if "multi_objective_aggregation" in kw else each @ w
    keep = informative_groups(scores, 2)
    assert keep.tolist() == [True, True, False, False, True, True, False, False]
    got = advantages(cfg, scores, w, keep)
    alone = advantages(cfg, scores[keep], w)
    torch.testing.assert_close(got[keep], alone)
    assert (got[~keep] == 0).all() and alone.abs().min() > 0.1
    if kw.get("scale_rewards") != "group":  # the whole batch's statistics would differ
        assert not torch.allclose(advantages(cfg, scores, w)[keep], alone)
