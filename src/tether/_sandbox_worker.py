"""The sandbox worker (see tether.sandbox): PID 1 of fresh PID, network and mount namespaces, still
root there. It never runs the untrusted code itself: it prepares a private tmpfs, starts the
harness as an unprivileged uid under rlimits, times it, kills every process of the namespace, and
prints one JSON record on stdout. Standard library only; run with ``python -I -S``.
"""

import ctypes
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time

HARNESS = r'''
import json, os, sys


def main():
    # The result channel (pipe and nonce) lives in this function's locals only: no module attribute of
    # __main__ leads to it, so `import __main__` in the solution finds nothing to forge a result with.
    # Code that walks the interpreter's frames still can (tether.sandbox's threat model); the worker caps
    # what any record claims at the number of tests.
    with open("nonce") as f:
        nonce = f.read()
    os.remove("nonce")
    with open("job.json") as f:
        job = json.load(f)
    os.remove("job.json")
    out = os.fdopen(int(sys.argv[1]), "w")
    del sys.argv[1:]

    def report(**rec):
        for stream in (sys.stdout, sys.stderr):  # what the code printed, before the hard exit
            try:
                stream.flush()
            except Exception:
                pass
        out.write(json.dumps({**rec, "nonce": nonce}) + "\n")
        out.flush()
        os._exit(0)

    env = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "solution.py", "exec"), env)
    except MemoryError:
        report(status="oom", detail="MemoryError while loading the solution")
    except BaseException as e:
        report(status="failed", detail=f"{type(e).__name__} while loading the solution")
    passed = 0
    for i, test in enumerate(job["tests"]):
        try:
            exec(compile(test, f"test_{i}", "exec"), env)
            passed += 1
        except MemoryError:
            report(status="oom", passed=passed, detail=f"MemoryError in test {i}")
        except BaseException:
            pass
    report(status="passed" if passed == len(job["tests"]) else "failed", passed=passed)


main()
'''


def mount_tmpfs(path: str, size_mb: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, f"size={size_mb}m,mode=1777".encode()) != 0:
        raise OSError(ctypes.get_errno(), f"mount tmpfs on {path}")


def main() -> None:
    job = json.loads(sys.stdin.read())
    lim, uid, nonce = job["limits"], job["uid"], job["nonce"]
    cap = lim["output_bytes"]
    try:
        fs = max(64, 2 * lim["file_size_mb"] + 8)
        for path in ("/tmp", "/var/tmp", "/dev/shm"):
            if os.path.isdir(path):
                mount_tmpfs(path, fs)
        work = "/tmp/work"
        os.mkdir(work, 0o700)
        for name, text in (("nonce", nonce), ("job.json", json.dumps({"code": job["code"], "tests": job["tests"]})),
                           ("harness.py", HARNESS)):
            with open(f"{work}/{name}", "w") as f:
                f.write(text)
        for name in os.listdir(work) + ["."]:
            os.chown(f"{work}/{name}", uid, uid)
    except OSError as e:
        print(json.dumps({"status": "error", "detail": f"sandbox setup: {e}"}))
        return
    r, w = os.pipe()
    out_f, err_f = open(f"{work}/stdout", "wb"), open(f"{work}/stderr", "wb")

    def drop_privileges() -> None:
        os.setsid()
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        mb = 1 << 20
        cpu = int(lim["timeout_s"]) + 1
        for res, value in ((resource.RLIMIT_AS, lim["memory_mb"] * mb), (resource.RLIMIT_CPU, cpu),
                           (resource.RLIMIT_FSIZE, lim["file_size_mb"] * mb), (resource.RLIMIT_NOFILE, lim["open_files"]),
                           (resource.RLIMIT_NPROC, lim["processes"]), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(res, (value, value))

    t0 = time.monotonic()
    try:
        child = subprocess.Popen([job["python"], "-I", "-S", "harness.py", str(w)], cwd=work, env={},
                                 stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f, pass_fds=(w,),
                                 preexec_fn=drop_privileges)
    except OSError as e:
        print(json.dumps({"status": "error", "detail": f"could not start the harness: {e}"}))
        return
    os.close(w)
    status, data, timed_out = None, b"", False
    deadline = t0 + lim["timeout_s"]
    while True:  # read the record as it comes; stop at the deadline or when the harness exits
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([r], [], [], min(left, 0.05))
        if ready:
            chunk = os.read(r, 65536)
            data += chunk[: 65536 - len(data)]
            if not chunk or b"\n" in data:
                break
        if child.poll() is not None and not ready:
            break
    # kill everything the code left behind: every process of the namespace but this one
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
    rec = None
    for line in data.decode(errors="replace").splitlines():
        try:
            cand = json.loads(line)
        except ValueError:
            continue
        if isinstance(cand, dict) and cand.get("nonce") == nonce:
            rec = cand
            break
    if rec is not None:
        status = rec.get("status") if rec.get("status") in ("passed", "failed", "oom") else "failed"
    elif timed_out:
        status, rec = "timeout", {"detail": f"over {lim['timeout_s']} s"}
    else:
        sig = -child.returncode if child.returncode and child.returncode < 0 else 0
        status = "failed"
        rec = {"detail": f"no result (exit {child.returncode}{', signal ' + str(sig) if sig else ''})"}
    out_f.close()
    err_f.close()

    def head(name: str) -> str:
        with open(f"{work}/{name}", "rb") as f:
            return f.read(cap).decode(errors="replace")

    try:  # a record forged by the code could claim anything: never more tests than there are
        passed = min(max(int(rec.get("passed", 0)), 0), len(job["tests"])) if status != "timeout" else 0
    except (TypeError, ValueError):
        passed = 0
    if status == "passed" and passed < len(job["tests"]):
        status = "failed"
    print(json.dumps({"status": status, "passed": passed,
                      "detail": str(rec.get("detail", ""))[:500], "stdout": head("stdout"), "stderr": head("stderr")}))


if __name__ == "__main__":
    main()
