import subprocess
import sys

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
