"""Verifiers: maths equivalence via math-verify, QA exact match / F1 on hand-worked cases, format;
rows without a usable reference or tests are invalid on their own, never wrong, right or a batch error."""

import math

import pytest
import torch

from tether import verifiers

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


@pytest.mark.parametrize("completion", [" 41 + 31 =", " 41 + 31 = ?", "I don't know. 41 + 31", "It is 2*36"])
def test_math_does_not_evaluate_a_restated_question(completion):
    """math-verify evaluates a plain-text sum into its value, so the question restated scored as its
    answer; a plain-text sum or product is no answer (boxed or LaTeX maths is still evaluated, as TRL)."""
    v = math_equal(completion, 72)
    assert v.score == 0.0 and v.reason == "no_answer"
    assert math_equal("\\boxed{41+31}", 72).score == 1.0
    assert math_equal(" 5 - 10 = -5", -5).score == 1.0 and math_equal("the answer is 1/2", "0.5").score == 1.0


def test_answer_in_numbers_takes_negative_and_float_answers():
    from tether.rewards import answer_in_numbers

    got = answer_in_numbers(["p"] * 5, ["5 - 10 = -5", "10 - 5", "it is 7", "72", "x"],
                            [{"answer": -5}, {"answer": -5}, {"answer": 7.0}, {"answer": "72"}, {"answer": "3.5"}])
    assert got[:4] == [1.0, 0.0, 1.0, 1.0]  # "10 - 5" holds 10 and 5: its minus is an operator
    assert math.isnan(got[4].score) and got[4].reason == "unparsable_reference"  # never a silent "wrong"


def test_a_rows_format_pattern_that_cannot_be_used_is_invalid_for_that_row_alone():
    got = verifiers.format_reward(["p"] * 3, ["<answer>1</answer>"] * 3, [{}, {"format": None}, {"format": "("}])
    assert got[0].score == 1.0 and got[1].score == 1.0  # None: the default tag
    assert math.isnan(got[2].score) and got[2].reason == "bad_format"
    assert verifiers.format_reward(["p"], ["x"], [{"format": 3}])[0].reason == "bad_format"


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


# ---------------------------------------------------------------------------------------------
# References: scalars, lists, missing ones
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qa_em", "qa_f1"])
def test_qa_rewards_take_a_numeric_answer_as_one_reference(name):
    """``{"answer": 42}`` is one gold answer "42" (``list(42)`` raised and invalidated the batch);
    a list of answers stays several."""
    r, m = make_rewards(name)(["q"] * 4, ["<answer>42</answer>", "41", "<answer>Paris</answer>", "3.5"],
                              [{"answer": 42}, {"answer": 42}, {"answers": ["paris", "France"]}, {"answers": [3.5, 7]}])
    assert r.tolist() == [1.0, 0.0, 1.0, 1.0] and m[f"reward/{name}/invalid"] == 0


@pytest.mark.parametrize("name,good,gold", [("qa_em", "Paris", "paris"), ("qa_f1", "Paris", "paris"),
                                            ("math", "3", "3"), ("exact_match", "3", 3), ("answer_in_numbers", "3", 3)])
def test_a_missing_reference_is_invalid_for_that_sample_only(name, good, gold):
    """No answer (key absent, None, [] or blank) cannot be scored: NaN with reason ``no_reference``,
    counted as invalid, the other samples scored as usual (``math`` said "wrong" for None; a missing key
    raised KeyError and invalidated the whole batch)."""
    metadata = [{"answer": gold}, {}, {"answer": None}, {"answers": []}, {"answer": "  "}]
    r, m = make_rewards(name, on_invalid="drop")(["q"] * 5, [f"<answer>{good}</answer>"] * 5, metadata)
    assert r[0] == 1.0 and torch.isnan(r[1:]).all()
    assert m[f"reward/{name}/invalid"] == 4 and m[f"reward/{name}/no_reference"] == 4 and m["reward/dropped"] == 4


def test_references_as_verifier_arguments():
    assert qa_exact_match("42", 42).score == 1.0 and qa_f1("forty two", 42).score == 0.0
    assert qa_exact_match("Paris", {"text": ["paris"], "answer_start": [0]}).score == 1.0  # SQuAD's answers
    for v in (qa_exact_match("x", []), qa_f1("x", None), math_equal("3", None), final_number_equal("3", None)):
        assert math.isnan(v.score) and v.reason == "no_reference"
    assert math_equal("\\boxed{3}", ["2", "3"]).reason == "correct"  # any of several references
    assert final_number_equal(" = 7", 7.0).score == 1.0 and final_number_equal(" = 7", " 7").score == 1.0
    v = final_number_equal(" = 7", "7.5")  # not a whole number: int() raised for the whole batch
    assert math.isnan(v.score) and v.reason == "unparsable_reference"


# ---------------------------------------------------------------------------------------------
# The code verifier's tests field
# ---------------------------------------------------------------------------------------------
class RecordingPool:
    """Stands in for the sandbox pool: records the jobs, passes every test."""

    def __init__(self):
        self.jobs = []

    def map(self, jobs):
        from tether.sandbox import SandboxResult

        self.jobs += jobs
        return [SandboxResult("passed", passed=len(tests), total=len(tests)) for _, tests in jobs]


def test_code_tests_field_one_string_is_one_test_and_no_tests_is_invalid(monkeypatch):
    """A string is one test (it was split into characters, 16 one-character "tests"); an empty list,
    blank tests, a missing key or None are ``no_tests``, and non-strings ``bad_tests``: invalid and
    counted, never sent to a sandbox (an empty list scored 1.0 for any code that loaded: a reward for
    nothing; a missing key raised KeyError and invalidated the whole batch)."""
    pool = RecordingPool()
    monkeypatch.setattr(verifiers, "_POOL", pool)
    metadata = [{"tests": "assert f(2) == 4"}, {"tests": ["assert f(1) == 2", "assert f(0) == 0"]}, {"tests": []},
                {"tests": [" "]}, {}, {"tests": None}, {"tests": 3}, {"tests": ["assert f(1) == 2", 5]}]
    r, m = make_rewards("code")(["p"] * 8, ["def f(x):\n    return 2 * x"] * 8, metadata)
    assert [tests for _, tests in pool.jobs] == [["assert f(2) == 4"], ["assert f(1) == 2", "assert f(0) == 0"]]
    assert r.tolist() == [1.0, 1.0] + [0.0] * 6  # the fallback for the invalid ones
    assert m["reward/code/invalid"] == 6 and m["reward/code/no_tests"] == 4 and m["reward/code/bad_tests"] == 2
    assert m["reward/code/passed"] == 2


def test_code_reward_runs_a_single_string_test_in_the_sandbox():
    from tether.sandbox import available

    if available() is not None:
        pytest.skip(f"sandbox unavailable: {available()}")
    completions = ["```python\ndef f(x):\n    return x * x\n```", "def f(x):\n    return x + 1"]
    r, m = make_rewards("code")(["p"] * 2, completions, [{"tests": "assert f(3) == 9"}] * 2)
    assert r.tolist() == [1.0, 0.0] and m["reward/code/passed"] == 1 and m["reward/code/failed"] == 1
