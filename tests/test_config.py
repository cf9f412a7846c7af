import pytest

from tether.config import ConfigError
from tether.sft import SFTConfig


def test_unknown_key_is_refused_with_its_name_and_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        SFTConfig.load(overrides=["learning_rate=1e-4"])
    msg = str(e.value)
    assert "learning_rate" in msg and "valid keys" in msg and "'lr'" in msg


def test_mistyped_value_names_the_key():
    with pytest.raises(ConfigError, match="max_steps"):
        SFTConfig.load(overrides=["max_steps=lots"])
    with pytest.raises(ConfigError, match="schedule"):
        SFTConfig.load(overrides=["schedule=linearish"])


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.0003\nmax_steps: 7\npacking: true\n")
    cfg = SFTConfig.load(f, ["max_steps=9"])
    assert cfg.lr == 3e-4 and cfg.max_steps == 9 and cfg.packing is True
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nwarmup: 3\n")
    with pytest.raises(ConfigError, match="'warmup'.*bad.yaml"):
        SFTConfig.load(bad)


def test_nested_arith_spec_is_validated():
    assert SFTConfig.load(overrides=["arith={max_operand: 9, ops: '+'}"]).arith.max_operand == 9
    with pytest.raises(ConfigError, match="maximum|max_operan"):
        SFTConfig.load(overrides=["arith={maximum: 9}"])


def test_batch_must_split_into_micro_batches():
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        SFTConfig.load(overrides=["batch_size=10", "micro_batch_size=4"])
