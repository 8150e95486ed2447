"""The sandbox against hostile programs: each is contained, reported correctly, leaves no process
behind, and the caller can run the next program. Runs at the level this host gives (bubblewrap
where installed — `.ci/run` installs it) and again at the weaker uid+rlimits level.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from r1.codecheck import RunResult, Sandbox, run_python
from r1.codecheck.isolation import processes_of_uid
from r1.config import CodeCheckConfig

MAX_PROCESSES = 16
OUTPUT_CAP = 4096
TMPFS_MB = 8


@dataclass
class Context:
    """Host-side things hostile programs aim at."""

    token: str
    secret_env: str
    secret_file: Path
    escape_file: Path
    victim: subprocess.Popen
    server: socket.socket

    @property
    def port(self) -> int:
        return self.server.getsockname()[1]

    def fill(self, code: str) -> str:
        return (code.replace("SECRET_FILE", str(self.secret_file)).replace("ESCAPE_FILE", str(self.escape_file))
                .replace("VICTIM_PID", str(self.victim.pid)).replace("HOST_PID", str(os.getpid()))
                .replace("PORT", str(self.port)))


@pytest.fixture(scope="module")
def context():
    token = secrets.token_hex(8)
    old = os.environ.get("R1_SANDBOX_TEST_SECRET")
    os.environ["R1_SANDBOX_TEST_SECRET"] = f"env-{token}"
    secret_file = Path(f"/tmp/r1-sandbox-secret-{token}.txt")
    secret_file.write_text(f"file-{token}")
    secret_file.chmod(0o644)  # world-readable: only namespaces keep it out of reach
    victim = subprocess.Popen(["sleep", "300"])
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield Context(token, f"env-{token}", secret_file, Path(f"/tmp/r1-sandbox-escape-{token}"), victim, server)
    server.close()
    victim.kill()
    victim.wait()
    secret_file.unlink(missing_ok=True)
    Path(f"/tmp/r1-sandbox-escape-{token}").unlink(missing_ok=True)
    if old is None:
        os.environ.pop("R1_SANDBOX_TEST_SECRET", None)
    else:
        os.environ["R1_SANDBOX_TEST_SECRET"] = old


def _config(**overrides) -> CodeCheckConfig:
    return CodeCheckConfig(timeout_s=2.0, memory_mb=256, max_processes=MAX_PROCESSES, max_output_bytes=OUTPUT_CAP,
                           tmpfs_mb=TMPFS_MB, **overrides)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(_config())


@pytest.fixture(scope="module")
def weak_sandbox() -> Sandbox:
    return Sandbox(_config(isolation="rlimits"))


def _no_server_connection(server: socket.socket) -> bool:
    try:
        connection, _ = server.accept()
    except BlockingIOError:
        return True
    connection.close()
    return False


def check_network(result: RunResult, ctx: Context) -> None:
    if result.isolation.level == "bwrap":
        assert "host-loopback blocked" in result.stdout
        assert _no_server_connection(ctx.server)
    else:
        # Without a network namespace the report must say the network was reachable.
        assert result.isolation.network is True
        _no_server_connection(ctx.server)


def check_escape(result: RunResult, ctx: Context) -> None:
    assert "usr blocked" in result.stdout
    if result.isolation.private_tmp:
        assert not ctx.escape_file.exists()
    else:
        # A shared /tmp is reported as such, and indeed the write landed there.
        assert ctx.escape_file.exists()
        ctx.escape_file.unlink()


def check_secrets(result: RunResult, ctx: Context) -> None:
    seen = result.stdout + result.stderr
    assert ctx.secret_env not in seen
    if result.isolation.readonly_root:
        assert f"file-{ctx.token}" not in seen
    else:
        assert result.isolation.private_tmp is False


def check_victim(result: RunResult, ctx: Context) -> None:
    assert ctx.victim.poll() is None, "a host process was killed from inside the sandbox"
    assert "victim blocked" in result.stdout


def check_fill(result: RunResult, ctx: Context) -> None:
    written = {line.split()[0]: int(line.split()[1]) for line in result.stdout.splitlines()}
    if result.isolation.level == "bwrap":
        # The root and /dev are read-only; every writable tmpfs stops at its cap.
        assert written["/"] == 0 and written["/dev"] == 0
        assert all(written[path] <= TMPFS_MB for path in ("/dev/shm", "/tmp", "/sandbox"))
    else:
        assert result.isolation.private_tmp is False


def check_fork_cap(result: RunResult, ctx: Context) -> None:
    assert int(result.stdout.split()[-1]) < MAX_PROCESSES


def check_parent_done(result: RunResult, ctx: Context) -> None:
    assert "parent done" in result.stdout


def check_stdout_capped(result: RunResult, ctx: Context) -> None:
    assert result.truncated and len(result.stdout) <= OUTPUT_CAP


def check_stderr_capped(result: RunResult, ctx: Context) -> None:
    assert result.truncated and len(result.stderr) <= OUTPUT_CAP


def check_segv(result: RunResult, ctx: Context) -> None:
    assert result.signal == signal.SIGSEGV


def check_exit_zero(result: RunResult, ctx: Context) -> None:
    assert result.returncode == 0 and "All tests passed!" in result.stdout


def check_eof(result: RunResult, ctx: Context) -> None:
    assert "EOFError" in result.stderr


@dataclass(frozen=True)
class Hostile:
    name: str
    code: str
    statuses: tuple[str, ...]
    check: Callable[[RunResult, Context], None] | None = None

    @property
    def timeout_s(self) -> float:
        # Programs that must be stopped get a short limit; the rest a long one, so a loaded
        # machine cannot turn their expected ending into a timeout.
        return 2.0 if self.statuses == ("timeout",) else 20.0


HOSTILE = [
    # Spins forever: only the wall clock (or RLIMIT_CPU) ends it.
    Hostile("infinite_loop", "while True:\n    pass\n", ("timeout",)),
    # Uses no CPU, so RLIMIT_CPU never fires: the wall-clock kill must.
    Hostile("long_sleep", "import time\ntime.sleep(60)\n", ("timeout",)),
    # One huge allocation: RLIMIT_AS turns it into MemoryError.
    Hostile("memory_bomb", "x = bytearray(8 << 30)\n", ("memory",)),
    # Grows until the address-space limit: still a clean MemoryError, not a host OOM.
    Hostile("memory_growth", "blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))\n", ("memory",)),
    # Classic fork bomb: RLIMIT_NPROC on the run's own uid caps it; the group kill ends it.
    Hostile("fork_bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
            ("timeout",)),
    # Counts how far forking gets: proves the process cap, not just the timeout, held.
    Hostile("fork_count", "import os, time\ncount = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
            "    count += 1\nprint('forked', count)\n", ("ok",), check_fork_cap),
    # Daemonises a child that outlives the parent: it must be killed anyway.
    Hostile("lingering_child", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(60)\n    os._exit(0)\nprint('parent done')\n", ("ok",), check_parent_done),
    # Endless stdout: read with a cap, then the pipe is closed.
    Hostile("endless_stdout", "while True:\n    print('x' * 1000)\n", ("error", "timeout", "killed"), check_stdout_capped),
    # Endless stderr: same cap on the other stream.
    Hostile("endless_stderr", "import sys\nwhile True:\n    sys.stderr.write('y' * 1000)\n", ("error", "timeout", "killed"),
            check_stderr_capped),
    # Writes outside its directory: /usr is read-only, /tmp is private (or reported as shared).
    Hostile("write_outside", "try:\n    open('/usr/r1-escape', 'w').write('x')\nexcept OSError:\n"
            "    print('usr blocked')\ntry:\n    open('ESCAPE_FILE', 'w').write('x')\nexcept OSError:\n    pass\n",
            ("ok",), check_escape),
    # Fills every place it can write with 1 MB files: memory-backed tmpfs must all be capped.
    Hostile("fill_writable", "import os\nblock = b'x' * (1 << 20)\nfor place in ['/', '/dev', '/dev/shm', '/tmp', "
            "'/sandbox']:\n    written = 0\n    try:\n        while written < 64:\n"
            "            with open(os.path.join(place, f'fill{written}'), 'wb') as f:\n                f.write(block)\n"
            "            written += 1\n    except OSError:\n        pass\n    print(place, written)\n",
            ("ok",), check_fill),
    # Looks for secrets: the caller's environment, every /proc/*/environ, a world-readable file.
    Hostile("read_secrets", "import os\nprint(dict(os.environ))\nfor pid in os.listdir('/proc'):\n"
            "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n    except OSError:\n        pass\n"
            "try:\n    print(open('SECRET_FILE').read())\nexcept OSError:\n    print('file blocked')\n",
            ("ok",), check_secrets),
    # Phones home: to a server on the host's loopback and to the internet.
    Hostile("network", "import socket\ntry:\n    socket.create_connection(('127.0.0.1', PORT), timeout=1).send(b'leak')\n"
            "    print('host-loopback reached')\nexcept OSError:\n    print('host-loopback blocked')\ntry:\n"
            "    socket.create_connection(('1.1.1.1', 53), timeout=1)\nexcept OSError:\n    print('internet blocked')\n",
            ("ok",), check_network),
    # Tries to kill its parent, init, everything it can see, and a host process by pid.
    Hostile("kill_parent", "import os, signal\nfor target in (os.getppid(), 1, HOST_PID):\n    try:\n"
            "        os.kill(target, signal.SIGKILL)\n    except OSError:\n        pass\ntry:\n"
            "    os.kill(VICTIM_PID, signal.SIGKILL)\n    print('victim killed')\nexcept OSError:\n"
            "    print('victim blocked')\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n",
            ("ok",), check_victim),
    # Ignores every catchable signal: SIGKILL still ends it.
    Hostile("ignore_signals", "import signal, time\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, "
            "signal.SIGXCPU):\n    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.05)\n", ("timeout",)),
    # Crashes the interpreter: reported as killed by SIGSEGV.
    Hostile("segfault", "import ctypes\nctypes.string_at(0)\n", ("killed",), check_segv),
    # Claims success and exits 0 at once: run_python reports exactly that, nothing more.
    Hostile("fake_success", "import os\nprint('All tests passed!', flush=True)\nos._exit(0)\n", ("ok",), check_exit_zero),
    # Waits for input that never comes: stdin is /dev/null, so it ends at once with EOF.
    Hostile("read_stdin", "data = input()\n", ("error",), check_eof),
]


def _assert_contained(result: RunResult, runner: Sandbox) -> None:
    if result.isolation.uid_switched:
        assert processes_of_uid(result.isolation.uid) == [], "a process of the run survived it"
    else:
        assert result.isolation.level == "rlimits"
    # The caller is alive and the sandbox still works for the next program.
    follow_up = runner.run_python("print('next')", timeout_s=20)
    assert (follow_up.status, follow_up.stdout) == ("ok", "next\n")


@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
def test_hostile_program_is_contained(case: Hostile, sandbox: Sandbox, context: Context) -> None:
    result = sandbox.run_python(context.fill(case.code), timeout_s=case.timeout_s)
    assert result.started, result.reason
    assert result.status in case.statuses, (result.status, result.reason, result.stderr[-500:])
    if case.check:
        case.check(result, context)
    _assert_contained(result, sandbox)


# The weaker level must hold for everything that does not need namespaces.
WEAK_CASES = [case for case in HOSTILE
              if case.name in ("infinite_loop", "memory_bomb", "fork_bomb", "fork_count", "lingering_child",
                               "endless_stdout", "kill_parent", "segfault", "read_stdin", "network", "write_outside")]


@pytest.mark.parametrize("case", WEAK_CASES, ids=[case.name for case in WEAK_CASES])
def test_hostile_program_at_weaker_level(case: Hostile, weak_sandbox: Sandbox, context: Context) -> None:
    result = weak_sandbox.run_python(context.fill(case.code), timeout_s=case.timeout_s)
    assert result.isolation.level == ("uid+rlimits" if os.geteuid() == 0 else "rlimits")
    assert result.isolation.namespaces == () and result.isolation.private_tmp is False
    if case.name == "kill_parent" and not result.isolation.uid_switched:
        # Same uid as the caller: the report admits it, and the victim is fair game.
        return
    assert result.status in case.statuses, (result.status, result.reason, result.stderr[-500:])
    if case.check:
        case.check(result, context)
    _assert_contained(result, weak_sandbox)


def test_isolation_report_describes_bubblewrap(sandbox: Sandbox) -> None:
    result = sandbox.run_python("import os\nprint(os.getuid(), os.getcwd(), sorted(os.listdir('/')))")
    isolation = result.isolation
    if shutil.which("bwrap") and os.geteuid() == 0:
        # Installed and root (as `.ci/run` sets up): bubblewrap must actually be used.
        assert isolation.level == "bwrap", f"bubblewrap installed but not used: {isolation.notes}"
    if isolation.level == "bwrap":
        assert set(isolation.namespaces) == {"user", "pid", "net", "ipc", "uts", "mount", "cgroup"}
        assert isolation.readonly_root and isolation.private_tmp and not isolation.network
        assert result.stdout.split()[1] == "/sandbox"
        assert "work" not in result.stdout and "root" not in result.stdout.split("[", 1)[1]
    assert isolation.seccomp is False  # no syscall filter is installed; the report must not claim one
    assert isolation.rlimits["processes"] >= MAX_PROCESSES and isolation.rlimits["address_space_mb"] == 256
    assert isolation.uid_switched == (os.geteuid() == 0)
    if isolation.uid_switched:
        assert isolation.uid >= CodeCheckConfig().sandbox_uid_base


def test_concurrent_runs_get_distinct_uids(sandbox: Sandbox) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: sandbox.run_python("import time\ntime.sleep(0.5)\nprint('done')"),
                                range(3)))
    assert [r.status for r in results] == ["ok"] * 3
    if results[0].isolation.uid_switched:
        # Separate uids give each concurrent run its own RLIMIT_NPROC budget.
        assert len({r.isolation.uid for r in results}) == 3


@pytest.mark.parametrize("code, stdin, status, stdout", [
    # Data given as stdin reaches the program.
    ("import sys\nprint(sys.stdin.read().upper())", "hello", "ok", "HELLO\n"),
    # A non-zero exit is an error with its code.
    ("raise SystemExit(3)", None, "error", ""),
    # `exit()` works although `site` is not imported.
    ("print('bye')\nexit(0)", None, "ok", "bye\n"),
])
def test_run_python_basics(code: str, stdin: str | None, status: str, stdout: str) -> None:
    result = run_python(code, stdin=stdin, timeout_s=5, config=_config())
    assert (result.status, result.stdout) == (status, stdout)
    assert 0 < result.start_s < result.duration_s  # the start is reported apart from the whole run
    if status == "error":
        assert result.returncode == 3


def test_bad_limits_are_rejected(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        sandbox.run_python("pass", timeout_s=0)


def test_forced_bwrap_without_bwrap_names_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    from r1.codecheck import isolation

    monkeypatch.setattr(isolation, "find_bwrap", lambda: None)
    with pytest.raises(ValueError, match="isolation='bwrap'"):
        Sandbox(_config(isolation="bwrap")).plan()
    # "auto" falls back instead, and says why.
    plan = Sandbox(_config()).plan()
    assert plan.level in ("uid+rlimits", "rlimits") and "not installed" in plan.notes[0]


def test_output_past_the_cap_is_dropped_without_breaking_the_program(sandbox: Sandbox) -> None:
    result = sandbox.run_python("print('x' * 10**7, end='')\nprint('still running')\n")
    assert (result.status, result.truncated) == ("ok", True)  # its writes succeeded (no BrokenPipeError)
    assert len(result.stdout) <= sandbox.config.max_output_bytes


def test_a_lone_surrogate_in_code_is_the_programs_error_not_the_callers(sandbox: Sandbox) -> None:
    result = sandbox.run_python("x = '\ud800'\n")
    assert result.status == "error" and "utf-8" in result.stderr  # the file is not valid UTF-8, as Python says


def test_code_over_the_file_size_limit_never_reports_ok() -> None:
    small = Sandbox(_config(max_file_mb=1))
    result = small.run_python("# " + "a" * (2 << 20) + "\nprint(1)\n")
    assert (result.status, result.started) == ("error", False) and "max_file_mb" in result.reason


def _slow_launcher(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every run's first process sleeps before it starts the sandbox, as on a host too busy to start one."""
    from r1.codecheck import sandbox as sandbox_module

    monkeypatch.setattr(sandbox_module, "LAUNCHER_SOURCE",
                        f"import time; time.sleep({seconds})\n" + sandbox_module.LAUNCHER_SOURCE)


@pytest.mark.parametrize("level", ["bwrap", "rlimits"])
def test_a_slow_start_does_not_eat_the_programs_budget(level: str, sandbox: Sandbox, weak_sandbox: Sandbox,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = sandbox if level == "bwrap" else weak_sandbox
    chosen.plan()  # probed at full speed
    _slow_launcher(monkeypatch, 2.5)
    # 2.5 s to start, then 0.5 s of work: inside a 2 s budget only if the budget starts with the program.
    result = chosen.run_python("import time\ntime.sleep(0.5)\nprint('done')\n", timeout_s=2.0)
    assert (result.status, result.stdout) == ("ok", "done\n"), result.reason
    assert result.start_s >= 2.5 and result.duration_s > result.start_s  # the start really was slow, and is reported


def test_a_sandbox_that_does_not_start_in_its_allowance_fails_as_the_sandboxs_problem(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from r1.codecheck import validate

    slow = Sandbox(_config(start_timeout_s=0.5))
    slow.plan()
    _slow_launcher(monkeypatch, 30)
    result = slow.run_python("print('never')", timeout_s=30)
    assert (result.status, result.started, result.stdout, result.start_s) == ("timeout", False, "", None)
    assert "did not start within 0.5s (codecheck.start_timeout_s" in result.reason
    # A validation reports it as the sandbox's failure (so the repair loop does not blame the code).
    validation = validate("def f():\n    return 1\n", ["assert f() == 1"], sandbox=slow)
    assert (validation.status, validation.stage) == ("error", "sandbox"), validation.errors
