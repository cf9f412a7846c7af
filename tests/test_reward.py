import json

import pytest
import torch

from tether import reward
from tether.data import Example, collate


def test_last_token_pooling_ignores_padding_side_and_pad_id(tiny_model, tokenizer):
    torch.manual_seed(0)
    model = reward.load_reward_model(tiny_model).eval()
    texts = ["Question: What is 3 + 4?\nAnswer: 3 + 4 = 7", "Q: 1 + 1?", "The cat walks to the river slowly today."]
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    with torch.no_grad():
        alone = torch.cat([reward.last_token_scores(model, torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))
                           for x in ids])
        right = collate([Example(x, [0] * len(x)) for x in ids], tokenizer.pad_token_id)
        r_right = reward.last_token_scores(model, right.input_ids, right.attention_mask)
        # left padding, with the EOS id as pad (a tokenizer without a pad token)
        T = max(map(len, ids))
        left_ids = torch.tensor([[tokenizer.eos_token_id] * (T - len(x)) + x for x in ids])
        left_mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids])
        r_left = reward.last_token_scores(model, left_ids, left_mask)
    torch.testing.assert_close(r_right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r_left, alone, atol=1e-5, rtol=1e-5)
    assert alone.std() > 0  # distinct texts, distinct scores: the check can fail


def test_shared_prompt_rows_give_the_same_rewards(tiny_model, tokenizer):
    from tether.arith import ArithSpec, preference_rows
    from tether.data import read_rows, tokenize_pairs

    torch.manual_seed(0)
    model = reward.load_reward_model(tiny_model).eval()
    from test_dpo import EDGE_PAIRS

    pairs, _ = tokenize_pairs(read_rows(preference_rows(ArithSpec(), 6, 2) + EDGE_PAIRS), tokenizer, 128)
    with torch.no_grad():
        a = reward.pair_rewards(model, pairs, tokenizer.pad_token_id, shared_prompt=True, lm_nll=True)
        b = reward.pair_rewards(model, pairs, tokenizer.pad_token_id, shared_prompt=False, lm_nll=True)
    for x, y in zip(a, b):  # r_chosen, r_rejected, and the chosen completions' NLL (the lm_coef term)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[0], a[1])


def test_reward_model_trains_saves_and_scores(tiny_model, tmp_path):
    cfg = reward.RewardConfig(model=str(tiny_model), output_dir=str(tmp_path / "rm"), max_steps=4, batch_size=8,
                              micro_batch_size=4, arith_pairs=32, eval_pairs=16, progress=False, lr=1e-3)
    r = reward.train(cfg)
    recs = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if "loss" in x] == [1, 2, 3, 4]
    assert all(k in recs[1] for k in ("accuracy", "margin", "loss"))
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(r.final_dir)  # a plain HF folder
    scorer = reward.RewardScorer(r.final_dir)
    s = scorer(["Question: What is 3 + 4?\nAnswer:"] * 2, [" 3 + 4 = 7", " 3 + 4 = 9"])
    assert s.shape == (2,) and torch.isfinite(s).all() and s[0] != s[1]
    assert (r.run_dir / "report.md").is_file()


@pytest.mark.slow
def test_reward_model_learns_arithmetic_preferences(sft_model, tmp_path):
    """From the shipped SFT start, the Bradley-Terry model with the LM term (``lm_coef=1``) ranks
    1,000 held-out pairs (every held-out problem equally likely) at >= 90%. Measured on the AMD host:
    54.3% -> 94.9% in 1,800 steps (about 4 minutes); from SFT models the recipe made on other hosts and
    seeds, 88.4% (a 30.3% start) to 94.0% (docs/hosts.md, docs/results.md)."""
    from tether.modeling import default_dtype

    r = reward.train(reward.RewardConfig(model=str(sft_model), output_dir=str(tmp_path / "rm"), progress=False,
                                         report=False, dtype=default_dtype(), lm_coef=1.0, max_steps=1800,
                                         arith_pairs=40000, eval_pairs=1000))
    before, after = r.eval_before["pairwise_accuracy"], r.eval_after["pairwise_accuracy"]
    assert before < 0.6 and after >= 0.90, (before, after)


@pytest.mark.slow
def test_attribute_heads_learn_arithmetic_ratings(sft_model, tmp_path):
    """Multi-attribute regression heads from the shipped SFT start: the weighted scalar ranks.
    Measured on the Intel Xeon host (docs/hosts.md), from the shipped build's 300-step SFT model (20.3%):
    MSE 13.6 -> 0.85, rank accuracy 52.0% -> 63.5%; the AMD host's 39.0% SFT model passed a 65% bound,
    and the 500-step SFT model of the shipped build passes."""
    from tether import attributes
    from tether.modeling import default_dtype

    a = attributes.train(attributes.AttributeConfig(model=str(sft_model), output_dir=str(tmp_path / "attr"),
                                                    progress=False, report=False, dtype=default_dtype()))
    assert a.eval_after["mse"] < 0.2 * a.eval_before["mse"]
    assert a.eval_after["rank_accuracy"] >= 0.60


def test_lm_regularised_reward_model_logs_and_lowers_its_nll(tiny_model, tmp_path):
    cfg = reward.RewardConfig(model=str(tiny_model), output_dir=str(tmp_path / "rm"), max_steps=6, batch_size=8,
                              micro_batch_size=8, arith_pairs=32, eval_data="none", progress=False, lr=3e-3,
                              lm_coef=1.0, report=False)
    r = reward.train(cfg)
    nll = [json.loads(x)["lm_nll"] for x in (r.run_dir / "metrics.jsonl").read_text().splitlines() if "lm_nll" in x]
    assert len(nll) == 6 and nll[-1] < nll[0]  # the LM term trains the backbone through the tied embeddings


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_last_layer_at_the_read_positions_equals_the_full_forward(tiny_model, tokenizer, monkeypatch, shared_prompt):
    """The reward head reads one position per completion, so the last decoder layer runs only
    there (tether.modeling.hidden_at): rewards and gradients equal the full forward's."""
    from test_dpo import EDGE_PAIRS

    from tether import modeling
    from tether.arith import ArithSpec, preference_rows
    from tether.data import read_rows, tokenize_pairs

    pairs, _ = tokenize_pairs(read_rows(preference_rows(ArithSpec(), 6, 3) + EDGE_PAIRS), tokenizer, 128)
    out = []
    for decoders in (modeling._PRE_NORM_DECODERS, set()):  # the fast path, then the full forward
        monkeypatch.setattr(modeling, "_PRE_NORM_DECODERS", decoders)
        torch.manual_seed(0)
        model = reward.load_reward_model(tiny_model)
        assert modeling._last_layer_at_supported(model.base_model) == bool(decoders)
        rc, rr = reward.pair_rewards(model, pairs, tokenizer.pad_token_id, shared_prompt=shared_prompt)
        (rc.sum() - 3 * rr.sum()).backward()
        out.append((rc.detach(), rr.detach(), [p.grad.clone() for p in model.parameters()]))
    (c1, r1, g1), (c2, r2, g2) = out
    torch.testing.assert_close(c1, c2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=1e-5)
    assert g1[-1].abs().sum() > 0 and g1[-2].abs().sum() > 0  # the score head and the final norm get gradients
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
