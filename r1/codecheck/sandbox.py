"""Run untrusted Python and report what happened: `Sandbox`, `run_python`, `RunResult`.

Every run starts a fresh process tree: a launcher (sets rlimits, drops to a per-run sandbox uid)
that `exec`s bubblewrap — or, at the weaker levels, the interpreter in a fresh host temp dir.
stdin is /dev/null unless data is given, stdout/stderr are read with a cap, and a wall-clock
deadline SIGKILLs the whole process group. Afterwards the run's processes are verified gone: under
bubblewrap its pid namespace dies with it; otherwise every process of the run's uid is killed.
The caller's process never runs untrusted code, so a hostile program cannot take it down (at the
``rlimits`` level, which runs as the caller's uid, it can signal the caller; see isolation.py).

`status` describes how the process ended, nothing more: a program that exits 0 is "ok" whether or
not it did its job. Whether tests passed comes from the harness channel (see validate.py), never
from the exit code. What the sandbox does not protect against is listed in isolation.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from r1.codecheck import isolation as iso
from r1.codecheck import launcher
from r1.codecheck.procio import Pumped, pump
from r1.config import CodeCheckConfig
from r1.telemetry import span

logger = logging.getLogger(__name__)
LAUNCHER_SOURCE = Path(launcher.__file__).read_text(encoding="utf-8")
# Runs the program as __main__ with `exit`/`quit` available (site is not imported) and no stray fds.
MAIN_PRELUDE = (
    "import builtins, os, sys\n"
    "os.closerange(3, 1 << 16)\n"
    "builtins.exit = builtins.quit = sys.exit\n"
    "sys.argv = ['main.py']\n"
    "sys.path.insert(0, os.getcwd())\n"
    "_source = open('main.py', encoding='utf-8').read()\n"
    "exec(compile(_source, 'main.py', 'exec'), {'__name__': '__main__', '__builtins__': builtins})\n"
)
# How long a finished run waits for its killed processes to be gone before giving its uid back.
REAP_TIMEOUT_S = 5.0
SIGNAL_NAMES = {int(s): s.name for s in signal.Signals}


@dataclass(frozen=True)
class RunResult:
    """How one sandboxed run ended. Untrusted output is data here, never an exception."""

    status: str  # "ok" | "error" | "timeout" | "memory" | "killed"
    returncode: int | None
    stdout: str
    stderr: str
    truncated: bool
    isolation: iso.Isolation
    duration_s: float = 0.0
    # Seconds from the run's first process until the sandbox was seen to start (bubblewrap's
    # namespaces created, or the interpreter exec'd; start_timeout_s bounds it); None if it never did.
    start_s: float | None = None
    signal: int | None = None
    reason: str = ""  # why the status is what it is, in words
    started: bool = True  # False: the sandbox itself failed to start (reason says why)
    channel: bytes = field(default=b"", repr=False)  # the harness result channel (validate only)
    channel_truncated: bool = field(default=False, repr=False)  # the channel passed procio.CHANNEL_CAP_BYTES

    def to_dict(self) -> dict:
        return {"status": self.status, "returncode": self.returncode, "stdout": self.stdout, "stderr": self.stderr,
                "truncated": self.truncated, "isolation": self.isolation.to_dict(), "duration_s": self.duration_s,
                "start_s": self.start_s, "signal": self.signal, "reason": self.reason, "started": self.started}


@dataclass(frozen=True)
class Plan:
    """The isolation level chosen for this host, decided once per Sandbox."""

    level: str
    interpreter: str
    switch_uid: bool
    bwrap: str | None
    kill: str | None
    notes: tuple[str, ...] = ()


class Sandbox:
    """Runs untrusted Python under the strongest isolation available; thread-safe."""

    def __init__(self, config: CodeCheckConfig | None = None) -> None:
        self.config = config or CodeCheckConfig()
        self._pool = iso.UidPool(self.config.sandbox_uid_base, self.config.sandbox_uid_count)
        self._plan: Plan | None = None
        self._plan_lock = threading.Lock()

    # -- public API ---------------------------------------------------------------------------

    def plan(self) -> Plan:
        """Probe once which level works here. ValueError if the configuration cannot be met."""
        with self._plan_lock:
            if self._plan is None:
                self._plan = self._probe()
            return self._plan

    def run_python(self, code: str, *, timeout_s: float | None = None, memory_mb: int | None = None,
                   stdin: str | bytes | None = None) -> RunResult:
        """Run `code` as a script in a fresh sandbox."""
        return self.run_program({"main.py": code}, ["-c", MAIN_PRELUDE], timeout_s=timeout_s,
                                memory_mb=memory_mb, stdin=stdin)

    def run_program(self, files: dict[str, str | bytes], python_args: list[str], *, timeout_s: float | None = None,
                    memory_mb: int | None = None, stdin: str | bytes | None = None,
                    channel_input: bytes | None = None) -> RunResult:
        """Run the interpreter with `python_args` in a fresh working directory holding `files`.

        With `channel_input`, a pipe pair is the harness channel: "{channel_in}" / "{channel_out}"
        in `python_args` are replaced by the sandbox-side fd numbers; what the program writes to
        the out end comes back as `RunResult.channel`.
        """
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        memory_mb = self.config.memory_mb if memory_mb is None else memory_mb
        if timeout_s <= 0 or memory_mb < 16:
            raise ValueError(f"timeout_s={timeout_s} and memory_mb={memory_mb} must be > 0 and >= 16")
        plan = self.plan()
        # Source text goes in as UTF-8; a lone surrogate is written as-is (surrogatepass), so the
        # interpreter refuses the file as Python would, instead of this call raising.
        files = {name: content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content
                 for name, content in files.items()}
        too_big = next((name for name, content in files.items() if len(content) > self.config.max_file_mb << 20), None)
        if too_big is not None:
            return RunResult("error", None, "", "", False, self._isolation(plan, -1, {}), started=False,
                             reason=f"{too_big} is {len(files[too_big]) / 2**20:.1f} MB, over the sandbox's file size "
                                    f"limit (max_file_mb={self.config.max_file_mb})")
        with span("sandbox.run", isolation=plan.level, timeout_s=timeout_s, memory_mb=memory_mb) as current:
            result = self._run(plan, files, python_args, timeout_s=timeout_s, memory_mb=memory_mb,
                               stdin=stdin.encode() if isinstance(stdin, str) else stdin, channel_input=channel_input)
            current.set_attribute("status", result.status)
            if result.start_s is not None:
                current.set_attribute("start_s", result.start_s)
            return result

    # -- planning -----------------------------------------------------------------------------

    def _probe(self) -> Plan:
        config = self.config
        is_root = os.geteuid() == 0
        notes: list[str] = []
        if is_root and not iso.uid_range_mapped(config.sandbox_uid_base, config.sandbox_uid_count):
            raise ValueError(
                f"sandbox uids {config.sandbox_uid_base}..+{config.sandbox_uid_count} are not mapped in this user "
                "namespace (/proc/self/uid_map); set codecheck.sandbox_uid_base to a mapped, unused range")
        probe_lease = self._pool.acquire(timeout_s=30.0) if is_root else None
        if is_root and probe_lease is None:
            raise RuntimeError("no free sandbox uid to probe with; every uid of the range is leased")
        try:
            probe_uid = probe_lease.uid if probe_lease else None
            interpreter = next((path for path in iso.interpreter_candidates(config.python_executable)
                                if iso.interpreter_runs_as(path, probe_uid)), None)
        finally:
            if probe_lease:
                probe_lease.release()
        if interpreter is None:
            who = f"sandbox uid {probe_uid}" if is_root else "this user"
            raise ValueError(
                f"no Python interpreter that {who} can run (tried {iso.interpreter_candidates(config.python_executable)}); "
                "set codecheck.python_executable to a world-readable interpreter such as /usr/bin/python3")
        kill = iso.find_kill()
        fallback = Plan("uid+rlimits" if is_root else "rlimits", interpreter, is_root, None, kill)
        if config.isolation == "rlimits":
            return replace(fallback, notes=("isolation='rlimits' was configured",))
        bwrap = iso.find_bwrap()
        if bwrap is None:
            reason = "bubblewrap (bwrap) is not installed"
        else:
            candidate = Plan("bwrap", interpreter, is_root, bwrap, kill)
            probe = self._run(candidate, {"main.py": b"print('sandbox-ok')"}, ["-c", MAIN_PRELUDE],
                              timeout_s=30.0, memory_mb=max(256, config.memory_mb), stdin=None, channel_input=None,
                              start_timeout_s=max(30.0, config.start_timeout_s))
            if probe.status == "ok" and probe.stdout.strip() == "sandbox-ok":
                return candidate
            reason = f"bubblewrap does not work here: {probe.reason or probe.stderr.strip()[-300:]}"
        if config.isolation == "bwrap":
            raise ValueError(f"isolation='bwrap' but {reason}; install bubblewrap or set codecheck.isolation='auto'")
        notes.append(reason)
        return replace(fallback, notes=tuple(notes))

    # -- one run ------------------------------------------------------------------------------

    def _rlimits(self, plan: Plan, timeout_s: float, memory_mb: int) -> tuple[dict[str, list[int]], dict[str, int]]:
        config = self.config
        cpu_s = math.ceil(timeout_s) + 1
        processes = config.max_processes
        if plan.level == "bwrap":
            processes += 2  # bubblewrap's own monitor and namespace init run as the sandbox uid too
        if not plan.switch_uid:
            # Without a uid of its own the run shares the caller's RLIMIT_NPROC count.
            processes += len(iso.processes_of_uid(os.getuid(), include_zombies=True))
        limits = {
            "RLIMIT_CPU": [cpu_s, cpu_s + 1],
            "RLIMIT_AS": [memory_mb << 20] * 2,
            "RLIMIT_FSIZE": [config.max_file_mb << 20] * 2,
            "RLIMIT_NOFILE": [config.max_open_files] * 2,
            "RLIMIT_NPROC": [processes] * 2,
            "RLIMIT_CORE": [0, 0],
        }
        report = {"cpu_s": cpu_s, "address_space_mb": memory_mb, "file_size_mb": config.max_file_mb,
                  "open_files": config.max_open_files, "processes": processes, "core_mb": 0}
        return limits, report

    def _isolation(self, plan: Plan, uid: int, report: dict[str, int]) -> iso.Isolation:
        bwrap = plan.level == "bwrap"
        return iso.Isolation(
            level=plan.level, namespaces=iso.BWRAP_NAMESPACES if bwrap else (), uid=uid,
            uid_switched=plan.switch_uid, rlimits=report, network=not bwrap, readonly_root=bwrap,
            private_tmp=bwrap, env_cleared=True, seccomp=False, interpreter=plan.interpreter, notes=plan.notes)

    def _run(self, plan: Plan, files: dict[str, bytes], python_args: list[str], *, timeout_s: float,
             memory_mb: int, stdin: bytes | None, channel_input: bytes | None,
             start_timeout_s: float | None = None) -> RunResult:
        # Waiting for a free uid and starting the sandbox share the start allowance; the program's
        # `timeout_s` counts from its start (see procio.pump).
        start_timeout_s = self.config.start_timeout_s if start_timeout_s is None else start_timeout_s
        start_deadline = time.monotonic() + start_timeout_s
        lease = None
        if plan.switch_uid:
            lease = self._pool.acquire(timeout_s=start_timeout_s)
            if lease is None:
                isolation = self._isolation(plan, -1, {})
                return RunResult("error", None, "", "", False, isolation, started=False,
                                 reason="no free sandbox uid: every uid of the range is in use; raise sandbox_uid_count")
        try:
            uid = lease.uid if lease else os.getuid()
            if plan.level == "bwrap":
                return self._run_in(plan, None, uid, files, python_args, timeout_s, memory_mb, stdin, channel_input,
                                    start_deadline, start_timeout_s)
            if plan.switch_uid:
                iso.sweep_uid(uid, plan.kill)  # no pid namespace: clear anything a crashed caller left
            with iso.host_workdir(uid if plan.switch_uid else None) as workdir:
                return self._run_in(plan, workdir, uid, files, python_args, timeout_s, memory_mb, stdin, channel_input,
                                    start_deadline, start_timeout_s)
        finally:
            if lease:
                lease.release()

    def _run_in(self, plan: Plan, workdir: str | None, uid: int, files: dict[str, bytes],
                python_args: list[str], timeout_s: float, memory_mb: int, stdin: bytes | None,
                channel_input: bytes | None, start_deadline: float, start_timeout_s: float) -> RunResult:
        rlimits, report = self._rlimits(plan, timeout_s, memory_mb)
        isolation = self._isolation(plan, uid, report)
        to_close: list[int] = []  # sandbox-side fds, closed in the parent once the child has them
        parent_fds: list[int] = []
        try:
            status_read, status_write = os.pipe()
            parent_fds.append(status_read)
            to_close.append(status_write)
            channel = {}
            if channel_input is not None:
                in_read, in_write = os.pipe()
                out_read, out_write = os.pipe()
                to_close += [in_read, out_write]
                parent_fds += [in_write, out_read]
                channel = {"in_write": in_write, "out_read": out_read}
                python_args = [arg.replace("{channel_in}", str(in_read)).replace("{channel_out}", str(out_write))
                               for arg in python_args]
            env = {"PATH": iso.MINIMAL_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
            command = [plan.interpreter, "-I", "-S", "-B", *python_args]
            if plan.level == "bwrap":
                file_fds = []
                for name, content in files.items():
                    fd = os.memfd_create(f"sandbox-{name}")
                    to_close.append(fd)
                    os.write(fd, content)
                    os.lseek(fd, 0, os.SEEK_SET)
                    file_fds.append((fd, name))
                env_inside = {**env, "HOME": iso.SANDBOX_DIR, "TMPDIR": "/tmp"}
                tmpfs_bytes = self.config.tmpfs_mb << 20
                argv = iso.bwrap_argv(plan.bwrap, plan.interpreter, files=file_fds, tmpfs_bytes=tmpfs_bytes,
                                      status_fd=status_write, env=env_inside) + command
                exec_env, cwd = {"PATH": iso.MINIMAL_PATH}, None
            else:
                assert workdir is not None
                for name, content in files.items():
                    Path(workdir, name).write_bytes(content)
                argv, exec_env, cwd = command, {**env, "HOME": workdir, "TMPDIR": workdir}, workdir
            launcher_args = launcher.encode(
                uid=uid if plan.switch_uid else None, gid=uid if plan.switch_uid else None, cwd=cwd,
                status_fd=status_write, status_cloexec=plan.level != "bwrap", rlimits=rlimits, env=exec_env, argv=argv)
            started_at = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", LAUNCHER_SOURCE, *launcher_args],
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, pass_fds=tuple(to_close), start_new_session=True,
                env={"PATH": iso.MINIMAL_PATH}, cwd="/")
            for fd in to_close:
                os.close(fd)
            to_close = []
            parent_fds = []  # pump closes them
            try:
                pumped = pump(proc, lambda: _kill_tree(proc, plan, uid), stdin=stdin, channel=channel,
                              status_read=status_read, channel_input=channel_input,
                              start_deadline=start_deadline, run_s=timeout_s,
                              start_marker=b'"child-pid"' if plan.level == "bwrap" else None,
                              output_cap=self.config.max_output_bytes)
            except BaseException:
                _kill_tree(proc, plan, uid)
                proc.wait()
                raise
            messages = _status_messages(bytes(pumped.outputs["status"]))
            namespace_init = next((m["child-pid"] for m in messages if isinstance(m.get("child-pid"), int)), None)
            if plan.level == "bwrap" and namespace_init is not None:
                reaped = iso.wait_until_gone(uid, namespace_init, REAP_TIMEOUT_S)
                if not reaped and plan.switch_uid:
                    iso.sweep_uid(uid, plan.kill)
                    reaped = iso.wait_until_gone(uid, None, REAP_TIMEOUT_S)
            elif plan.level != "bwrap" and plan.switch_uid:
                reaped = iso.wait_until_gone(uid, None, REAP_TIMEOUT_S)
            else:
                reaped = True
            if not reaped:
                logger.warning("processes of sandbox uid %s outlived the run by %ss", uid, REAP_TIMEOUT_S)
            duration = time.monotonic() - started_at
            start_s = None if pumped.started_at is None else round(pumped.started_at - started_at, 4)
            return _result(plan, pumped, proc, isolation, duration, timeout_s, messages, start_timeout_s, start_s)
        finally:
            for fd in to_close + parent_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _kill_tree(proc: subprocess.Popen, plan: Plan, uid: int) -> None:
    """SIGKILL the run's process group; without a pid namespace also every process of its uid.

    Under bubblewrap, killing the group kills bubblewrap, whose namespace init then dies
    (--die-with-parent) and takes every process of the namespace with it; `_run_in` verifies that
    and sweeps the uid only if it did not happen.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if plan.switch_uid and plan.level != "bwrap":
        iso.sweep_uid(uid, plan.kill)


def _status_messages(raw: bytes) -> list[dict]:
    """bubblewrap's JSON status lines, and the launcher's error line as {"launcher_error": ...}."""
    messages = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if line.startswith("launcher_error: "):
            messages.append({"launcher_error": line[len("launcher_error: "):]})
            continue
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            messages.append(item)
    return messages


def _result(plan: Plan, pumped: Pumped, proc: subprocess.Popen, isolation: iso.Isolation, duration_s: float,
            timeout_s: float, messages: list[dict], start_timeout_s: float, start_s: float | None) -> RunResult:
    stdout = pumped.outputs["stdout"].decode("utf-8", errors="replace")
    stderr = pumped.outputs["stderr"].decode("utf-8", errors="replace")
    truncated = bool(pumped.truncated & {"stdout", "stderr"})
    common = dict(stdout=stdout, stderr=stderr, truncated=truncated, isolation=isolation,
                  duration_s=round(duration_s, 4), start_s=start_s, channel=bytes(pumped.outputs["channel"]),
                  channel_truncated="channel" in pumped.truncated)
    launcher_error = next((m["launcher_error"] for m in messages if "launcher_error" in m), None)
    if launcher_error is not None:
        return RunResult("error", None, started=False, reason=f"sandbox failed to start: {launcher_error}", **common)
    if plan.level == "bwrap":
        if not any("child-pid" in m for m in messages):
            if pumped.timed_out:
                return RunResult("timeout", None, started=False, reason=_not_started(start_timeout_s), **common)
            return RunResult("error", None, started=False,
                             reason=f"sandbox failed to start: {stderr.strip()[-500:]}", **common)
        # Report the namespaces bubblewrap says it created, not the ones asked for (cgroup is
        # skipped silently where unsupported). The user namespace is implied: bubblewrap runs
        # unprivileged and cannot create the others without it.
        created = next(m for m in messages if "child-pid" in m)
        names = {"mnt": "mount"}
        namespaces = ("user",) + tuple(names.get(key[: -len("-namespace")], key[: -len("-namespace")])
                                       for key in created if key.endswith("-namespace"))
        common["isolation"] = replace(isolation, namespaces=namespaces)
        exit_code = next((m["exit-code"] for m in messages if "exit-code" in m), None)
        if exit_code is None and not pumped.timed_out:
            # bubblewrap started but failed while setting up (e.g. copying a file over the size
            # limit) and never ran the program: that is not a clean exit.
            return RunResult("error", None, started=False,
                             reason=f"sandbox failed before the program ran: {stderr.strip()[-500:] or 'no exit status'}",
                             **common)
        # bubblewrap reports a signal death as 128 + signal number (exit(128+n) looks the same).
        returncode = exit_code
        signum = exit_code - 128 if exit_code is not None and 128 < exit_code < 128 + 65 else None
    else:
        returncode = proc.returncode
        signum = -returncode if returncode is not None and returncode < 0 else None
    if pumped.timed_out and pumped.started_at is None:
        return RunResult("timeout", returncode, signal=signum, started=False, reason=_not_started(start_timeout_s),
                         **common)
    if pumped.timed_out:
        return RunResult("timeout", returncode, signal=signum,
                         reason=f"wall-clock limit of {timeout_s}s reached; process group killed", **common)
    if signum == signal.SIGXCPU:
        return RunResult("timeout", returncode, signal=signum, reason="CPU time limit (RLIMIT_CPU) reached", **common)
    if signum is not None:
        return RunResult("killed", returncode, signal=signum,
                         reason=f"killed by {SIGNAL_NAMES.get(signum, f'signal {signum}')}", **common)
    tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
    if returncode and tail and tail[0].startswith("MemoryError"):
        return RunResult("memory", returncode, reason="MemoryError: address-space limit reached", **common)
    if returncode:
        return RunResult("error", returncode, reason=f"exited with code {returncode}", **common)
    return RunResult("ok", returncode, reason="exited with code 0", **common)


def _not_started(start_timeout_s: float) -> str:
    return (f"sandbox did not start within {start_timeout_s}s (codecheck.start_timeout_s, which also covers "
            "waiting for a free sandbox uid), e.g. on a host too busy to start processes")


_DEFAULT_SANDBOXES: dict[str, Sandbox] = {}
_DEFAULT_LOCK = threading.Lock()


def default_sandbox(config: CodeCheckConfig | None = None) -> Sandbox:
    """One shared Sandbox per distinct config in this process (the probe runs once)."""
    config = config or CodeCheckConfig()
    key = config.model_dump_json()
    with _DEFAULT_LOCK:
        if key not in _DEFAULT_SANDBOXES:
            _DEFAULT_SANDBOXES[key] = Sandbox(config)
        return _DEFAULT_SANDBOXES[key]


def run_python(code: str, *, timeout_s: float | None = None, memory_mb: int | None = None,
               stdin: str | bytes | None = None, config: CodeCheckConfig | None = None) -> RunResult:
    """Run `code` in a fresh sandbox (the default one for `config`) and report how it ended."""
    return default_sandbox(config).run_python(code, timeout_s=timeout_s, memory_mb=memory_mb, stdin=stdin)
