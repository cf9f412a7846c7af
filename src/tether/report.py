"""Run reports: a markdown summary and a PNG of the curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# metric key -> panel title; panels appear for the keys a run logged
PANELS = {"loss": "training loss", "eval_accuracy": "held-out exact-match accuracy",
          "eval_pref_accuracy": "held-out preference accuracy (DPO)",
          "eval_pairwise_accuracy": "held-out pairwise accuracy (reward model)",
          "reward": "mean sampled reward (online RL)", "kl": "KL(π_θ || π_ref) per sequence",
          "entropy": "policy entropy per token", "completion_length": "completion length (tokens)"}
# drawn dashed in the panel of another key: the online trainers' last iterate beside their weight average
COMPANIONS = {"eval_accuracy": ("eval_accuracy_policy", "last iterate")}


def plot_curves(stages: dict[str, list[dict[str, Any]]], png: Path) -> Path:
    """One panel per metric in :data:`PANELS`; one line per stage (steps offset so stages follow
    each other on the x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in PANELS if any(k in r for recs in stages.values() for r in recs)] or ["loss"]
    cols = min(2, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(6 * cols, 3.8 * rows), squeeze=False)
    axes = grid.flatten()
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    offset = 0
    for i, (name, records) in enumerate(stages.items()):
        last = max((r.get("step", 0) for r in records), default=0)
        for ax, key in zip(axes, keys):
            pts = [(offset + r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=name, color=f"C{i}")
            other, what = COMPANIONS.get(key, (None, ""))
            pts = [(offset + r["step"], r[other]) for r in records if isinstance(r.get(other), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, ls="--", lw=1, label=f"{name} ({what})", color=f"C{i}")
        offset += last
    for ax, key in zip(axes, keys):
        ax.set_title(PANELS[key])
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no ticks at 1.2, 1.4…
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _cell(v: Any) -> str:
    """A value as one markdown table cell: no line breaks, pipes escaped."""
    return str(v).replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎")


def write_report(run_dir: Path, title: str, metrics: list[dict[str, Any]], summary: dict[str, Any],
                 stages: dict[str, list[dict[str, Any]]] | None = None,
                 samples: list[dict[str, Any]] | None = None) -> tuple[Path, Path]:
    """``report.md`` (a table of ``summary``, the plot, and a table of ``samples``: an online run's
    last logged completions) and ``report.png`` in ``run_dir``."""
    png = plot_curves(stages or {title: metrics}, run_dir / "report.png")
    lines = [f"# tether {title} report", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", f"![curves]({png.name})", ""]
    if samples:
        lines += [f"## Completions at step {samples[0]['step']}", "", "| prompt | completion | reward |", "|---|---|---|"]
        lines += [f"| {_cell(r['prompt'])} | {_cell(r['completion'])} | {_cell(r['reward'])} |" for r in samples]
        lines += [""]
    md = run_dir / "report.md"
    md.write_text("\n".join(lines))
    return md, png
