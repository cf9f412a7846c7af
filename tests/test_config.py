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


def test_a_nested_option_merges_key_by_key(tmp_path):
    """``arith.max_operand=30`` or ``arith='{ops: +}'`` changes one setting of the file's arith block and
    keeps the others; a plain dict option (reward) is replaced whole."""
    f = tmp_path / "g.yaml"
    f.write_text("arith: {max_operand: 20, ops: '+-'}\nreward: {exact_match: 1, format: 0.5}\n")
    from tether.grpo import GRPOConfig

    dotted = GRPOConfig.load(f, ["arith.max_operand=30"])
    assert dotted.arith.max_operand == 30 and dotted.arith.ops == "+-"
    flow = GRPOConfig.load(f, ["arith={ops: '+'}", "reward={exact_match: 1}"])
    assert flow.arith.max_operand == 20 and flow.arith.ops == "+" and flow.reward == {"exact_match": 1}
    assert GRPOConfig.load(overrides=["arith.ops=*"]).arith.ops == "*"
    with pytest.raises(ConfigError, match="nothing_like"):
        GRPOConfig.load(overrides=["arith.nothing_like=1"])
    with pytest.raises(ConfigError, match=r"'max_operan'.*did you mean 'max_operand'.*valid keys: max_operand, "):
        GRPOConfig.load(f, ["arith.max_operan=30"])


def test_tensorboard_without_its_package_is_refused_with_the_config(tmp_path):
    """Refused before a run folder exists: a folder left behind would refuse the corrected command."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    with pytest.raises(ConfigError, match="tensorboard=True: needs the 'tensorboard' package"):
        SFTConfig.load(overrides=["tensorboard=true", f"output_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()


def test_an_unknown_key_is_traced_to_where_it_was_written(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text("lr: 0.001\n")
    with pytest.raises(ConfigError, match="'lerning_rate' in the command line"):
        SFTConfig.load(f, ["lerning_rate=3"])
    with pytest.raises(ConfigError, match="--config FILE"):
        SFTConfig.load(overrides=["config=g.yaml"])


def test_batch_must_split_into_micro_batches():
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        SFTConfig.load(overrides=["batch_size=10", "micro_batch_size=4"])


def test_help_shows_defaults_as_they_would_be_typed():
    """Nested configs and containers show their real defaults (not a factory placeholder), in the
    YAML that ``key=value`` accepts, and container types keep their parameters."""
    from tether.grpo import GRPOConfig

    text = GRPOConfig.help_text()
    assert "  arith (ArithSpec, default {max_operand: 49, mul_max_operand: 12, ops: +-*, held_out_fraction: 0.1})" in text
    assert "  reward (str | dict[str, float], default exact_match)" in text
    assert "Undefined" not in text
    again = GRPOConfig.load(overrides=["arith={max_operand: 49, mul_max_operand: 12, ops: +-*, held_out_fraction: 0.1}"])
    assert again.arith == GRPOConfig().arith


def test_auto_dtype_is_resolved_and_recorded():
    from tether.modeling import default_dtype
    from tether.sft import SFTConfig

    cfg = SFTConfig()
    assert cfg.dtype == default_dtype() and f"dtype: {default_dtype()}" in cfg.to_yaml()
    assert SFTConfig(dtype="fp32").dtype == "fp32"
