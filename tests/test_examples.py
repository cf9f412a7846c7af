"""Every example config loads into its command's config class (so the examples cannot rot)."""

from pathlib import Path

import pytest

from tether.cli import _commands

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_loads(path):
    command = path.stem.split("_")[0]
    cls = _commands()[command][0]
    cfg = cls.load(str(path), [])
    assert cfg.output_dir.startswith("runs/")
