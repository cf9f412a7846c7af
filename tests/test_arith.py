from tether.arith import ArithSpec, eval_rows, exact_match, extract_answer, problem_space, sample_problems, sft_rows


def test_split_is_disjoint_and_seed_independent():
    spec = ArithSpec()
    train, held = problem_space(spec)
    assert not set(train) & set(held)
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.15
    held_prompts = {p.prompt for p in held}
    for seed in (0, 1, 7):
        assert not {r["prompt"] for r in sft_rows(spec, 2000, seed)} & held_prompts
    assert {r["prompt"] for r in eval_rows(spec, 100)} <= held_prompts


def test_generation_is_deterministic_and_seeded():
    spec = ArithSpec(max_operand=20)
    assert sample_problems(spec, 50, 3) == sample_problems(spec, 50, 3)
    assert sample_problems(spec, 50, 3) != sample_problems(spec, 50, 4)


def test_training_draws_balance_operators_and_held_out_draws_weigh_problems_equally():
    """Training data makes × as common as + (its space is 30× smaller); held-out pairs, ratings and
    judge data are drawn like the held-out prompts, every held-out problem equally likely."""
    from collections import Counter

    spec = ArithSpec()
    _, held = problem_space(spec)
    train_ops = Counter(p.op for p in sample_problems(spec, 6000, 0))
    assert all(abs(train_ops[op] / 6000 - 1 / 3) < 0.03 for op in "+-*")
    held_ops = Counter(p.op for p in sample_problems(spec, 6000, 0, "held_out"))
    share = Counter(p.op for p in held)
    assert all(abs(held_ops[op] / 6000 - share[op] / len(held)) < 0.03 for op in "+-*")
    assert set(sample_problems(spec, 6000, 0, "held_out")) <= set(held)


def test_difficulty_is_configurable():
    spec = ArithSpec(max_operand=9, ops="+")
    train, held = problem_space(spec)
    assert all(p.op == "+" and p.a <= 9 and p.b <= 9 for p in train + held)
    assert len(train) + len(held) == 100


def test_answers_and_verifier():
    p = sample_problems(ArithSpec(), 30, 0)
    for q in p:
        assert extract_answer(q.completion) == q.answer
        assert q.answer >= 0
    assert extract_answer("so 12 - 3 = 9.") == 9
    assert extract_answer("no digits") is None
    assert exact_match(" 7 * 8 = 56", "56") and not exact_match(" 7 * 8 = 54", 56)
