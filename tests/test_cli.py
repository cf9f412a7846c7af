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
    sft = run_cli("sft", "--help")
    assert sft.returncode == 0
    for name, field in SFTConfig.model_fields.items():
        assert f"  {name} (" in sft.stdout, name
        if field.description:
            assert field.description[:40] in sft.stdout.replace("\n      ", " ")


def test_unknown_key_exits_with_a_clear_error(capsys):
    assert main(["sft", "lerning_rate=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lerning_rate'" in err and "valid keys" in err
