"""The code sandbox against the attacks of issue 6. Skipped where namespaces are unavailable."""

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from tether.sandbox import Limits, SandboxPool, available, run_code

pytestmark = pytest.mark.skipif(available() is not None, reason=f"sandbox unavailable: {available()}")
UIDS = range(Limits().base_uid, Limits().base_uid + 8)


def sandbox_processes() -> list[int]:
    """Host PIDs owned by a sandbox uid."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if p.stat().st_uid in UIDS:
                    out.append(int(p.name))
            except FileNotFoundError:
                pass
    return out


def host_process_count() -> int:
    return sum(1 for p in Path("/proc").iterdir() if p.name.isdigit())


def test_correct_and_wrong_solutions_are_scored_right():
    tests = ["assert add(2, 3) == 5", "assert add(4, 0) == 4"]
    assert run_code("def add(a, b):\n    return a + b\n", tests).status == "passed"
    wrong = run_code("def add(a, b):\n    return a - b\n", tests)
    assert wrong.status == "failed" and wrong.passed == 1 and wrong.score == 0.5
    assert run_code("def add(a, b) return a + b", tests).status == "failed"  # syntax error
    fact = ["assert fact(0) == 1", "assert fact(5) == 120"]
    assert run_code("def fact(n):\n    return 1 if n == 0 else n * fact(n - 1)\n", fact).status == "passed"
    assert run_code("def fact(n):\n    return n\n", fact).status == "failed"


def test_infinite_loop_times_out_and_leaves_nothing():
    t0 = time.monotonic()
    r = run_code("while True:\n    pass\n", ["assert True"], Limits(timeout_s=1.0))
    assert r.status == "timeout" and time.monotonic() - t0 < 2.0
    assert sandbox_processes() == []


def test_fork_bomb_and_setsid_daemon_leave_the_host_as_it_was():
    before = host_process_count()
    bomb = run_code("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                    ["assert True"], Limits(timeout_s=1.0))
    assert bomb.status in ("timeout", "failed")
    daemon = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
              "    os._exit(0)\n")
    r = run_code(daemon, ["assert True"], Limits(timeout_s=1.0))
    assert r.status == "passed"  # the solution "works"; its daemon must still be gone
    time.sleep(0.2)
    assert sandbox_processes() == []
    assert abs(host_process_count() - before) <= 2  # the test runner's own churn only


def test_memory_hog_is_out_of_memory_and_the_trainer_lives():
    r = run_code("x = bytearray(4 * 1024 ** 3)\n", ["assert True"], Limits(memory_mb=256))
    assert r.status == "oom"
    r = run_code("def f():\n    return [0] * (10 ** 9)\n", ["assert len(f()) > 0"], Limits(memory_mb=256))
    assert r.status == "oom"


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    seen = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                seen.append(conn)
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1], seen
    stop.set()
    t.join()
    srv.close()


def test_no_network_via_socket_shell_or_ctypes(listener):
    port, seen = listener
    attempts = f"""
import os, socket, ctypes, struct
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=0.5)
except OSError:
    pass
os.system("python3 -c 'import socket; socket.create_connection((\\"127.0.0.1\\", {port}), timeout=0.5)' 2>/dev/null")
libc = ctypes.CDLL(None)
fd = libc.socket(2, 1, 0)
addr = struct.pack("!HH4s8x", 2, {port}, socket.inet_aton("127.0.0.1"))
addr = struct.pack("=H", 2) + addr[2:]
libc.connect(fd, addr, len(addr))
"""
    r = run_code(attempts, ["assert True"], Limits(timeout_s=3.0))
    assert r.status in ("passed", "failed")
    time.sleep(0.3)
    assert seen == []
    # the same connection from the host does get through: the check can fail
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    time.sleep(0.3)
    assert len(seen) == 1


def test_cannot_write_outside_its_directory(tmp_path):
    targets = [tmp_path / "planted.txt", Path("/etc/tether-sandbox-test"), Path.cwd() / "tether-sandbox-test"]
    code = "import os\nfor p in %r:\n    try:\n        open(p, 'w').write('pwned')\n    except OSError:\n        pass\n" % (
        [str(t) for t in targets],)
    code += "open('inside.txt', 'w').write('fine')\n"
    r = run_code(code, ["assert open('inside.txt').read() == 'fine'"])
    assert r.status == "passed"
    assert not any(t.exists() for t in targets)


def test_cannot_read_the_trainers_secret(monkeypatch):
    monkeypatch.setenv("TETHER_TEST_SECRET", "s3cr3t-value")
    code = f"""
import os, glob
found = [k + '=' + v for k, v in os.environ.items()]
for path in glob.glob('/proc/*/environ') + ['/proc/{os.getpid()}/environ', '/proc/1/environ']:
    try:
        found.append(open(path, 'rb').read().decode(errors='replace'))
    except OSError:
        pass
print('|'.join(found))
"""
    r = run_code(code, ["assert True"])
    assert r.status == "passed"
    assert "s3cr3t-value" not in r.stdout and "TETHER_TEST_SECRET" not in r.stdout


def test_cannot_kill_the_trainer():
    me = os.getpid()
    code = f"""
import os, signal
for pid in (os.getppid(), {me}, 1):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
os.system("kill -9 -1")
"""
    r = run_code(code, ["assert True"])
    assert r.status in ("passed", "failed", "error")
    assert os.getpid() == me  # still here
    assert run_code("x = 1", ["assert x == 1"]).status == "passed"  # and the sandbox still works


def test_exit_before_the_tests_or_a_fake_pass_earns_nothing():
    tests = ["assert solve() == 42"]
    for code in ("import sys\nsys.exit(0)\n", "print('PASS')\nprint('{\"status\": \"passed\"}')\nimport os\nos._exit(0)\n",
                 "raise SystemExit(0)\n"):
        r = run_code(code, tests)
        assert r.status == "failed" and r.score == 0.0, (code, r)


def test_a_forged_record_earns_at_most_the_tests_there_are():
    """The solution runs in the harness's process. ``import __main__`` no longer reaches the result
    channel, and a record forged through the interpreter's frames (which in-process code can always
    walk) is capped at the number of tests: never a score above 1."""
    tests = ["assert solve() == 42", "assert solve() == 43"]
    r = run_code("import __main__\n__main__.report(status='passed', passed=100)\n", tests)
    assert r.status == "failed" and r.score == 0.0, r
    frames = ("import sys\nf = sys._getframe(1)\nwhile 'report' not in f.f_locals:\n    f = f.f_back\n"
              "f.f_locals['report'](status='passed', passed=100)\n")
    r = run_code(frames, tests)
    assert r.passed <= 2 and r.score <= 1.0, r


def test_what_the_code_prints_comes_back():
    r = run_code("print('hello')\ndef solve():\n    return 42\n", ["assert solve() == 42"])
    assert r.status == "passed" and r.stdout == "hello\n", r


def test_output_is_capped():
    code = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n"
    t0 = time.monotonic()
    r = run_code(code, ["assert True"], Limits(timeout_s=10.0, output_bytes=4096))
    assert len(r.stdout) <= 4096 and time.monotonic() - t0 < 10
    assert r.status in ("failed", "passed", "timeout")


def test_many_timeouts_leave_no_zombies_and_no_leaked_fds():
    fds = len(os.listdir("/proc/self/fd"))
    with SandboxPool(workers=2, limits=Limits(timeout_s=0.1)) as pool:
        results = pool.map([("while True:\n    pass\n", ["assert True"])] * 200)
    assert all(r.status == "timeout" for r in results)
    zombies = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] == "Z" and int(fields[1]) == os.getpid():
                zombies.append(p.name)
    assert zombies == []
    assert len(os.listdir("/proc/self/fd")) == fds
    assert sandbox_processes() == []


def test_code_reward_scores_fenced_solutions_and_counts_statuses():
    from tether.rewards import make_rewards

    tests = ["assert sq(3) == 9", "assert sq(0) == 0"]
    completions = ["Here:\n```python\ndef sq(x):\n    return x * x\n```", "```python\ndef sq(x):\n    return x + x\n```",
                   "def sq(x):\n    while True: pass"]
    r, m = make_rewards("code")(["p"] * 3, completions, [{"tests": tests}] * 3)
    assert r.tolist() == [1.0, 0.5, 0.0]
    # a prompt that opens the fence itself: the completion closes it (examples/grpo_code.yaml's prompts);
    # language tags other than python / py
    opened = ["def sq(x):\n    return x * x\n```\nDone.", "```python3\ndef sq(x):\n    return x * x\n```",
              "```Python\ndef sq(x):\n    return x * x\n```"]
    r, _ = make_rewards("code")(["```python\n"] * 3, opened, [{"tests": tests}] * 3)
    assert r.tolist() == [1.0, 1.0, 1.0]
    assert m["reward/code/passed"] == 1 and m["reward/code/failed"] == 1 and m["reward/code/timeout"] == 1


def test_grpo_with_the_code_reward_runs_end_to_end(embedded_model, tmp_path):
    """The whole path under load: rollouts of the embedded model → sandboxes → updates."""
    import json

    from tether import grpo
    from tether.arith import ArithSpec, code_rows
    from tether.runlog import read_metrics

    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in code_rows(ArithSpec(), 32, 0)))
    r = grpo.train(grpo.GRPOConfig(model=str(embedded_model), output_dir=str(tmp_path / "run"), data=str(data),
                                   reward="code", max_steps=2, prompts_per_step=4, num_generations=4,
                                   max_new_tokens=24, progress=False, report=False))
    recs = [m for m in read_metrics(r.run_dir / "metrics.jsonl") if "loss" in m]
    assert len(recs) == 2
    statuses = sum(v for k, v in recs[0].items() if k.startswith("reward/code/") and k.split("/")[-1] in
                   ("passed", "failed", "timeout", "oom"))
    assert statuses == 16  # every completion went through a sandbox and got a verdict
    assert recs[0]["reward/code/invalid"] == 0  # no infrastructure errors
