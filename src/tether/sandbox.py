"""A sandbox for model-written code: run a solution against test cases, untrusted.

Each run gets a throw-away worker (util-linux ``unshare``) in new PID, network and mount namespaces:

* **processes**: the worker is PID 1 of its namespace with a fresh ``/proc``, so the code sees no
  other process (not the trainer, not its environment); when the worker ends, the kernel kills
  every process left in the namespace (daemons, fork bombs). The parent's timer kills the worker.
* **network**: a namespace with only a loopback interface, down: no connection goes anywhere.
* **files**: the code runs as an unprivileged uid (one per pool slot: root would ignore the process
  limit) in a temporary directory on a private tmpfs; ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are
  private tmpfs too, and everything else is the host's, read-only to that uid by permissions.
* **resources**: rlimits on address space, CPU time, file size, open files and processes; an empty
  environment; stdout/stderr go to size-capped files and only their first bytes come back.
* **results** travel over a pipe, never through an exit code: a record written by the harness after
  the tests ran, tagged with a per-run nonce. ``sys.exit(0)`` before the tests, ``os._exit``, or a
  printed "PASS" produce no record and score as failed.

Statuses are distinct: ``passed``, ``failed``, ``timeout``, ``oom``, and ``error`` for an
infrastructure failure, which a trainer must never score as a wrong answer.

Not protected against (see the README): kernel exploits; code that deliberately forges the result
record from inside the harness process (it would have to find the pipe and the nonce in the
harness's memory); reading world-readable host files (the code can read what any unprivileged user
can); CPU and memory contention with the trainer beyond the rlimits (no cgroups). It needs Linux,
``unshare`` (util-linux) and root (or CAP_SYS_ADMIN) for the namespaces and the uid switch.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "timeout", "oom", "error"]


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock, enforced by the worker and, as a backstop, by the parent
    memory_mb: int = 512  # address space of the code's process
    file_size_mb: int = 16  # largest file it may write (its captured output included)
    open_files: int = 64
    processes: int = 32  # per sandbox uid
    output_bytes: int = 16384  # stdout / stderr returned to the caller, each
    base_uid: int = 61000  # slot k runs as uid base_uid + k


@dataclass
class SandboxResult:
    status: Status
    passed: int = 0
    total: int = 0
    detail: str = ""
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

    @property
    def score(self) -> float:
        """The fraction of tests passed (0 unless the code ran to a result), never above 1."""
        return min(self.passed, self.total) / self.total if self.total else float(self.status == "passed")


def available() -> str | None:
    """None when the sandbox can run here, else why not."""
    if sys.platform != "linux":
        return "the sandbox needs Linux namespaces"
    if shutil.which("unshare") is None:
        return "util-linux 'unshare' is not installed (apt-get install util-linux)"
    if os.geteuid() != 0:
        return "the sandbox needs root (or CAP_SYS_ADMIN) to create namespaces and switch uid"
    return None


def run_code(code: str, tests: list[str], limits: Limits = Limits(), slot: int = 0) -> SandboxResult:
    """Run ``code`` then each test (Python statements, e.g. ``assert f(2) == 4``) in a fresh sandbox."""
    why = available()
    if why:
        return SandboxResult("error", total=len(tests), detail=why)
    t0 = time.monotonic()
    python = sandbox_python()
    if python is None:
        return SandboxResult("error", total=len(tests), detail="no Python interpreter an unprivileged user can run "
                             "(set TETHER_SANDBOX_PYTHON, or install python3 under /usr)")
    job = {"code": code, "tests": tests, "limits": asdict(limits), "uid": limits.base_uid + slot,
           "nonce": secrets.token_hex(16), "python": python}
    cmd = ["unshare", "--pid", "--fork", "--net", "--mount", "--mount-proc", "--kill-child",
           sys.executable, "-I", "-S", str(_WORKER)]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={"PATH": "/usr/bin:/bin"}, start_new_session=True)
    except OSError as e:
        return SandboxResult("error", total=len(tests), detail=f"could not start the sandbox: {e}")
    try:
        out, err = proc.communicate(json.dumps(job).encode(), timeout=limits.timeout_s + 5)
    except subprocess.TimeoutExpired:  # the worker did not stop its own timer: kill it, and its namespace
        _kill(proc)
        return SandboxResult("timeout", total=len(tests), detail="killed by the parent's timer",
                             seconds=time.monotonic() - t0)
    seconds = time.monotonic() - t0
    try:
        rec = json.loads(out.decode(errors="replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return SandboxResult("error", total=len(tests), detail=f"worker exit {proc.returncode}: "
                             f"{err.decode(errors='replace')[-500:]}", seconds=seconds)
    return SandboxResult(rec["status"], rec.get("passed", 0), len(tests), rec.get("detail", ""),
                         rec.get("stdout", ""), rec.get("stderr", ""), seconds)


def sandbox_python() -> str | None:
    """The interpreter the code runs in: $TETHER_SANDBOX_PYTHON, else the first of this process's
    own binary, ``python3`` on PATH and /usr/bin/python3 that any user may execute (a Python under
    /root is not). Only its standard library is offered, never this environment's packages."""
    env = os.environ.get("TETHER_SANDBOX_PYTHON")
    candidates = [env] if env else [sys.executable, shutil.which("python3"), "/usr/bin/python3"]
    for c in candidates:
        if c and _world_executable(os.path.realpath(c)):
            return os.path.realpath(c)
    return None


def _world_executable(path: str) -> bool:
    p = Path(path)
    try:
        if not (p.is_file() and p.stat().st_mode & 0o001):
            return False
        return all(d.stat().st_mode & 0o001 for d in p.parents)
    except OSError:
        return False


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait()


class SandboxPool:
    """Runs sandboxes in parallel, ``workers`` at a time, each slot with its own uid; at most
    ``max_queued`` jobs wait (``submit`` blocks beyond that: back-pressure, not unbounded memory)."""

    def __init__(self, workers: int = 2, limits: Limits = Limits(), max_queued: int = 64):
        self.limits = limits
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="sandbox")
        self._slots = list(range(workers))
        self._lock = threading.Lock()
        self._queue = threading.BoundedSemaphore(workers + max_queued)

    def submit(self, code: str, tests: list[str]) -> Future:
        self._queue.acquire()
        fut = self._pool.submit(self._run, code, tests)
        fut.add_done_callback(lambda _: self._queue.release())
        return fut

    def _run(self, code: str, tests: list[str]) -> SandboxResult:
        with self._lock:
            slot = self._slots.pop()
        try:
            return run_code(code, tests, self.limits, slot)
        finally:
            with self._lock:
                self._slots.append(slot)

    def map(self, jobs: list[tuple[str, list[str]]]) -> list[SandboxResult]:
        return [f.result() for f in [self.submit(c, t) for c, t in jobs]]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_WORKER = Path(__file__).with_name("_sandbox_worker.py")
__all__ = ["Limits", "SandboxPool", "SandboxResult", "available", "run_code"]
