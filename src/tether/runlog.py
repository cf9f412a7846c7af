"""Run logging shared by every trainer: ``metrics.jsonl`` (one JSON object per step, appended and
flushed), a tqdm progress bar with loss, tokens/s and ETA, and optional TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a crash mid-write
            continue
    return out


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop records after ``last_step`` (written by a run that died after its last checkpoint),
    so a resumed run's log has each step exactly once."""
    p = Path(path)
    if not p.is_file():
        return
    keep = [r for r in read_metrics(p) if r.get("step", 0) <= last_step]
    p.write_text("".join(json.dumps(r) + "\n" for r in keep))


class RunLogger:
    """Appends metrics to ``<run>/metrics.jsonl`` and drives the progress bar."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, desc: str = "train",
                 progress: bool = True, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
                             file=sys.stderr, leave=True,
                             mininterval=0.1 if sys.stderr.isatty() else 10.0)  # logs, not animations
        self._tb = None
        if tensorboard:  # the config checked that the package is there (runs.RunConfig)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any], advance: bool = True) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}, "wall": round(time.time(), 4)}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            shown = {k: v for k, v in record.items() if k in ("loss", "tok_per_s", "eval_accuracy", "lr")}
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()},
                                  refresh=False)
            if advance:
                self._bar.update(1)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            log.info(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._f.close()


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
