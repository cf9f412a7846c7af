"""pass@k and majority vote of sampled completions (`tether eval samples=k`)."""

import itertools
import json

import pytest

from tether.evaluate import generate_greedy, pass_at_k, sampled_accuracy, score_samples


@pytest.mark.parametrize("n,c", [(5, 0), (5, 1), (5, 3), (5, 5), (8, 2)])
def test_pass_at_k_is_the_chance_that_k_draws_hold_a_correct_one(n, c):
    outcomes = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        draws = list(itertools.combinations(outcomes, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(n, c, n + 1)


def test_score_samples_counts_pass_at_k_and_the_majority_answer():
    rows = [{"prompt": "q1", "answer": "7"}, {"prompt": "q2", "answer": "3"}]
    groups = [[" 3 + 4 = 7", " 3 + 4 = 8", " 3 + 4 = 8", " 3 + 4 ="],  # one right, the vote says 8
              [" 1 + 2 = 3", " 1 + 2 = 3", " 1 + 2 = 4", "no answer"]]  # two right, the vote says 3
    ev = score_samples(rows, groups)
    assert ev["sample_accuracy"] == pytest.approx(3 / 8)
    assert ev["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert ev["pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)
    assert ev["pass@4"] == 1.0 and "pass@8" not in ev
    assert ev["majority_accuracy"] == 0.5
    with pytest.raises(ValueError):
        score_samples(rows, [groups[0], groups[1][:2]])


def test_sampled_accuracy_groups_each_prompts_samples(tokenizer, monkeypatch):
    """The engine's n completions per prompt, over several batches, are scored against their own row."""
    from tether import rollout

    def fake_generate(self, prompts, params):  # sample 0 names the prompt's token sum, the rest say -1
        texts = [f" = {sum(p)}" if j == 0 else " = -1" for p in prompts for j in range(params.n)]
        return rollout.Rollout(prompts, None, None, None, texts, None)

    monkeypatch.setattr(rollout.TorchEngine, "generate", fake_generate)
    prompts = [f"Question: What is {a} + 1?\nAnswer:" for a in range(12)]
    rows = [{"prompt": p, "answer": str(sum(tokenizer(p, add_special_tokens=False)["input_ids"]))} for p in prompts]
    ev = sampled_accuracy(None, tokenizer, rows, 4, batch_prompts=5)
    assert ev["pass@1"] == pytest.approx(0.25) and ev["pass@4"] == 1.0 and ev["majority_accuracy"] == 0.0
    assert ev["n"] == 12 and ev["samples_per_prompt"] == 4
