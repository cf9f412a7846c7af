"""Crash-safe checkpoints and exact resume.

A checkpoint is a folder ``<run>/checkpoints/step-00000006/`` holding the HF model (safetensors),
the tokenizer, ``trainer_state.pt`` (optimizer, scheduler, every RNG, data position, step) and,
written last, ``COMPLETE.json``: the sha256 of every other file. The folder is written under a
temporary name beside its final place, every file fsynced, then renamed; older checkpoints are
deleted only after that. A folder without a valid marker is never used: :func:`latest_checkpoint`
falls back to the previous complete one and says so. State loads with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import lora

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
STATE = "trainer_state.pt"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and what was kept."""


# ---------------------------------------------------------------------------------------------
# RNG state (Python, NumPy, torch, CUDA) as tensors, so that weights_only loading accepts it
# ---------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep the ``keep`` newest complete ones.

    Raises :class:`CheckpointError` (naming the checkpoint kept) if anything fails; the
    temporary folder is removed and the previous checkpoints are untouched.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if lora.has_adapters(model):  # the adapter alone: the base model is the run's start
            lora.save_adapter(model, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for p in files:
            _fsync(p)
        manifest = {"step": step, "files": {str(p.relative_to(tmp)): _sha256(p) for p in files}}
        with open(tmp / MARKER, "w") as f:  # the completion marker, written last
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        if final.exists():  # re-saving a step (after a resume): move the old one aside first
            trash = root / f".trash-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(root)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = [p.name for p in list_checkpoints(run_dir) if p != final]
        kept_msg = f"the previous checkpoint {kept[-1]} is kept" if kept else "there is no previous checkpoint"
        raise CheckpointError(f"saving checkpoint step {step} to {final} failed: {e}; {kept_msg}") from e
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    complete = [p for p in list_checkpoints(root.parent) if (p / MARKER).is_file()]
    for old in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):  # left by a process killed mid-save
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of ``run_dir`` (complete or not), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=lambda p: p.name)


def verify_checkpoint(ckpt: Path) -> None:
    """Raise :class:`CheckpointError` unless the marker exists and every file matches its hash."""
    marker = ckpt / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{ckpt.name}: incomplete (no {MARKER})")
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt.name}: unreadable {MARKER}: {e}") from None
    if STATE not in files:
        raise CheckpointError(f"{ckpt.name}: {STATE} missing from the manifest")
    for rel, digest in files.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"{ckpt.name}: {rel} is missing")
        if _sha256(p) != digest:
            raise CheckpointError(f"{ckpt.name}: {rel} is corrupt (sha256 mismatch)")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies; a newer broken one is reported and skipped."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s; falling back to an older one", e)
    return None


def load_state(ckpt: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{ckpt.name}: cannot load {STATE}: {e}") from e
