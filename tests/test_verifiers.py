"""Verifiers: maths equivalence via math-verify, QA exact match / F1 on hand-worked cases, format."""

import pytest
import torch

from tether.rewards import make_rewards
from tether.verifiers import (extract_tagged, final_number_equal, format_ok, math_equal, normalize_answer,
                              qa_exact_match, qa_f1)


@pytest.mark.parametrize("completion,answer", [
    ("0.5", "1/2"), ("The answer is \\boxed{\\frac{1}{2}}", "0.5"), ("$\\frac{1}{2}$", "0.5"),
    ("so the result is 1/2", "\\frac{1}{2}"), (" 41 + 31 = 72", "72"), ("\\boxed{3}", "3.0"),
])
def test_math_equivalent_forms_score_one(completion, answer):
    v = math_equal(completion, answer)
    assert v.score == 1.0 and v.reason == "correct"


@pytest.mark.parametrize("completion,answer", [("0.5", "1/3"), ("\\boxed{2}", "3"), ("x = 7", "8")])
def test_math_different_values_score_zero(completion, answer):
    v = math_equal(completion, answer)
    assert v.score == 0.0 and v.reason == "wrong"


def test_math_without_an_answer_says_so():
    assert math_equal("I do not know", "3").reason == "no_answer"


def test_final_number():
    assert final_number_equal(" 3 + 4 = 7", 7).score == 1.0
    assert final_number_equal(" 3 + 4 = 8", 7).reason == "wrong"
    assert final_number_equal("seven", 7).reason == "no_answer"


def test_qa_normalisation_and_exact_match():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert qa_exact_match("the eiffel tower.", ["Eiffel Tower", "Paris"]).score == 1.0
    assert qa_exact_match("eiffel", "Eiffel Tower").score == 0.0


def test_qa_f1_hand_worked():
    # pred "red big house" vs gold "the big red barn": tokens {red, big, house} vs {big, red, barn}
    # overlap 2, precision 2/3, recall 2/3, F1 = 2/3
    assert qa_f1("red big house", "the big red barn").score == pytest.approx(2 / 3)
    # the best over the references; tokens are a multiset: "x x y" & "x y y" share {x, y}: P = R = 2/3
    assert qa_f1("x x y", ["x y y", "z"]).score == pytest.approx(2 / 3)
    assert qa_f1("Paris", ["paris", "France"]).score == 1.0
    assert qa_f1("nothing", "something else").score == 0.0


def test_format_and_tag_extraction():
    assert format_ok("think... <answer>42</answer>").score == 1.0
    assert format_ok("42").score == 0.0
    assert extract_tagged("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert extract_tagged("no tag") == "no tag"


def test_verdict_reasons_are_counted_in_reward_metrics():
    rs = make_rewards({"math": 1.0, "format": 0.5})
    r, m = rs(["q"] * 3, ["<answer>0.5</answer>", "<answer>2</answer>", "no idea"],
              [{"answer": "1/2"}, {"answer": "3"}, {"answer": "1"}])
    torch.testing.assert_close(r, torch.tensor([1.5, 0.5, 0.0]))
    assert m["reward/math/correct"] == 1 and m["reward/math/wrong"] == 1 and m["reward/math/no_answer"] == 1
    assert m["reward/format/ok"] == 2 and m["reward/format/missing"] == 1
