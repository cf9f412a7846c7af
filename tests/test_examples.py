"""Every example config loads into its command's config class, and every tether option the README's
table of TRL names cites exists (so the examples and the docs cannot rot)."""

import re
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


def test_the_readmes_trl_names_are_grpo_options():
    """The options the README maps TRL's GRPOConfig names to (and the ones it says keep TRL's name)
    are GRPOConfig fields."""
    from tether.grpo import GRPOConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**From TRL's `GRPOConfig`.**"):]
    section = section[:section.index("\n\n", section.index("| TRL | tether |"))]
    same = section[:section.index("The others:")]
    rows = [line.split("|")[2] for line in section.splitlines() if line.startswith("| `")]
    names = set(re.findall(r"`([a-z][a-z_0-9]*)[`=*]", same)) | {n for r in rows for n in re.findall(r"`([a-z][a-z_0-9]*)[`=]", r)}
    names = {n.rstrip("_") for n in names} - {"sapo", "vespo", "none", "token_truncate", "token_mask",
                                                 "sequence_truncate", "sequence_mask", "constant", "cosine", "py"}
    fields = set(GRPOConfig.model_fields)
    assert len(names) > 40 and names <= fields, sorted(names - fields)
