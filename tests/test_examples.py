"""Every example config loads into its command's config class, and every tether option the README's
table of TRL names cites exists, and every link between README.md and docs/ resolves (so the examples
and the docs cannot rot)."""

import re
from collections.abc import Iterator
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


def _anchors(markdown: str) -> Iterator[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def test_the_docs_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists and, after '#', one of
    its headings (the measurement record moved to docs/ and is cited from both sides)."""
    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    assert len(pages) > 1
    broken, checked = [], 0
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            checked += 1
            if not dest.exists() or anchor and (dest.suffix != ".md" or anchor not in set(_anchors(dest.read_text()))):
                broken.append(f"{page.name}: {target}")
    assert checked > 50 and not broken, broken
