"""What the benchmarks against TRL share: the peer fixture, and running tether or TRL's harness in a
fresh process (so start-up time and peak RSS are those of a real run)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "peer"
TRL_PYTHON = Path("/tmp/peer-venv/bin/python")  # made by shared/peer/setup.sh

# A child process: run a tether command, then print what its metrics say (wall stamps and the
# requested keys of every training step) with the process's peak RSS.
CHILD = """
import json, resource, sys
t_spawn = float(sys.argv[1])
keys = sys.argv[3].split(",")
from tether.cli import main
rc = main(sys.argv[4:])
recs = [json.loads(l) for l in open(sys.argv[2] + "/metrics.jsonl") if '"loss"' in l]
print(json.dumps({"rc": rc, "spawn": t_spawn, "recs": [{k: r.get(k, 0.0) for k in ["wall", *keys]} for r in recs],
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peer_bench_args(doc: str, steps: int, extra: tuple[str, str, str]) -> tuple[argparse.Namespace, Path]:
    """The options every peer benchmark takes (``--fixture``, ``--repeats``, ``--steps`` and one list option
    ``extra`` = (flag, default, help)), the fixture built if missing, and a fresh work folder."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", type=Path, default=Path("/tmp/peer-fixture"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument(extra[0], default=extra[1], help=extra[2])
    args = ap.parse_args()
    ensure_fixture(args.fixture)
    return args, Path(tempfile.mkdtemp(prefix="tether-bench-"))


def ensure_fixture(fixture: Path) -> None:
    if not (fixture / "prompts.jsonl").is_file() or not (fixture / "prefs.jsonl").is_file():
        subprocess.run([sys.executable, str(PEER / "make_fixture.py"), str(fixture), "--force"], check=True,
                       capture_output=True)


def run_tether(out: Path, keys: list[str], args: list[str]) -> dict:
    """``tether ARGS`` (with output_dir=out) in a fresh process; its per-step records and peak RSS."""
    r = subprocess.run([sys.executable, "-c", CHILD, str(time.time()), str(out), ",".join(keys), *args],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_trl(kind: str, fixture: Path, steps: int, workdir: Path) -> dict | None:
    """TRL's harness (shared/peer/bench_trl.py) for one trainer and one repeat; None without its venv."""
    if not TRL_PYTHON.exists():
        return None
    out = workdir / f"trl-{kind}.json"
    r = subprocess.run([str(TRL_PYTHON), str(PEER / "bench_trl.py"), str(fixture), "--trainers", kind,
                        f"--{kind}-steps", str(steps), "--repeats", "1", "--threads", "2", "--out", str(out),
                        "--workdir", str(workdir / "trl")], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(out.read_text())["trainers"][kind]
