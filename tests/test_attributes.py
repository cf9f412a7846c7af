import math

import pytest
import torch

from tether import attributes as at
from tether.arith import ArithSpec, rating_rows


def test_parse_ratings_is_robust():
    attrs = ["correctness", "conciseness"]
    assert at.parse_ratings(" correctness: 4, conciseness: 2", attrs) == {"correctness": 4, "conciseness": 2}
    assert at.parse_ratings("Conciseness=3; CORRECTNESS : 1.5 and more", attrs) == {"correctness": 1.5, "conciseness": 3}
    assert at.parse_ratings("correctness: 4, correctness: 0", attrs)["correctness"] == 4  # first one wins
    r = at.parse_ratings("correctness: four", attrs)
    assert all(math.isnan(v) for v in r.values())
    assert at.format_ratings({"correctness": 4, "conciseness": 2.5}, attrs) == " correctness: 4, conciseness: 2.5"


def test_rating_rows_rank_correct_answers_first():
    rows = rating_rows(ArithSpec(), 400, 0)
    good = [r for r in rows if r["ratings"]["correctness"] == 4]
    assert 0.35 < len(good) / len(rows) < 0.65
    assert all(r["ratings"]["correctness"] < 4 for r in rows if r not in good)
    assert {r["ratings"]["conciseness"] for r in rows} >= {1, 2, 4}


def test_regression_heads_train_and_score(tiny_model, tmp_path):
    cfg = at.AttributeConfig(model=str(tiny_model), output_dir=str(tmp_path / "a"), max_steps=3, batch_size=8,
                             micro_batch_size=4, arith_rows=32, eval_rows=16, progress=False, lr=1e-3,
                             attribute_weights=[0.75, 0.25])
    r = at.train(cfg)
    assert r.eval_after is not None and r.eval_after["mse"] < r.eval_before["mse"]
    scorer = at.AttributeScorer(r.final_dir, cfg.attributes, cfg.weights())
    s = scorer.scores(["Question: What is 2 + 2?\nAnswer:"], [" 2 + 2 = 4"])
    assert s.shape == (1, 2)
    assert scorer(["Question: What is 2 + 2?\nAnswer:"], [" 2 + 2 = 4"]).item() == pytest.approx(
        (s[0] @ torch.tensor([0.75, 0.25])).item(), rel=1e-5)


def test_weights_must_match_attributes():
    with pytest.raises(ValueError, match="1 attribute_weights for 2 attributes"):
        at.AttributeConfig(attribute_weights=[1.0]).weights()


@pytest.mark.slow
def test_generative_ratings_are_learned(embedded_model, tmp_path):
    from tether.modeling import default_dtype

    cfg = at.AttributeConfig(model=str(embedded_model), output_dir=str(tmp_path / "g"), mode="generative",
                             max_steps=120, batch_size=64, micro_batch_size=64, lr=1e-3, progress=False,
                             report=False, dtype=default_dtype())
    r = at.train(cfg)
    rater = at.GenerativeRater(r.final_dir, cfg.attributes)
    rows = rating_rows(ArithSpec(), 100, 0, "held_out")
    got = rater.scores([x["prompt"] for x in rows], [x["completion"] for x in rows])
    assert not torch.isnan(got).any()  # always writes parseable ratings
    truth = torch.tensor([[x["ratings"][a] for a in cfg.attributes] for x in rows], dtype=torch.float)
    assert (got[:, 1] == truth[:, 1]).float().mean() >= 0.9  # conciseness is visible in the text
