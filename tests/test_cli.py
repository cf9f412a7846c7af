import json
import subprocess
import sys

import pytest

from tether.cli import main
from tether.sft import SFTConfig


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tether.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_explains_every_option():
    top = run_cli("--help")
    assert top.returncode == 0
    for cmd in ("quickstart", "sft", "build", "eval"):
        assert cmd in top.stdout
    from tether.attributes import AttributeConfig
    from tether.dpo import DPOConfig
    from tether.embedded import BuildConfig
    from tether.evaluate import EvalConfig
    from tether.quickstart import QuickstartConfig
    from tether.reward import RewardConfig

    for cmd, cls in [("sft", SFTConfig), ("quickstart", QuickstartConfig), ("build", BuildConfig), ("eval", EvalConfig),
                     ("dpo", DPOConfig), ("reward", RewardConfig), ("attributes", AttributeConfig)]:
        r = run_cli(cmd, "--help")
        assert r.returncode == 0
        for name, field in cls.model_fields.items():
            assert f"  {name} (" in r.stdout, (cmd, name)
            assert field.description, f"{cls.__name__}.{name} has no description"
            assert field.description[:40] in r.stdout, (cmd, name)


def test_unknown_key_exits_with_a_clear_error(capsys):
    assert main(["sft", "lerning_rate=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lerning_rate'" in err and "valid keys" in err


def test_options_may_be_spelt_as_flags(capsys):
    """``--key=value`` is taken as ``key=value``; any other stray flag is still an error."""
    assert main(["eval", "--eval_samples=3", "--max-new-tokens=4"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3
    with pytest.raises(SystemExit):
        main(["eval", "--eval_samples", "3"])


ONLINE = ["max_steps=2", "prompts_per_step=2", "num_generations=2", "max_new_tokens=4", "eval_samples=4"]
OFFLINE = ["max_steps=2", "batch_size=4", "micro_batch_size=2"]


@pytest.mark.parametrize("command,args", [
    ("sft", [*OFFLINE, "arith_rows=16", "eval_samples=4"]),
    ("reward", [*OFFLINE, "arith_pairs=8", "eval_pairs=8"]),
    ("attributes", [*OFFLINE, "arith_rows=16", "eval_rows=8"]),
    ("dpo", [*OFFLINE, "arith_pairs=8", "eval_pairs=8"]),
    ("grpo", ONLINE), ("ppo", [*ONLINE, "critic=separate"]), ("reinforce", ONLINE),
])
def test_every_trainer_takes_a_local_checkpoint_of_another_architecture(gpt2_model, tmp_path, command, args):
    """Any local transformers checkpoint, not only the embedded Qwen2: a GPT-2 (absolute positions, no
    fused path of tether's covers it) trains through every command and saves a loadable model."""
    from transformers import AutoConfig

    out = tmp_path / command
    assert main([command, f"model={gpt2_model}", f"output_dir={out}", "progress=false", "report=false", *args]) == 0
    final = out / "final"
    assert (final / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(final).model_type == "gpt2"
