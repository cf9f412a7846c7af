"""A run folder's life beyond the straight run: resuming with nothing to resume, a refused resume, a
resume with another model, a finished run resumed, and what a resumed run reports; the learning rate a
step logs; and the command line's errors for a folder or file that cannot be used."""

import json
import shutil

import pytest

from tether import grpo, ppo, reinforce, sft
from tether.cli import main
from tether.config import ConfigError
from tether.data import DataError
from tether.evaluate import load_eval_rows


def sft_cfg(model, out, **kw):
    base = dict(model=str(model), output_dir=str(out), max_steps=4, batch_size=2, micro_batch_size=2,
                arith_rows=8, eval_samples=4, max_new_tokens=4, progress=False, report=False, dtype="fp32")
    return sft.SFTConfig(**{**base, **kw})


def lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_without_a_checkpoint_starts_afresh(tiny_model, tmp_path, caplog):
    """resume=true on a folder with no checkpoint (a run that failed before its first one) warns and
    trains from the start; it raised an UnboundLocalError."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.yaml").write_text("left: by a run that failed while loading its data\n")
    r = sft.train(sft_cfg(tiny_model, out, resume=True, eval_data="none"))
    assert r.steps == 4 and (out / "final" / "config.json").is_file()
    assert "no checkpoint yet" in caplog.text
    assert "max_steps: 4" in (out / "config.yaml").read_text()


def test_a_run_that_failed_before_training_leaves_a_folder_the_fixed_command_can_use(tiny_model, tmp_path):
    """A bad row stops the run after config.yaml is written: the corrected command runs in that folder
    without overwrite or resume. A folder with anything else in it is still refused."""
    bad, good, out = tmp_path / "bad.jsonl", tmp_path / "good.jsonl", tmp_path / "r"
    bad.write_text('{"prompt": "Q:", "completion": " 1"}\n{"prompt": 3}\n')
    good.write_text('{"prompt": "Q:", "completion": " 1"}\n' * 4)
    with pytest.raises(DataError):
        sft.train(sft_cfg(tiny_model, out, data=str(bad), eval_data="none"))
    assert [f.name for f in out.iterdir()] == ["config.yaml"]
    assert sft.train(sft_cfg(tiny_model, out, data=str(good), eval_data="none", max_steps=1)).steps == 1
    with pytest.raises(ConfigError, match="not empty"):
        sft.train(sft_cfg(tiny_model, out, data=str(good), eval_data="none", max_steps=1))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("lr: 0.001  # a file of the user's own\n")
    with pytest.raises(ConfigError, match="not empty"):
        sft.train(sft_cfg(tiny_model, mine, data=str(good), eval_data="none", max_steps=1))


def test_a_refused_resume_leaves_the_runs_config(tiny_model, tmp_path):
    out = tmp_path / "r"
    sft.train(sft_cfg(tiny_model, out, stop_at_step=2, eval_data="none"))
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="lr"):
        sft.train(sft_cfg(tiny_model, out, resume=True, lr=0.5, eval_data="none"))
    assert (out / "config.yaml").read_text() == before


def test_resume_with_another_model_is_refused(tiny_model, tmp_path):
    """The policy resumes from the checkpoint but the reference (the KL, DPO) is loaded from model=:
    another model would change the run. The same folder spelt another way is the same model."""
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    out = tmp_path / "r"
    grpo.train(grpo.GRPOConfig(model=str(tiny_model), output_dir=str(out), max_steps=2, stop_at_step=1,
                               prompts_per_step=2, num_generations=2, max_new_tokens=4, eval_data="none",
                               progress=False, report=False, dtype="fp32"))
    again = dict(output_dir=str(out), max_steps=2, prompts_per_step=2, num_generations=2, max_new_tokens=4,
                 eval_data="none", progress=False, report=False, dtype="fp32", resume=True)
    with pytest.raises(ConfigError, match="model"):
        grpo.train(grpo.GRPOConfig(model=str(other), **again))
    r = grpo.train(grpo.GRPOConfig(model=str(tiny_model) + "/", **again))
    assert r.steps == 2


def test_resuming_a_finished_run_changes_nothing(tiny_model, tmp_path):
    out = tmp_path / "r"
    first = sft.train(sft_cfg(tiny_model, out))
    logged = (out / "metrics.jsonl").read_text()
    again = sft.train(sft_cfg(tiny_model, out, resume=True))
    assert again.finished_before and not again.ended_here
    assert (out / "metrics.jsonl").read_text() == logged  # no second evaluation line
    assert again.eval_after["accuracy"] == first.eval_after["accuracy"]
    assert again.eval_before["accuracy"] == first.eval_before["accuracy"]


@pytest.mark.parametrize("trainer", ["sft", "grpo"])
def test_a_resumed_run_reports_where_it_started(tiny_model, tmp_path, trainer):
    out = tmp_path / "r"
    if trainer == "sft":
        make = lambda **kw: sft.train(sft_cfg(tiny_model, out, **kw))  # noqa: E731
    else:
        make = lambda **kw: grpo.train(grpo.GRPOConfig(  # noqa: E731
            model=str(tiny_model), output_dir=str(out), max_steps=2, prompts_per_step=2, num_generations=2,
            max_new_tokens=4, eval_samples=4, progress=False, report=False, dtype="fp32", **kw))
    start = make(stop_at_step=1).eval_before
    r = make(resume=True)
    assert r.eval_before is not None and r.eval_before["accuracy"] == start["accuracy"]
    assert r.eval_after is not None


def test_the_logged_learning_rate_is_the_one_the_step_used(tiny_model, tmp_path):
    """Linear warmup over 2 steps to 1e-3: steps 1, 2, 3 update at 5e-4, 1e-3, 1e-3 (it logged the
    next step's rate: 1e-3, 1e-3, 1e-3)."""
    sft.train(sft_cfg(tiny_model, tmp_path / "s", max_steps=3, lr=1e-3, warmup_steps=2, schedule="constant",
                      eval_data="none"))
    grpo.train(grpo.GRPOConfig(model=str(tiny_model), output_dir=str(tmp_path / "g"), max_steps=3, lr=1e-3,
                               warmup_steps=2, prompts_per_step=2, num_generations=2, max_new_tokens=4,
                               eval_data="none", progress=False, report=False, dtype="fp32"))
    for run in ("s", "g"):
        assert [m["lr"] for m in lines(tmp_path / run) if "lr" in m] == pytest.approx([5e-4, 1e-3, 1e-3]), run


def test_settings_that_would_do_nothing_are_refused():
    with pytest.raises(ValueError, match="every\n?.*advantage would be 0"):
        reinforce.ReinforceConfig(baseline="mean", num_generations=1)
    with pytest.raises(ValueError, match="separate"):
        ppo.PPOConfig(critic="separate", head_trains_backbone=True)
    with pytest.raises(ValueError, match="critic_lr"):
        ppo.PPOConfig(critic_fit="least_squares", critic_lr=1e-2)
    reinforce.ReinforceConfig(baseline="none", num_generations=1)  # raw rewards: a real setting


def test_an_empty_evaluation_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no evaluation rows"):
        load_eval_rows(str(empty), 10)


def test_command_line_errors_are_one_line(tiny_model, tmp_path, capsys):
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_model, weightless)
    (weightless / "model.safetensors").unlink()
    assert main(["eval", f"model={weightless}", "eval_samples=2"]) == 1
    assert "error:" in capsys.readouterr().err
    tokenless = tmp_path / "tokenless"
    tokenless.mkdir()
    shutil.copy(tiny_model / "config.json", tokenless)
    shutil.copy(tiny_model / "model.safetensors", tokenless)
    assert main(["eval", f"model={tokenless}", "eval_samples=2"]) == 1
    assert "holds no tokenizer" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["sft", f"model={tiny_model}", f"output_dir={afile}", "max_steps=1"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_eval_in_bf16_reproduces_an_online_runs_evaluation(tiny_model, tmp_path, capsys):
    """An online run evaluates with the rollout engine in its sampling dtype; `tether eval dtype=bf16`
    scores its final/ the same way, so the two agree (in fp32, HF generate, they could differ)."""
    r = grpo.train(grpo.GRPOConfig(model=str(tiny_model), output_dir=str(tmp_path / "g"), max_steps=1,
                                   prompts_per_step=2, num_generations=2, max_new_tokens=6, eval_samples=24,
                                   progress=False, report=False, dtype="bf16"))
    capsys.readouterr()
    assert main(["eval", f"model={r.final_dir}", "eval_samples=24", "max_new_tokens=6", "dtype=bf16"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == r.eval_after["accuracy"]


def test_evaluation_only_settings_may_change_on_resume(tiny_model, tmp_path):
    """SFT's max_new_tokens and eval_data, the reward model's eval_pairs, only evaluate: a resume may
    change them. DPO's eval_pairs stay fixed (their reference scores are stored)."""
    from tether import dpo, reward

    out = tmp_path / "s"
    sft.train(sft_cfg(tiny_model, out, stop_at_step=2))
    assert sft.train(sft_cfg(tiny_model, out, resume=True, max_new_tokens=6, eval_data="none")).steps == 4
    small = dict(model=str(tiny_model), max_steps=2, batch_size=2, micro_batch_size=2, arith_pairs=8, progress=False,
                 report=False, dtype="fp32")
    reward.train(reward.RewardConfig(**small, output_dir=str(tmp_path / "r"), eval_pairs=4, stop_at_step=1))
    reward.train(reward.RewardConfig(**small, output_dir=str(tmp_path / "r"), eval_pairs=6, resume=True))
    dpo.train(dpo.DPOConfig(**small, output_dir=str(tmp_path / "d"), eval_pairs=4, eval_samples=4, stop_at_step=1))
    with pytest.raises(ConfigError, match="eval_pairs"):
        dpo.train(dpo.DPOConfig(**small, output_dir=str(tmp_path / "d"), eval_pairs=6, eval_samples=4, resume=True))


def test_evaluation_files_nothing_reads_are_refused():
    from tether import attributes, reward

    with pytest.raises(ValueError, match="not read"):
        reward.RewardConfig(eval_data="pairs.jsonl")
    with pytest.raises(ValueError, match="not read"):
        attributes.AttributeConfig(eval_data="rated.jsonl")
    with pytest.raises(ValueError, match="mode=regression"):
        attributes.AttributeConfig(mode="generative", eval_data="arith")


def test_attribute_rows_longer_than_max_length_are_dropped(tiny_model, tmp_path, caplog):
    from tether import attributes

    rows = [{"prompt": "Q: 1 + 1?", "completion": " 2", "ratings": {"helpfulness": 4, "correctness": 3}}] * 3
    rows.append({"prompt": "Q:" + " 1" * 100, "completion": " 2", "ratings": {"helpfulness": 1, "correctness": 1}})
    r = attributes.train(attributes.AttributeConfig(model=str(tiny_model), output_dir=str(tmp_path / "a"), max_steps=1,
                                                    batch_size=2, micro_batch_size=2, max_length=32, progress=False,
                                                    report=False, dtype="fp32", attributes=["helpfulness", "correctness"]),
                         rows=rows)
    assert r.steps == 1 and "1 of 4 rated rows are longer than max_length=32" in caplog.text


@pytest.mark.parametrize("command", ["reward", "attributes"])
def test_a_stopped_run_says_so(tiny_model, tmp_path, capsys, command):
    assert main([command, f"model={tiny_model}", f"output_dir={tmp_path / 'r'}", "max_steps=3", "stop_at_step=1",
                 "batch_size=2", "micro_batch_size=2", "progress=false", "report=false", "dtype=fp32",
                 "arith_pairs=8" if command == "reward" else "arith_rows=8"]) == 0
    out = capsys.readouterr().out
    assert "stopped after step 1" in out and "final" not in out
