"""Reward functions of the user's (``py:``) in tether's and TRL's forms, and the checks that keep a
model reward (``rm:``, ``attributes:``, ``judge:``) from loading the wrong folder."""

import json

import pytest
import torch

from tether.config import ConfigError
from tether.rewards import RewardContext, TRLReward, check_scorer_folder, load_python_reward, make_rewards

USER_REWARDS = '''
SEEN = {}

def trl_acc(prompts, completions, answer, **kwargs):  # TRL: a named column and the rest in kwargs
    SEEN["trl_acc"] = dict(prompts=prompts, completions=completions, answer=answer, **kwargs)
    return [1.0 if c.strip() == str(a) else 0.0 if a is not None else None for c, a in zip(completions, answer)]

def trl_len(completions, **kwargs):  # TRL's documentation example
    return [-abs(4 - len(c)) for c in completions]

def trl_no_kwargs(prompts, completions, answer, level):  # four arguments: only TRL's keywords can fill them
    return [float(c.strip() == str(a)) + 0.0 * len(lv) for c, a, lv in zip(completions, answer, level)]

def trl_keyword_only(prompts, completions, *, answer):
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]

def column_third(prompts, completions, answer):  # three arguments, the third a data column
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]

def tether_meta(prompts, completions, metadata, bonus=0.0):
    return [float(c.strip() == str(m["answer"])) + bonus for c, m in zip(completions, metadata)]

def tether_other_name(prompts, completions, rows):  # not a column: tether's form, as before
    return [float(c.strip() == str(r["answer"])) for c, r in zip(completions, rows)]

def needs_ids(prompts, completions, completion_ids):
    return [float(len(i)) for i in completion_ids]

def trl_everything(completions, completion_ids, trainer_state, log_metric, log_extra, **kwargs):
    SEEN["everything"] = dict(ids=completion_ids, step=trainer_state.global_step, max_steps=trainer_state.max_steps,
                              epoch=trainer_state.epoch, state=type(trainer_state).__name__, columns=sorted(kwargs))
    log_metric("ids_per_completion", sum(map(len, completion_ids)) / len(completion_ids))
    log_extra("first_id", [i[0] if i else None for i in completion_ids])
    return [float(len(i)) for i in completion_ids]

def needs_environments(prompts, completions, environments, **kwargs):
    return [0.0] * len(completions)

async def trl_async(completions, answer, **kwargs):  # TRL runs async reward functions too
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]

async def tether_async(prompts, completions, metadata):
    return [float(c.strip() == str(m["answer"])) for c, m in zip(completions, metadata)]

LIMIT = {}

async def trl_async_pooled(completions, answer, **kwargs):  # a client made on the first call, reused after
    import asyncio
    sem = LIMIT.setdefault("sem", asyncio.Semaphore(1))  # bound to the loop where it first makes one wait

    async def one(c, a):
        async with sem:
            await asyncio.sleep(0)
            return float(c.strip() == str(a))
    return await asyncio.gather(*(one(c, a) for c, a in zip(completions, answer)))


def chat_acc(prompts, completions, answer, **kwargs):  # TRL's conversational form
    SEEN["chat_acc"] = dict(prompts=prompts, completions=completions)
    return [float(c[0]["content"].strip() == str(a)) for c, a in zip(completions, answer)]
'''


@pytest.fixture
def user_rewards(tmp_path):
    f = tmp_path / "user_rewards.py"
    f.write_text(USER_REWARDS)
    return f


def _module(fn):
    return (fn.fn if isinstance(fn, TRLReward) else fn).__globals__


PROMPTS, TEXTS = ["Q: 3 + 4?", "Q: 2 + 2?", "Q: 1 + 1?"], [" 7", " 5", " 2"]
META = [{"answer": 7, "level": "easy"}, {"answer": 4, "level": "easy"}, {"answer": None, "level": "hard"}]


def test_a_trl_function_with_a_named_column_and_kwargs_gets_the_column(user_rewards):
    """``f(prompts, completions, answer, **kwargs)`` is TRL's form: ``answer`` is the column's list,
    every other column arrives in ``kwargs`` (it was taken for tether's form because it has three
    positional parameters, and ``answer`` received the metadata dicts). None is an invalid score."""
    rs = make_rewards(f"py:{user_rewards}:trl_acc", on_invalid="drop")
    fn = rs.fns[f"py:{user_rewards}:trl_acc"]
    assert isinstance(fn, TRLReward)
    r, m = rs(PROMPTS, TEXTS, META)
    assert r[:2].tolist() == [1.0, 0.0] and torch.isnan(r[2])
    assert m[f"reward/py:{user_rewards}:trl_acc/invalid"] == 1
    seen = _module(fn)["SEEN"]["trl_acc"]
    assert seen == {"prompts": PROMPTS, "completions": TEXTS, "answer": [7, 4, None], "level": ["easy", "easy", "hard"]}


@pytest.mark.parametrize("name", ["trl_no_kwargs", "trl_keyword_only", "column_third"])
def test_parameters_named_like_columns_receive_the_columns(user_rewards, name):
    """Without **kwargs, parameters after (prompts, completions) named like data columns are TRL's
    form: one list per column (four parameters, a keyword-only one, or a third one that is a column)."""
    rs = make_rewards(f"py:{user_rewards}:{name}")
    r, m = rs(PROMPTS[:2], TEXTS[:2], META[:2])
    assert r.tolist() == [1.0, 0.0] and m[f"reward/py:{user_rewards}:{name}/invalid"] == 0


@pytest.mark.parametrize("name", ["tether_meta", "tether_other_name"])
def test_tethers_form_still_gets_one_metadata_dict_per_sample(user_rewards, name):
    fn = load_python_reward(f"{user_rewards}:{name}")
    assert not isinstance(fn, TRLReward)
    assert list(fn(PROMPTS[:2], TEXTS[:2], META[:2])) == [1.0, 0.0]


def test_trl_documentation_example_and_refusals(user_rewards):
    rs = make_rewards(f"py:{user_rewards}:trl_len")
    r, _ = rs(PROMPTS, ["abcd", "ab", ""], META)
    assert r.tolist() == [0.0, -2.0, -4.0]
    with pytest.raises(ValueError, match="requires environments .TRL's tool-use environments."):
        load_python_reward(f"{user_rewards}:needs_environments")


def test_trl_keywords_come_from_the_steps_context(user_rewards):
    """TRL's ``completion_ids``, ``trainer_state`` (transformers' own class), ``log_metric`` and
    ``log_extra`` reach a function that takes them from the step's :class:`RewardContext`; what it
    logs lands in the metrics (``reward/<name>``, averaged) and in the context's extra columns. A
    function that needs one of them gets no score outside a trainer's step, and says why."""
    ids = [[5, 6, 0], [7], [8, 9]]
    ctx = RewardContext(ids, global_step=4, max_steps=10, epoch=0.25)
    ref = f"py:{user_rewards}:trl_everything"
    rs = make_rewards(ref)
    r, m = rs(PROMPTS, TEXTS, META, ctx)
    assert r.tolist() == [3.0, 1.0, 2.0]
    seen = _module(rs.fns[ref])["SEEN"]["everything"]
    assert seen == {"ids": ids, "step": 4, "max_steps": 10, "epoch": 0.25, "state": "TrainerState",
                    "columns": ["answer", "level", "prompts"]}
    assert m["reward/ids_per_completion"] == pytest.approx(2.0)
    assert ctx.extra == {"first_id": [5, 7, 8]}
    r, m = make_rewards(ref)(PROMPTS, TEXTS, META)  # no context: not a trainer's step
    assert m[f"reward/{ref}/invalid"] == 3
    r, m = make_rewards(f"py:{user_rewards}:needs_ids")(PROMPTS, TEXTS, META, ctx)
    assert r.tolist() == [3.0, 1.0, 2.0]


def test_a_logged_metric_never_replaces_tethers_own(user_rewards, tmp_path, caplog):
    f = tmp_path / "clash.py"
    f.write_text("def f(completions, log_metric, **kw):\n    log_metric('dropped', 99.0)\n"
                 "    log_metric('mine', 1.0)\n    return [0.0] * len(completions)\n")
    _, m = make_rewards(f"py:{f}:f")(PROMPTS, TEXTS, META, RewardContext())
    assert m["reward/dropped"] == 0 and m["reward/mine"] == 1.0
    assert "log_metric('dropped', ...): tether logs reward/dropped itself" in caplog.text


@pytest.mark.parametrize("name", ["trl_async", "tether_async", "trl_async_pooled"])
def test_async_reward_functions_are_awaited(user_rewards, name):
    """Awaited on one event loop for the whole process (as TRL keeps one for the run): what an async
    function made on its first call (a semaphore, a client) still works on the later ones."""
    rs = make_rewards(f"py:{user_rewards}:{name}")
    for _ in range(3):
        r, m = rs(PROMPTS[:2], TEXTS[:2], META[:2])
        assert r.tolist() == [1.0, 0.0] and m[f"reward/py:{user_rewards}:{name}/invalid"] == 0


def test_bad_reward_specs_are_refused(tmp_path):
    for spec, match in [({}, "names no reward function"), ({"exact_match": float("nan")}, "must be finite"),
                        ({"exact_match": float("inf"), "format": 1.0}, "must be finite")]:
        with pytest.raises(ValueError, match=match):
            make_rewards(spec)
    broken = tmp_path / "broken.py"
    broken.write_text("def f(prompts, completions, metadata):\n    return [0.0] * len(completions\n")
    with pytest.raises(ValueError, match=f"running {broken} raised SyntaxError"):
        make_rewards(f"py:{broken}:f")


def test_a_missing_column_is_an_invalid_batch_not_a_crash(user_rewards, caplog):
    rs = make_rewards(f"py:{user_rewards}:trl_no_kwargs")
    r, m = rs(PROMPTS[:2], TEXTS[:2], [{"answer": 7}, {"answer": 4}])  # no 'level' column
    assert m[f"reward/py:{user_rewards}:trl_no_kwargs/invalid"] == 2
    assert "needs level, which the rows do not have as data columns (columns: answer)" in caplog.text


def test_conversational_rows_reach_trl_functions_as_messages(user_rewards):
    """Rows whose metadata holds their chat ``prompt`` (a list of messages) give a TRL function the
    messages as ``prompts`` and each completion as ``[{"role": "assistant", "content": text}]``, as
    TRL's GRPOTrainer does for conversational data; ``prompt`` is not passed as a column."""
    chat = [[{"role": "user", "content": "3 + 4?"}], [{"role": "user", "content": "2 + 2?"}]]
    meta = [{"prompt": chat[0], "answer": 7}, {"prompt": chat[1], "answer": 4}]
    fn = load_python_reward(f"{user_rewards}:chat_acc")
    assert list(fn(["<rendered 1>", "<rendered 2>"], TEXTS[:2], meta)) == [1.0, 0.0]
    seen = _module(fn)["SEEN"]["chat_acc"]
    assert seen["prompts"] == chat
    assert seen["completions"] == [[{"role": "assistant", "content": " 7"}], [{"role": "assistant", "content": " 5"}]]
    # text rows: text in, text out; the flag forces either form
    plain = TRLReward(_module(fn)["trl_len"], "trl_len")
    assert list(plain(PROMPTS[:2], ["abcd", "ab"], META[:2])) == [0, -2]
    with pytest.raises(ValueError, match="conversational, but the rows' metadata holds no 'prompt' messages"):
        TRLReward(_module(fn)["chat_acc"], "chat_acc", conversational=True)(PROMPTS[:2], TEXTS[:2], META[:2])


# ---------------------------------------------------------------------------------------------
# Model rewards: the folder is checked before transformers sees it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rm", "attributes", "judge"])
def test_a_model_reward_path_that_does_not_exist_is_a_config_error_naming_it(tmp_path, kind):
    """It was handed to transformers, which took it for a hub id: an OSError about huggingface.co."""
    missing = tmp_path / "no-such-rm"
    with pytest.raises(ConfigError, match=f"reward {kind}:{missing}: no such model folder"):
        make_rewards(f"{kind}:{missing}")


def test_rm_refuses_a_causal_lm_and_a_folder_without_config(tiny_model, tmp_path):
    """A causal LM loaded as a sequence classifier gets a randomly initialised score head (silently,
    before); refused, with the generative judge suggested. A run folder points at its final/."""
    with pytest.raises(ConfigError, match=r"is a causal language model \(Qwen2ForCausalLM\).*judge:"):
        make_rewards(f"rm:{tiny_model}")
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForSequenceClassification"]}))
    with pytest.raises(ConfigError, match="no config.json.*did you mean .*final"):
        make_rewards(f"rm:{run}")
    assert check_scorer_folder("rm", str(run / "final")) == run / "final"


def test_rm_and_attributes_folders_are_not_mistaken_for_each_other(tiny_model, tmp_path):
    """A multi-attribute model under rm: (or a reward model under attributes:) stopped in transformers'
    head-shape error, with a traceback."""
    from transformers import AutoModelForSequenceClassification

    for heads in (1, 3):
        AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=heads).save_pretrained(
            tmp_path / f"h{heads}")
    with pytest.raises(ConfigError, match="3 score heads.*attributes:"):
        make_rewards(f"rm:{tmp_path / 'h3'}")
    with pytest.raises(ConfigError, match="one score head.*rm:"):
        make_rewards(f"attributes:{tmp_path / 'h1'}")


def test_rm_accepts_what_tether_saves_reward_models_as(tiny_model, tmp_path):
    """A ``*ForSequenceClassification`` folder (``tether reward``'s final/) scores; a LoRA checkpoint
    is accepted when its adapter carries the trained head (modules_to_save), refused when it does not;
    a judge must be a causal LM."""
    from transformers import AutoModelForSequenceClassification

    from tether.modeling import load_tokenizer
    from tether.reward import RewardScorer

    rm = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=1).save_pretrained(rm)
    load_tokenizer(tiny_model).save_pretrained(rm)
    r, _ = make_rewards(f"rm:{rm}")(PROMPTS[:2], TEXTS[:2], [{}, {}])
    torch.testing.assert_close(r, RewardScorer(rm)(PROMPTS[:2], TEXTS[:2]))
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):  # not one score, the rest dropped
        RewardScorer(rm)(PROMPTS[:2], TEXTS[:1])
    with pytest.raises(ConfigError, match="causal language model"):  # its score head would load random
        RewardScorer(tiny_model)
    with pytest.raises(ConfigError, match="sequence-classification model.*use rm:"):
        make_rewards(f"judge:{rm}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model),
                                                             "modules_to_save": ["score"]}))
    assert check_scorer_folder("rm", str(adapter)) == adapter
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model),
                                                             "modules_to_save": None}))
    with pytest.raises(ConfigError, match="LoRA adapter of a causal language model"):
        check_scorer_folder("rm", str(adapter))
