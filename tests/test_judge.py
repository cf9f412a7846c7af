import pytest
import torch

from tether import judge, sft
from tether.arith import ArithSpec
from tether.evaluate import rank_accuracy


def test_judge_rows_label_correct_and_wrong_answers():
    from tether.arith import exact_match

    rows = judge.judge_rows(ArithSpec(), 200, 0)
    assert 0.35 < sum(r["correct"] for r in rows) / len(rows) < 0.65
    for r in rows:
        assert r["completion"] == (judge.YES if r["correct"] else judge.NO)
        assert r["prompt"].endswith("\nVerdict:")


def test_zero_shot_judge_scores_any_causal_lm(tiny_model):
    j = judge.Judge(tiny_model)
    s = j(["Question: What is 2 + 2?\nAnswer:"] * 2, [" 2 + 2 = 4", " 2 + 2 = 5"])
    assert s.shape == (2,) and torch.isfinite(s).all() and s[0] != s[1]
    # this tokenizer splits " yes" into [" ", "y", "es"]: the first tokens alone would compare a bare space
    assert len(j.yes_ids) > 1 and not j.single
    # the verdict's log-ratio, from a full forward of each judge prompt alone followed by each verdict word:
    # log p(" yes") - log p(" no"), each summed over the word's tokens
    for prompt, completion, got in zip(["Question: What is 2 + 2?\nAnswer:"] * 2, [" 2 + 2 = 4", " 2 + 2 = 5"], s):
        ids = j.tokenizer(judge.judge_prompt(prompt, completion, j.instruction), add_special_tokens=False)["input_ids"]
        word = []
        for verdict in (j.yes_ids, j.no_ids):
            with torch.no_grad():
                logp = torch.log_softmax(j.model(input_ids=torch.tensor([ids + verdict])).logits[0], -1)
            word.append(sum(logp[len(ids) - 1 + k, t].item() for k, t in enumerate(verdict)))
        assert got.item() == pytest.approx(word[0] - word[1], abs=1e-4)
    p = judge.Judge(tiny_model, mode="p_yes")(["Q:"], [" 1"])

    assert 0 < p.item() < 1
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        j(["Q:", "Q:"], [" 1"])
    with pytest.raises(ValueError, match="choose from"):
        judge.Judge(tiny_model, mode="yes")


@pytest.mark.slow
def test_trained_judge_ranks_correct_answers_above_wrong_ones(embedded_model, tmp_path):
    """The yes/no objective of seed §3, trained as SFT on verdicts, on the arithmetic world."""
    from tether.modeling import default_dtype

    rows = judge.judge_rows(ArithSpec(), 6000, 0)
    before = rank_accuracy(judge.Judge(embedded_model), ArithSpec(), 150)
    r = sft.train(sft.SFTConfig(model=str(embedded_model), output_dir=str(tmp_path / "judge"), max_steps=80,
                                batch_size=64, micro_batch_size=64, lr=1e-3, progress=False, report=False,
                                eval_data="none", dtype=default_dtype()), rows=rows)
    after = rank_accuracy(judge.Judge(r.final_dir), ArithSpec(), 150)
    assert after >= 0.60 and after - before >= 0.10 - 1e-9  # fractions k / n: an exact +10 passes
