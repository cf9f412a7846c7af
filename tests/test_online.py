"""Online RL plumbing: rewards' invalid-score policy, the three trainers end to end, exact resume,
accumulation invariance of a whole update."""

import json
import math

import pytest
import torch

from tether import grpo, ppo, reinforce
from tether.rewards import RewardSet, arith_exact_match, make_rewards


def small(cls, tiny_model, tmp_path, **kw):
    """A few-step run; final/ is the last iterate (``ema_decay=0``) unless a test asks for the average.
    float32 (the default is bf16 where the CPU has it), where the tests' exact agreements hold."""
    base = dict(model=str(tiny_model), output_dir=str(tmp_path / "run"), max_steps=3, prompts_per_step=2,
                num_generations=4, max_new_tokens=6, eval_samples=8, progress=False, report=False, lr=1e-3,
                ema_decay=0.0, dtype="fp32")
    return cls(**{**base, **kw})


def metrics(run_dir, name="metrics.jsonl"):
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------------------------
def test_exact_match_reward():
    got = arith_exact_match(["q"] * 3, [" 3 + 4 = 7", " 3 + 4 = 8", "no number"], [{"answer": 7}] * 3)
    assert [v.score for v in got] == [1.0, 0.0, 0.0]
    assert [v.reason for v in got] == ["correct", "wrong", "no_answer"]


def _bad(prompts, completions, meta):
    return [None, float("nan"), float("inf"), 1.0]


def _raises(prompts, completions, meta):
    raise RuntimeError("reward server down")


def test_invalid_scores_fall_back_and_are_counted():
    rs = RewardSet({"bad": _bad, "ok": lambda p, c, m: [0.5] * 4}, {"bad": 2.0, "ok": 1.0}, "fallback", -1.0)
    r, m = rs(["p"] * 4, ["c"] * 4, [{}] * 4)
    torch.testing.assert_close(r, torch.tensor([-2 + 0.5, -2 + 0.5, -2 + 0.5, 2 + 0.5]))
    assert m["reward/bad/invalid"] == 3 and m["reward/ok/invalid"] == 0 and m["reward/dropped"] == 0
    assert m["reward/bad/mean"] == 1.0  # the valid scores only


def test_invalid_scores_drop_the_sample_and_a_raising_reward_drops_all():
    r, m = RewardSet({"bad": _bad}, on_invalid="drop")(["p"] * 4, ["c"] * 4, [{}] * 4)
    assert torch.isnan(r[:3]).all() and r[3] == 1.0 and m["reward/dropped"] == 3
    r, m = RewardSet({"down": _raises}, on_invalid="drop")(["p"] * 4, ["c"] * 4, [{}] * 4)
    assert torch.isnan(r).all() and m["reward/down/invalid"] == 4
    r, m = RewardSet({"down": _raises})(["p"] * 4, ["c"] * 4, [{}] * 4)  # fallback
    assert (r == 0).all()


def test_unknown_reward_is_refused():
    with pytest.raises(ValueError, match="unknown reward"):
        make_rewards("nope")


USER_REWARDS = """
def brevity(prompts, completions, metadata):
    return [1.0 / (1 + len(c)) for c in completions]

def trl_exact(completions, answer, **kwargs):  # TRL's convention: one keyword list per data column
    return [float(c.strip().endswith(str(a))) for c, a in zip(completions, answer)]

def wrong(completions):
    return [0.0] * len(completions)
"""


def test_a_users_reward_function_from_a_file_or_module(tmp_path):
    """``py:FILE.py:NAME`` and ``py:module:NAME`` load a function of the user's, in tether's
    (prompts, completions, metadata) form or TRL's keyword form (data columns as lists), weighted with
    the built-in ones; a missing file, name or module, or a signature that fits neither form, is refused
    when the rewards are made, not at the first step."""
    f = tmp_path / "my_rewards.py"
    f.write_text(USER_REWARDS)
    rs = make_rewards({f"py:{f}:brevity": 1.0, f"py:{f}:trl_exact": 2.0, "py:tether.rewards:answer_in_numbers": 0.5})
    total, m = rs(["q", "q"], [" 3 + 4 = 7", " 3 + 4 = 8"], [{"answer": 7}, {"answer": 7}])
    assert total.tolist() == pytest.approx([1 / 11 + 2.0 + 0.5, 1 / 11 + 0.0 + 0.0])
    assert m[f"reward/py:{f}:trl_exact/mean"] == 0.5 and m[f"reward/py:{f}:brevity/invalid"] == 0
    for ref, match in [(f"py:{tmp_path}/none.py:f", "no file"), (f"py:{f}:missing", "no function"),
                       ("py:no_such_module_x:f", "cannot import"), (f"py:{f}:wrong", "takes neither"),
                       (f"py:{f}", "expected py:FILE.py:NAME")]:
        with pytest.raises(ValueError, match=match):
            make_rewards(ref)


@pytest.mark.parametrize("policy", ["fallback", "drop"])
def test_grpo_survives_broken_rewards(tiny_model, tmp_path, monkeypatch, policy):
    calls = {"n": 0}

    def flaky(prompts, completions, meta):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return [None if i % 3 == 0 else (float("nan") if i % 3 == 1 else float(i % 2)) for i in range(len(prompts))]

    monkeypatch.setitem(__import__("tether.rewards").rewards.REWARDS, "flaky", flaky)
    cfg = small(grpo.GRPOConfig, tiny_model, tmp_path, reward="flaky", reward_on_invalid=policy, eval_data="none")
    r = grpo.train(cfg)
    model = __import__("tether.modeling").modeling.load_causal_lm(r.final_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    recs = [m for m in metrics(r.run_dir) if "loss" in m]
    assert len(recs) == 3 and all(math.isfinite(m["loss"]) for m in recs)
    assert recs[1]["reward/flaky/invalid"] == 8  # the raising call: every sample
    assert recs[0]["reward/flaky/invalid"] == 6  # None and NaN of 8
    if policy == "drop":
        assert recs[0]["reward/dropped"] == 6


def test_invalid_steps_are_counted_per_reward_function():
    """Two functions that fail on alternate steps never stop a run: each scores every other step. One
    that never scores stops it, and a function that only returns None is not said to have raised."""
    from types import SimpleNamespace

    from tether.data import DataError
    from tether.online import Session

    s = SimpleNamespace(cfg=SimpleNamespace(max_invalid_steps=2), _invalid_steps={})
    for step in range(6):
        Session._check_rewards(s, {f"reward/{'a' if step % 2 else 'b'}/invalid": 4.0}, 4)
    s._invalid_steps = {}
    Session._check_rewards(s, {"reward/a/invalid": 4.0}, 4)
    with pytest.raises(DataError, match="reward a scored none.*returned None"):
        Session._check_rewards(s, {"reward/a/invalid": 4.0, "reward/b/invalid": 1.0}, 4)
    with pytest.raises(ValueError, match="reward_fallback"):
        grpo.GRPOConfig(reward_on_invalid="drop", reward_fallback=-1.0)


def test_a_reward_that_never_scores_stops_the_run(tiny_model, tmp_path, monkeypatch):
    """A reward that scores none of a step's completions max_invalid_steps steps running stops the run
    with the reason (it raised; the rows lack its field), instead of training to the end on fallbacks."""
    from tether.data import DataError

    def broken(prompts, completions, meta):
        raise KeyError("answer")

    monkeypatch.setitem(__import__("tether.rewards").rewards.REWARDS, "broken", broken)
    with pytest.raises(DataError, match="broken scored none of the 8 completions of 2 steps running.*raised"):
        grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path / "a", reward="broken", eval_data="none",
                         max_steps=5, max_invalid_steps=2))
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?"}) + "\n" for i in range(4)))  # no answer
    with pytest.raises(DataError, match="exact_match scored none.*no_reference"):
        grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path / "b", data=str(data), eval_data="none", max_steps=5))
    r = grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path / "c", reward="broken", eval_data="none",
                         max_invalid_steps=0))  # told to go on: it does
    assert r.steps == 3
    fn = tmp_path / "my_reward.py"  # a name with slashes in it is named whole
    fn.write_text("def f(prompts, completions, metadata):\n    raise RuntimeError('no')\n")
    with pytest.raises(DataError, match=f"reward py:{fn}:f scored none"):
        grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path / "d", reward=f"py:{fn}:f", eval_data="none"))


# ---------------------------------------------------------------------------------------------
# the trainers end to end, resume
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,module,extra", [
    (grpo.GRPOConfig, grpo, dict(beta=0.04)),
    (grpo.GRPOConfig, grpo, dict(beta=0.04, dtype="bf16")),  # autocast (emulated where the CPU lacks it)
    (grpo.GRPOConfig, grpo, dict(loss_type="dr_grpo", importance_level="sequence", epochs=2, mini_batches=2)),
    (ppo.PPOConfig, ppo, dict()),
    (ppo.PPOConfig, ppo, dict(critic="separate", kl_target=0.05)),
    (ppo.PPOConfig, ppo, dict(critic_fit="least_squares", lean_forward=False)),  # the model's own forward
    (reinforce.ReinforceConfig, reinforce, dict()),
])
def test_trainers_run_and_log(tiny_model, tmp_path, cls, module, extra):
    r = module.train(small(cls, tiny_model, tmp_path, **extra))
    recs = metrics(r.run_dir)
    steps = [m for m in recs if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for key in ("reward", "entropy", "completion_length", "time/generate", "time/update"):
        assert key in steps[0], key
    if cls.model_fields["beta"].default or extra.get("beta"):
        assert "kl" in steps[-1] and steps[-1]["kl"] >= 0
    assert r.eval_before is not None and r.eval_after is not None
    assert (r.final_dir / "model.safetensors").is_file()
    # log_completions (8): each step's 8 completions, two prompts' groups of 4, with what was trained on
    logged = metrics(r.run_dir, "completions.jsonl")
    assert [c["step"] for c in logged] == [1] * 8 + [2] * 8 + [3] * 8
    for c in logged:
        assert c["prompt"].startswith("Question: What is") and isinstance(c["completion"], str)
        assert 0 <= c["tokens"] <= 6 and isinstance(c["truncated"], bool)
    assert len({c["prompt"] for c in logged[:8]}) == 2 and logged[0]["prompt"] == logged[3]["prompt"]
    for step, m in zip((1, 2, 3), steps):  # the first two groups are the whole step: their mean is the logged one
        assert sum(c["reward"] for c in logged if c["step"] == step) / 8 == pytest.approx(m["reward"], abs=1e-6)


@pytest.mark.parametrize("cls,module,extra", [
    (grpo.GRPOConfig, grpo, dict(beta=0.04, epochs=2, ema_decay=0.9)),
    (grpo.GRPOConfig, grpo, dict(rollout_dtype="bf16", off_policy_mask_threshold=0.1)),  # sampler correction on
    (grpo.GRPOConfig, grpo, dict(entropy_target=3.0, top_entropy_quantile=0.5, micro_batch_size=4)),  # its controller
    (grpo.GRPOConfig, grpo, dict(beta=0.1, sync_ref_model=True, ref_model_sync_steps=3, ref_model_mixup_alpha=0.5)),
    (ppo.PPOConfig, ppo, dict(kl_target=0.05, reward_normalize=True)),
    (ppo.PPOConfig, ppo, dict(critic="separate")),
    (ppo.PPOConfig, ppo, dict(critic="separate", lora_rank=4, beta=0.1)),  # adapters on both, reference adapters-off
    (ppo.PPOConfig, ppo, dict(critic_fit="least_squares")),  # its statistics are in the checkpoint
])
def test_resume_continues_bit_identically(tiny_model, tmp_path, monkeypatch, cls, module, extra):
    """A run stopped after step 2 and resumed gives the uninterrupted run's steps and weights bit for bit
    (a reward that varies, so that every step moves the weights: a tiny random model scores 0 on the
    arithmetic and GRPO would not move at all)."""
    monkeypatch.setitem(__import__("tether.rewards").rewards.REWARDS, "by_length", _by_length)
    extra = {**extra, "reward": "by_length"}
    full = module.train(small(cls, tiny_model, tmp_path / "a", max_steps=4, eval_data="none", **extra))
    module.train(small(cls, tiny_model, tmp_path / "b", max_steps=4, eval_data="none", stop_at_step=2, **extra))
    resumed = module.train(small(cls, tiny_model, tmp_path / "b", max_steps=4, eval_data="none", resume=True, **extra))
    a = [m for m in metrics(full.run_dir) if "loss" in m]
    b = [m for m in metrics(resumed.run_dir) if "loss" in m]
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert metrics(resumed.run_dir, "completions.jsonl") == metrics(full.run_dir, "completions.jsonl")
    for x, y in zip(a, b):
        for k in ("loss", "reward", "completion_length", "grad_norm"):
            assert x[k] == y[k], (k, x["step"])
        if "beta" in x:
            assert x["beta"] == y["beta"]
    from safetensors.torch import load_file

    wa, wb = load_file(full.final_dir / "model.safetensors"), load_file(resumed.final_dir / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(m["grad_norm"] > 0 for m in a)
    w0 = load_file(tiny_model / "model.safetensors")
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)


def test_final_model_is_the_weight_average(tiny_model, tmp_path, monkeypatch):
    """ema_decay=d: final/ holds W_3 = d³ W_0 + d²(1-d) θ_1 + d(1-d) θ_2 + (1-d) θ_3 from the start W_0 and
    the iterates θ_t of the checkpoints (online.WeightAverage, started from the starting weights);
    the logged eval_accuracy is the average's and eval_accuracy_policy the last iterate's."""
    from safetensors.torch import load_file

    d = 0.7
    monkeypatch.setitem(__import__("tether.rewards").rewards.REWARDS, "by_length", _by_length)  # rewards that differ
    r = grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path, ema_decay=d, save_every=1, keep_checkpoints=5,
                         lr=1e-2, reward="by_length"))
    thetas = [load_file(tiny_model / "model.safetensors")]
    thetas += [load_file(r.run_dir / "checkpoints" / f"step-{t:08d}" / "model.safetensors") for t in (1, 2, 3)]
    weights = [d ** 3, d ** 2 * (1 - d), d * (1 - d), 1 - d]
    final = load_file(r.final_dir / "model.safetensors")
    for k in final:
        torch.testing.assert_close(final[k], sum(w * th[k] for w, th in zip(weights, thetas)), rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(final[k], thetas[3][k]) for k in final)  # not the last iterate
    assert any(not torch.allclose(thetas[3][k], thetas[0][k]) for k in final)  # which did move
    last = [m for m in metrics(r.run_dir) if "eval_accuracy" in m][-1]
    assert last["step"] == 3 and "eval_accuracy_policy" in last


@pytest.mark.parametrize("shared", [False, True])
def test_value_head_trains_the_backbone_only_when_asked(tiny_model, tmp_path, monkeypatch, shared):
    """critic=head: one PPO step (plain SGD) with the value loss weighted 0 or 100 leaves the policy's
    weights the same when the head reads detached hidden states, and moves them when it shares the
    backbone. The head starts non-zero here (a zero head passes no gradient back on its first step)."""
    from safetensors.torch import load_file

    from tether import runs

    init = ppo.ValueHead.__init__

    def random_head(self, hidden):
        init(self, hidden)
        torch.nn.init.normal_(self.v.weight, std=0.1, generator=torch.Generator().manual_seed(0))

    monkeypatch.setattr(ppo.ValueHead, "__init__", random_head)
    monkeypatch.setitem(__import__("tether.rewards").rewards.REWARDS, "by_length", _by_length)
    monkeypatch.setattr(runs, "make_optimizer", lambda model, cfg: torch.optim.SGD(model.parameters(), lr=cfg.lr))
    w = [load_file(ppo.train(small(ppo.PPOConfig, tiny_model, tmp_path / f"{shared}-{vf}", max_steps=1, eval_data="none",
                                   reward="by_length", vf_coef=vf, max_grad_norm=0, lr=0.1,
                                   head_trains_backbone=shared)).final_dir / "model.safetensors")
         for vf in (0.0, 100.0)]
    same = all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert same != shared


def test_ppo_old_values_from_the_engines_states_equal_a_forward(tiny_model, tmp_path, monkeypatch):
    """With a value head, the old values read the hidden states the engine sampled from instead of a
    second forward of the policy: the same states (fp32), so the same run up to float rounding."""
    from safetensors.torch import load_file

    monkeypatch.setitem(__import__("tether.rewards").rewards.REWARDS, "by_length", _by_length)
    runs = {}
    for budget in (1 << 30, 0):  # 0: nothing kept, the forward
        monkeypatch.setattr(ppo, "HIDDEN_BUDGET", budget)
        r = ppo.train(small(ppo.PPOConfig, tiny_model, tmp_path / str(budget), eval_data="none", reward="by_length"))
        runs[budget] = ([m for m in metrics(r.run_dir) if "loss" in m], load_file(r.final_dir / "model.safetensors"))
    (a, wa), (b, wb) = runs[1 << 30], runs[0]
    for x, y in zip(a, b):
        assert x["value_mean"] == pytest.approx(y["value_mean"], rel=1e-4, abs=1e-6)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
    assert any(abs(m["value_mean"]) > 0 for m in a[1:])  # the critic learned: values that matter
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def _by_length(prompts, completions, meta):
    return [float(len(c) % 5) for c in completions]


@pytest.mark.parametrize("lean,extra", [(True, {}), (False, {}),
                                        (True, dict(entropy_coef=0.5)),
                                        (True, dict(top_entropy_quantile=0.3, entropy_coef=0.5))])
def test_accumulation_does_not_change_an_update(tiny_model, tmp_path, monkeypatch, lean, extra):
    """One GRPO step with 1 × 8, 2 × 4 and 8 × 1 micro-batches gives the same weights, through
    tether's packed-tree forward (the default) and the model's own, and with the entropy terms (the
    quantile and the bonus's mean over the whole batch, not per micro-batch as TRL). Plain SGD stands
    in for AdamW, whose first step is scale-free and would hide a mis-normalised loss."""
    from tether import runs

    monkeypatch.setitem(__import__("tether.rewards").rewards.REWARDS, "by_length", _by_length)
    monkeypatch.setattr(runs, "make_optimizer", lambda model, cfg: torch.optim.SGD(model.parameters(), lr=cfg.lr))
    weights = []
    for mbs in (8, 4, 1):
        r = grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path / str(mbs), max_steps=1, micro_batch_size=mbs,
                             eval_data="none", beta=0.04, max_grad_norm=0, reward="by_length", lr=1.0,
                             mini_batches=1, lean_forward=lean, **extra))  # one update of all 8 completions
        from safetensors.torch import load_file

        weights.append(load_file(r.final_dir / "model.safetensors"))
    for w in weights[1:]:
        for k in w:
            torch.testing.assert_close(w[k], weights[0][k], atol=1e-6, rtol=1e-5)
    start = __import__("safetensors.torch").torch.load_file(tiny_model / "model.safetensors")
    assert any(not torch.equal(start[k], weights[0][k]) for k in start)  # it did move


def _some_groups_alike(prompts, completions, meta):
    """Every completion of an even-answer prompt scores 1 (a group with zero advantage)."""
    return [1.0 if m["answer"] % 2 == 0 else float(len(c) % 5) for c, m in zip(completions, meta)]


def test_filtered_groups_change_only_the_normaliser(tiny_model, tmp_path, monkeypatch):
    """filter_groups trains on the groups whose rewards differ; the others have zero advantage, so
    (β = 0, dapo, plain SGD) the update keeps its direction and grows by all tokens / kept tokens.
    A filter that kept the wrong rows would turn it."""
    from safetensors.torch import load_file

    from tether import runs

    monkeypatch.setitem(__import__("tether.rewards").rewards.REWARDS, "alike", _some_groups_alike)
    monkeypatch.setattr(runs, "make_optimizer", lambda model, cfg: torch.optim.SGD(model.parameters(), lr=cfg.lr))
    start = load_file(tiny_model / "model.safetensors")
    delta, kept = [], []
    for f in (False, True):
        r = grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path / str(f), max_steps=1, prompts_per_step=6,
                             eval_data="none", beta=0.0, max_grad_norm=0, reward="alike", lr=1.0, filter_groups=f,
                             mini_batches=1))
        w = load_file(r.final_dir / "model.safetensors")
        delta.append(torch.cat([(w[k] - start[k]).flatten() for k in start]))
        kept.append(metrics(r.run_dir)[-1]["groups_kept"])
    assert kept[0] == 1.0 and 0 < kept[1] < 1
    cos = torch.nn.functional.cosine_similarity(delta[0], delta[1], dim=0)
    assert cos > 0.999 and delta[1].norm() > delta[0].norm() * 1.05


def test_gdpo_normalises_each_reward_on_its_own(tiny_model, tmp_path, monkeypatch):
    """multi_objective_aggregation=normalize_then_sum hands GDPO's advantage each function's scores
    (one column per function, weights in order) instead of normalising their sum; settings that would
    change the sum it never sees are refused."""
    from tether import rewards as rw

    monkeypatch.setitem(rw.REWARDS, "length", lambda p, c, m: [float(len(x)) for x in c])
    seen, real = [], grpo.decoupled_advantages

    def spy(scores, weights, n):
        seen.append((scores.clone(), weights.clone(), n))
        return real(scores, weights, n)

    monkeypatch.setattr(grpo, "decoupled_advantages", spy)
    r = grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path, max_steps=1, eval_data="none",
                         reward={"exact_match": 1.0, "length": 0.5}, multi_objective_aggregation="normalize_then_sum"))
    (scores, weights, n), = seen
    assert scores.shape == (8, 2) and weights.tolist() == [1.0, 0.5] and n == 4
    texts = [c["completion"] for c in metrics(r.run_dir, "completions.jsonl")]
    assert scores[:, 1].tolist() == [float(len(t)) for t in texts]
    for bad in ({"kl_penalty": "reward"}, {"reward_normalize": True}):
        with pytest.raises(ValueError, match="normalises each reward function's scores on its own"):
            small(grpo.GRPOConfig, tiny_model, tmp_path, multi_objective_aggregation="normalize_then_sum", **bad)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_sync_ref_model_moves_the_reference_toward_the_policy(tiny_model, tmp_path, monkeypatch, alpha):
    """sync_ref_model: after every ref_model_sync_steps optimizer updates π_ref ← α π_θ + (1 - α) π_ref.
    With one update a step and a sync every 2, after 2 steps the reference is α θ_2 + (1 - α) θ_0, and
    it is in the checkpoint (a resume needs it: test_resume_continues_bit_identically)."""
    from safetensors.torch import load_file

    from tether.checkpoint import load_state

    monkeypatch.setitem(__import__("tether.rewards").rewards.REWARDS, "by_length", _by_length)
    r = grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path, max_steps=2, eval_data="none", beta=0.1,
                         mini_batches=1, reward="by_length", sync_ref_model=True, ref_model_sync_steps=2,
                         ref_model_mixup_alpha=alpha))
    state = load_state(sorted((r.run_dir / "checkpoints").iterdir())[-1])
    assert state["updates_done"] == 2
    start, end = load_file(tiny_model / "model.safetensors"), load_file(r.final_dir / "model.safetensors")
    for k, ref in state["ref"].items():
        key = k if k in end else k.replace("lm_head.", "model.embed_tokens.")
        torch.testing.assert_close(ref, alpha * end[key] + (1 - alpha) * start[key], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(end[k], start[k]) for k in end)
    for bad in (dict(beta=0.0), dict(beta=0.1, lora_rank=4)):
        with pytest.raises(ValueError, match="sync_ref_model=true"):
            small(grpo.GRPOConfig, tiny_model, tmp_path, sync_ref_model=True, **bad)


def test_a_step_with_no_informative_group_leaves_the_weights(tiny_model, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setitem(__import__("tether.rewards").rewards.REWARDS, "ones", lambda p, c, m: [1.0] * len(c))
    r = grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path, max_steps=2, eval_data="none", beta=0.04,
                         reward="ones", filter_groups=True))
    assert [m["groups_kept"] for m in metrics(r.run_dir) if "groups_kept" in m] == [0.0, 0.0]
    start, end = load_file(tiny_model / "model.safetensors"), load_file(r.final_dir / "model.safetensors")
    assert all(torch.equal(start[k], end[k]) for k in start)


def test_lengths_past_the_context_are_refused(tiny_model, tmp_path):
    """A prompt plus max_new_tokens past the model's positions (512) is refused up front with the row
    named, as is SFT's max_length; before, a model with learned positions failed inside its embedding."""
    from tether import sft
    from tether.config import ConfigError

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "short", "answer": "1"}) + "\n" + json.dumps({"prompt": "x " * 600, "answer": "1"}) + "\n")
    with pytest.raises(ConfigError, match="prompt 2 .* tokens.*context of 512"):
        grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path / "a", data=str(data), eval_data="none"))
    with pytest.raises(ConfigError, match="max_new_tokens=600.*context of 512"):
        grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path / "b", max_new_tokens=600))
    with pytest.raises(ConfigError, match="max_length=1000.*context of 512"):
        sft.train(sft.SFTConfig(model=str(tiny_model), output_dir=str(tmp_path / "c"), max_length=1000, max_steps=1,
                                batch_size=2, progress=False, report=False, arith_rows=8))


def test_settings_that_would_be_ignored_are_refused():
    with pytest.raises(ValueError, match="critic=separate"):
        ppo.PPOConfig(critic_model="x")
    with pytest.raises(ValueError, match="head_trains_backbone=false"):
        ppo.PPOConfig(critic_fit="least_squares", head_trains_backbone=True)
    with pytest.raises(ValueError, match="without lora_rank"):
        grpo.GRPOConfig(lora_target_modules=["q_proj"])
    grpo.GRPOConfig(lora_rank=4, lora_target_modules=["q_proj"])


def test_a_critic_with_another_tokenizer_is_refused(tiny_model, tmp_path, tiny_build_config):
    from tether.config import ConfigError
    from tether.embedded import build_init

    other = tmp_path / "other"
    build_init(tiny_build_config.model_copy(update={"vocab_size": 1024}), other)
    with pytest.raises(ConfigError, match="tokenizer is not the policy's"):
        ppo.train(small(ppo.PPOConfig, tiny_model, tmp_path / "r", critic="separate", critic_model=str(other)))


def test_settings_that_cannot_learn_are_refused():
    with pytest.raises(ValueError, match="num_generations >= 2"):
        grpo.GRPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="temperature"):
        ppo.PPOConfig(temperature=0)


def test_chat_prompts_train_and_evaluate(tiny_model, tmp_path):
    """Chat-message prompts train and, given as eval_data, evaluate: both rendered by the template."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
                                        "answer": str(i + 1)}) + "\n" for i in range(4)))
    r = grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path / "r", data=str(data), eval_data=str(data), max_steps=1))
    assert r.eval_before is not None and r.eval_after is not None and r.eval_before["n"] == 4
    # a TRL reward function sees chat rows as TRL passes them: messages in, assistant messages out
    fn = tmp_path / "trl_reward.py"
    fn.write_text("def chatty(prompts, completions, answer, **kwargs):\n"
                  "    assert prompts[0][0]['role'] == 'user' and completions[0][0]['role'] == 'assistant'\n"
                  "    return [float(len(c[0]['content']) % 3) for c in completions]\n")
    r = grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path / "t", data=str(data), eval_data="none", max_steps=1,
                         reward=f"py:{fn}:chatty"))
    assert [m for m in metrics(r.run_dir) if "loss" in m][0][f"reward/py:{fn}:chatty/invalid"] == 0


def test_trl_reward_functions_get_the_steps_token_ids_and_progress(tiny_model, tokenizer, tmp_path):
    """In a run, a TRL-style reward function receives each completion's token ids (what the engine
    sampled, up to and including its stop token: they decode to the completion's text), the run's
    progress as transformers' TrainerState (global_step 0, 1, ... of max_steps), and its log_metric /
    log_extra land in metrics.jsonl and completions.jsonl."""
    fn = tmp_path / "trl_reward.py"
    fn.write_text("import json\n"
                  "def f(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, **kw):\n"
                  "    with open(__file__ + '.seen', 'a') as out:\n"
                  "        out.write(json.dumps([trainer_state.global_step, trainer_state.max_steps, completions, completion_ids]) + '\\n')\n"
                  "    log_metric('mean_ids', sum(map(len, completion_ids)) / len(completion_ids))\n"
                  "    log_extra('n_ids', [len(i) for i in completion_ids])\n"
                  "    return [float(len(i) % 2) for i in completion_ids]\n")
    r = grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path / "t", eval_data="none", max_steps=2, reward=f"py:{fn}:f"))
    seen = [json.loads(x) for x in (tmp_path / "trl_reward.py.seen").read_text().splitlines()]
    assert [(s[0], s[1]) for s in seen] == [(0, 2), (1, 2)]
    for _, _, texts, ids in seen:
        assert len(ids) == len(texts) == 8
        assert [tokenizer.decode(i, skip_special_tokens=True) for i in ids] == texts
    steps = [m for m in metrics(r.run_dir) if "loss" in m]
    assert [m["reward/mean_ids"] for m in steps] == [sum(map(len, s[3])) / 8 for s in seen]
    logged = metrics(r.run_dir, "completions.jsonl")
    assert [c["extra"]["n_ids"] for c in logged if c["step"] == 1] == [len(i) for i in seen[0][3]]


def test_chat_template_kwargs_reach_the_template(tiny_model, tokenizer, tmp_path):
    """chat_template_kwargs (Qwen3's enable_thinking, say) are variables of every rendering of a chat
    row: the prompts a run samples from show them, and a saved tokenizer keeps its template as is."""
    import shutil

    from tether.modeling import load_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}"
                               "{% if enable_thinking is defined and not enable_thinking %}[no-think]{% endif %} A:{% endif %}")
    tokenizer.save_pretrained(model)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
                                        "answer": str(i + 1)}) + "\n" for i in range(4)))
    chat = [{"role": "user", "content": "Q"}]
    assert load_tokenizer(model).apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "Q A:"
    bound = load_tokenizer(model, {"enable_thinking": False})
    assert bound.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "Q[no-think] A:"
    bound.save_pretrained(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "Q A:"
    r = grpo.train(small(grpo.GRPOConfig, model, tmp_path / "r", data=str(data), eval_data="none", max_steps=1,
                         chat_template_kwargs={"enable_thinking": False}))
    assert all(c["prompt"].endswith("[no-think] A:") for c in metrics(r.run_dir, "completions.jsonl"))
    # the call's own arguments are tether's to set per rendering: a fixed one would corrupt every row
    from tether.config import ConfigError

    with pytest.raises(ConfigError, match="add_generation_prompt are apply_chat_template's own arguments"):
        load_tokenizer(model, {"enable_thinking": False, "add_generation_prompt": True})


def test_settings_that_would_do_nothing_are_refused(tiny_model, tmp_path):
    """kl_target multiplies β, so from β = 0 it never moves; sync_ref_model needs a reference. TRL's
    min_p=None is off (0)."""
    for kw, match in [(dict(beta=0.0, kl_target=0.1), "kl_target adapts beta"),
                      (dict(beta=0.0, sync_ref_model=True), "sync_ref_model=true needs a reference model")]:
        with pytest.raises(ValueError, match=match):
            small(grpo.GRPOConfig, tiny_model, tmp_path, **kw)
    assert small(grpo.GRPOConfig, tiny_model, tmp_path, min_p=None).min_p == 0.0


def test_chat_prompts_without_a_template_name_their_row(tiny_model, tmp_path):
    import shutil

    from tether.data import DataError

    model = tmp_path / "no-template"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").unlink()
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"}) + "\n")
    with pytest.raises(DataError, match="chat.jsonl:1: chat messages cannot be rendered"):
        grpo.train(small(grpo.GRPOConfig, model, tmp_path / "r", data=str(data), eval_data="none"))


def test_bad_prompt_rows_are_refused(tiny_model, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"question": "no prompt key"}) + "\n")
    with pytest.raises(ValueError, match="prompt"):
        grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path, data=str(bad)))


@pytest.mark.parametrize("command", ["grpo", "ppo", "reinforce"])
def test_cli_commands(tiny_model, tmp_path, capsys, command):
    from tether.cli import main

    out = tmp_path / command
    rc = main([command, f"model={tiny_model}", f"output_dir={out}", "max_steps=2", "prompts_per_step=2",
               "num_generations=2", "max_new_tokens=4", "eval_samples=4", "progress=false"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "held-out accuracy:" in text and str(out / "final") in text
    assert (out / "report.md").is_file() and (out / "report.png").is_file()
    # the report ends with the last step's logged completions (2 prompts × 2), one table row each
    report = (out / "report.md").read_text()
    assert "## Completions at step 2" in report
    assert report.split("## Completions at step 2")[1].count("\n| Question: What is") == 4


# ---------------------------------------------------------------------------------------------
# model-based rewards online, normalisation
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_tokenizer_rm(tmp_path_factory, tiny_build_config):
    """A reward model whose tokenizer differs from the policy's (another vocabulary size)."""
    from tether import reward
    from tether.embedded import build_init

    base = tmp_path_factory.mktemp("other") / "model"
    build_init(tiny_build_config.model_copy(update={"vocab_size": 1024}), base)
    r = reward.train(reward.RewardConfig(model=str(base), output_dir=str(base.parent / "rm"), max_steps=2,
                                         batch_size=4, micro_batch_size=4, arith_pairs=8, eval_data="none",
                                         progress=False, report=False))
    return r.final_dir


def test_a_reward_model_with_another_tokenizer_scores_text_in_rl(tiny_model, tmp_path, other_tokenizer_rm):
    from tether.modeling import load_tokenizer
    from tether.reward import RewardScorer

    assert len(load_tokenizer(other_tokenizer_rm)) != len(load_tokenizer(tiny_model))
    rs = make_rewards({f"rm:{other_tokenizer_rm}": 1.0, "exact_match": 0.5})
    prompts, texts = ["Question: What is 3 + 4?\nAnswer:"] * 2, [" 3 + 4 = 7", " 3 + 4 = 9"]
    r, m = rs(prompts, texts, [{"answer": 7}] * 2)
    direct = RewardScorer(other_tokenizer_rm)(prompts, texts)
    torch.testing.assert_close(r, direct + torch.tensor([0.5, 0.0]))
    run = grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path, reward=f"rm:{other_tokenizer_rm}", eval_data="none"))
    recs = [x for x in metrics(run.run_dir) if "loss" in x]
    assert len(recs) == 3 and all(x["reward_std"] > 0 for x in recs)  # the RM's scores vary: it is scoring
    assert f"reward/rm:{other_tokenizer_rm}/std" in recs[0] and "reward/rm" in "".join(recs[0])


def test_judge_and_attribute_models_as_rewards(tiny_model):
    from tether.judge import Judge

    rs = make_rewards(f"judge:{tiny_model}")
    prompts, texts = ["Question: What is 3 + 4?\nAnswer:"] * 2, [" 3 + 4 = 7", " 3 + 4 = 9"]
    r, _ = rs(prompts, texts, [{}] * 2)
    torch.testing.assert_close(r, Judge(tiny_model)(prompts, texts))
    with pytest.raises(ValueError, match="rm:PATH"):
        make_rewards("judg:/x")


def test_normalised_runs_log_the_reward_itself(tiny_model, tmp_path, monkeypatch):
    """reward_normalize=true trains on normalised rewards but logs the rewards themselves (reward,
    completions.jsonl) beside the normalised mean."""
    monkeypatch.setitem(__import__("tether.rewards").rewards.REWARDS, "by_length", _by_length)
    r = grpo.train(small(grpo.GRPOConfig, tiny_model, tmp_path, max_steps=2, eval_data="none", reward="by_length",
                         reward_normalize=True))
    logged = metrics(r.run_dir, "completions.jsonl")
    for step, m in zip((1, 2), [m for m in metrics(r.run_dir) if "loss" in m]):
        raw = [c["reward"] for c in logged if c["step"] == step]
        assert all(x in (0.0, 1.0, 2.0, 3.0, 4.0) for x in raw)  # by_length's own scores
        assert m["reward"] == pytest.approx(sum(raw) / 8, abs=1e-6)
        assert m["reward/normalized_mean"] != pytest.approx(m["reward"], abs=1e-3)


def test_running_reward_normalisation():
    from tether.rewards import RunningNorm

    norm = RunningNorm()
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, float("nan"), 6.0])
    norm(a)
    out = norm(b)
    everything = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])
    torch.testing.assert_close(out[[0, 2]], (b[[0, 2]] - everything.mean()) / (everything.std() + 1e-6))
    assert torch.isnan(out[1])
    state = norm.state_dict()
    again = RunningNorm()
    again.load_state_dict(state)
    torch.testing.assert_close(again(torch.tensor([5.0])), norm(torch.tensor([5.0])))


def test_length_reward_correlation_guard():
    from tether.rewards import length_correlation

    lengths = torch.tensor([1, 2, 3, 4, 5])
    assert length_correlation(lengths, torch.tensor([1.0, 2, 3, 4, 5])) == pytest.approx(1.0)
    assert length_correlation(lengths, torch.tensor([5.0, 4, 3, 2, 1])) == pytest.approx(-1.0)
    assert length_correlation(lengths, torch.tensor([1.0, 1, 1, 1, 1])) == 0.0
    assert length_correlation(lengths, torch.tensor([1.0, float("nan"), 3, 4, 5])) == pytest.approx(1.0)


@pytest.mark.parametrize("lean,module,mini_batches", [(True, grpo, 1), (False, grpo, 1), (True, grpo, 2), (True, ppo, 2)])
def test_trainer_and_sampler_log_probs_agree_during_a_run(tiny_model, tmp_path, monkeypatch, lean, module,
                                                          mini_batches):
    """fp32: each step samples from the weights it trains, so before its first update the log-probs
    agree to float noise at every step, the weights moving between steps (a reward that varies),
    whichever forward the trainer runs; with two updates a rollout the second is left out of the
    measure (it differs by design)."""
    monkeypatch.setitem(__import__("tether.rewards").rewards.REWARDS, "by_length", _by_length)
    cls = grpo.GRPOConfig if module is grpo else ppo.PPOConfig
    r = module.train(small(cls, tiny_model, tmp_path, eval_data="none", beta=0.0, mini_batches=mini_batches,
                           reward="by_length", lean_forward=lean))
    recs = [m for m in metrics(r.run_dir) if "loss" in m]
    assert all(m["logp_gap"] < 1e-4 for m in recs) and all(m["grad_norm"] > 0 for m in recs)


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_while_training_unless_kept(gpt2_model, tmp_path, monkeypatch, disable):
    """A GPT-2 checkpoint (dropout 0.1, the model's own forward everywhere): with its dropout zeroed, the
    default, the trainer's log-probs are the sampler's to float noise; kept, they are a noisy
    perturbation of them (0.05 nats a token measured)."""
    monkeypatch.setitem(__import__("tether.rewards").rewards.REWARDS, "by_length", _by_length)
    r = grpo.train(small(grpo.GRPOConfig, gpt2_model, tmp_path, eval_data="none", beta=0.04, mini_batches=1,
                         reward="by_length", disable_dropout=disable, max_steps=2))
    gaps = [m["logp_gap"] for m in metrics(r.run_dir) if "loss" in m]
    assert all(g < 1e-5 for g in gaps) if disable else all(g > 1e-2 for g in gaps), gaps


def test_disable_dropout_zeroes_modules_and_attention_rates():
    """nn.Dropout modules (GPT-2) and the float rates attention modules read at call time (Qwen2's
    ``attention_dropout``) both go to 0: a training forward then equals an eval forward."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    from tether.modeling import disable_dropout

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 12))
    models = [GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)),
              Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.5))]
    for model in models:
        model.eval()
        want = model(ids).logits
        model.train()
        assert not torch.allclose(model(ids).logits, want)
        assert disable_dropout(model) > 0
        assert torch.equal(model(ids).logits, want)
        assert disable_dropout(model) == 0


def test_mini_batches_hold_whole_prompt_groups():
    """Mini-batches are cut from a shuffle of prompt groups: every completion once, each group's
    completions adjacent and in order (its prompt is computed once per mini-batch), groups reordered."""
    from tether.online import shuffle_groups

    torch.manual_seed(0)
    rows = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 20, 21, 22, 23])  # groups 0, 2, 3, 5 of n=4
    out = shuffle_groups(rows, 4)
    assert sorted(out.tolist()) == rows.tolist()
    groups = (out // 4).tolist()
    assert all(len(set(groups[i:i + 4])) == 1 for i in range(0, 16, 4))
    assert all(out[i:i + 4].tolist() == sorted(out[i:i + 4].tolist()) for i in range(0, 16, 4))
    orders = {tuple(shuffle_groups(rows, 4).tolist()) for _ in range(20)}
    assert len(orders) > 1


def test_least_squares_value_head_solves_the_weighted_squared_error():
    """PPO's least-squares critic: after steps k = 1..K the head's (w, b) minimise
    Σ_k forget^(K-k) Σ_t (w·h_t + b - R_t)² (+ the small ridge term), the solution of a weighted linear
    least-squares problem; forget 0 keeps only the last step."""
    g = torch.Generator().manual_seed(0)
    h1, h2 = torch.randn(50, 6, generator=g), torch.randn(40, 6, generator=g)
    r1, r2 = torch.randn(50, generator=g), h2 @ torch.arange(6.0) - 2.0  # r2: exactly linear
    head = ppo.ValueHead(6)
    head.fit([(h1[:20], r1[:20]), (h1[20:], r1[20:])], forget=0.5, ridge=0.0)  # micro-batches add up
    head.fit([(h2, r2)], forget=0.5, ridge=0.0)
    x = torch.cat([torch.cat([h1, h2]), torch.ones(90, 1)], 1).double()
    sw = torch.cat([torch.full((50,), 0.5), torch.ones(40)]).double().sqrt()[:, None]
    want = torch.linalg.lstsq(sw * x, sw[:, 0] * torch.cat([r1, r2]).double()).solution
    torch.testing.assert_close(torch.cat([head.v.weight[0], head.v.bias]).double(), want, atol=1e-5, rtol=1e-5)
    head.fit([(h2, r2)], forget=0.0, ridge=0.0)  # the first step forgotten: the exact linear fit
    torch.testing.assert_close(head(h2), r2, atol=1e-4, rtol=1e-4)
    head.fit([(h2, r2)], forget=0.0)  # the ridge term pulls only slightly
    torch.testing.assert_close(head(h2), r2, atol=0.05, rtol=0.05)
