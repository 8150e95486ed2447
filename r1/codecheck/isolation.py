"""What isolates untrusted code: the isolation report, the per-run sandbox uids, the bubblewrap argv.

Levels, strongest first (the level actually obtained is reported on every run, never assumed):

- ``bwrap``: bubblewrap as an unprivileged sandbox uid — new user, pid, net, ipc, uts, mount and
  cgroup namespaces; read-only /usr; private size-capped tmpfs for /tmp and the working directory
  /sandbox; a fresh /proc and minimal /dev; cleared environment; no capabilities; nested user
  namespaces disabled. Plus the rlimits below.
- ``uid+rlimits`` (root without bubblewrap): a per-run sandbox uid, rlimits, a fresh host temp dir
  owned by that uid, a cleared environment, its own session/process group.
- ``rlimits`` (not root, no bubblewrap): rlimits and a process group only; runs as the caller's uid.

Why a uid per run: RLIMIT_NPROC counts every process of a real uid on the host, and the kernel
exempts root. Running as a uid leased from ``[sandbox_uid_base, +sandbox_uid_count)`` (one flock'ed
file per uid, so leases hold across processes on the host) gives each run its own process budget,
lets concurrent runs not starve each other, and lets the parent kill every leftover of a run with
``kill(-1)`` as that uid. bubblewrap maps that uid into its user namespace; it must be switched to
before bubblewrap starts, because a root-started bubblewrap still counts processes against host root.

What this does NOT protect against: kernel exploits (there is no seccomp filter; ``seccomp`` is
always reported False), CPU and memory-bandwidth contention with the host, reading world-readable
files under /usr, timing side channels, and — at the weaker levels — network access, reading
world-readable host files, writing world-writable host directories such as /tmp, and (at
``rlimits``) signalling the caller's own processes or leaving daemonised children behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

BWRAP_NAMESPACES = ("user", "pid", "net", "ipc", "uts", "mount", "cgroup")
# The uid the program sees inside bubblewrap's user namespace (the host sees the sandbox uid).
INSIDE_UID = 1000
SANDBOX_DIR = "/sandbox"
MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Isolation:
    """What was actually applied to one run. `level` is the short name; the rest is the detail."""

    level: str  # "bwrap" | "uid+rlimits" | "rlimits"
    namespaces: tuple[str, ...]
    uid: int  # the host uid the program ran as
    uid_switched: bool
    rlimits: dict[str, int] = field(default_factory=dict)
    network: bool = True  # whether the program could reach a network (host loopback included)
    readonly_root: bool = False
    private_tmp: bool = False
    env_cleared: bool = True
    seccomp: bool = False
    interpreter: str = ""
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["namespaces"] = list(self.namespaces)
        data["notes"] = list(self.notes)
        return data


class UidLease:
    """One sandbox uid held for one run; `release()` gives it back."""

    def __init__(self, uid: int, lock_fd: int | None) -> None:
        self.uid = uid
        self._lock_fd = lock_fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None


class UidPool:
    """Leases uids from a range, one run per uid at a time, across all processes on this host."""

    def __init__(self, base: int, count: int, lock_dir: str | None = None) -> None:
        self.base = base
        self.count = count
        self.lock_dir = lock_dir or os.path.join(tempfile.gettempdir(), f"r1-codecheck-uids-{os.geteuid()}")
        # Separate processes start at different uids, so one rarely reuses another's just-freed uid.
        self._next = random.randrange(count)
        self._lock = threading.Lock()

    def _ensure_lock_dir(self) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.lock_dir, 0o700)
        info = os.lstat(self.lock_dir)
        if not os.path.isdir(self.lock_dir) or os.path.islink(self.lock_dir) or info.st_uid != os.geteuid():
            raise RuntimeError(f"uid lock directory {self.lock_dir} is not a directory owned by uid {os.geteuid()}")

    def acquire(self, timeout_s: float) -> UidLease | None:
        """A free uid, waiting up to `timeout_s`; None if every uid stayed busy."""
        self._ensure_lock_dir()
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                start = self._next
                self._next = (self._next + 1) % self.count
            # Round-robin from a moving start: a uid is reused as late as possible, so the zombie
            # of its previous run's namespace init has long been reaped by then.
            for offset in range(self.count):
                uid = self.base + (start + offset) % self.count
                fd = os.open(os.path.join(self.lock_dir, f"{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                return UidLease(uid, fd)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)


def uid_range_mapped(base: int, count: int) -> bool:
    """Whether every uid of the range exists in this process's user namespace."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as handle:
            rows = [tuple(int(part) for part in line.split()) for line in handle if line.strip()]
    except OSError:
        return False
    return any(inside <= base and base + count <= inside + length for inside, _outside, length in rows)


def processes_of_uid(uid: int, *, include_zombies: bool = False) -> list[int]:
    """Pids whose real uid is `uid` (host view)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as handle:
                status = handle.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 0").split()[0]) != uid:
            continue
        if not include_zombies and fields.get("State", "").strip().startswith("Z"):
            continue
        pids.append(int(entry))
    return pids


def _alive_as(pid: int, uid: int) -> bool:
    """Whether `pid` exists, runs as `uid` and is not a zombie."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            fields = dict(line.split(":", 1) for line in handle.read().splitlines() if ":" in line)
    except OSError:
        return False
    return int(fields.get("Uid", "-1").split()[0]) == uid and not fields.get("State", "").strip().startswith("Z")


def wait_until_gone(uid: int, namespace_init: int | None, timeout_s: float) -> bool:
    """Wait until the run's processes are dead; False if some outlived `timeout_s`.

    With a pid namespace, its init is enough to watch: a dying init only completes its exit once
    every other process of the namespace has been reaped. Without one, every process of the uid.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        if namespace_init is not None:
            alive = _alive_as(namespace_init, uid)
        else:
            alive = bool(processes_of_uid(uid))
        if not alive:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def sweep_uid(uid: int, kill_binary: str | None) -> None:
    """SIGKILL every process of `uid`: `kill(-1)` run as that uid reaches exactly its processes."""
    if kill_binary is not None:
        command = [kill_binary, "-9", "-1"]
    else:
        command = [sys.executable, "-I", "-S", "-c", "import os; os.kill(-1, 9)"]
    # user=/group= switch ids in C between fork and exec (safe with threads); the command fails
    # with "no such process" when nothing is left, which is the normal case.
    subprocess.run(command, user=uid, group=uid, extra_groups=[], env={}, cwd="/",
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def interpreter_candidates(configured: str | None) -> list[str]:
    if configured:
        return [configured]
    base = getattr(sys, "_base_executable", None) or sys.executable
    candidates = [os.path.realpath(base), "/usr/bin/python3", "/usr/local/bin/python3"]
    unique = []
    for path in candidates:
        if os.path.isfile(path) and os.path.realpath(path) not in [os.path.realpath(p) for p in unique]:
            unique.append(path)
    return unique


def interpreter_runs_as(interpreter: str, uid: int | None) -> bool:
    """Whether `interpreter` starts and finds its standard library when run as `uid`."""
    kwargs = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    try:
        done = subprocess.run([interpreter, "-I", "-S", "-c", "import json, ast, types"], env={}, cwd="/",
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False, **kwargs)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _system_mounts() -> list[str]:
    """Read-only /usr plus the top-level library/binary dirs (symlinks on merged-/usr systems)."""
    argv = ["--ro-bind", "/usr", "/usr"]
    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    for path in ("/etc/ld.so.cache", "/etc/localtime"):
        argv += ["--ro-bind-try", path, path]
    return argv


def interpreter_mounts(interpreter: str) -> list[str]:
    """Bind the interpreter's installation prefix when it lives outside /usr."""
    real = os.path.realpath(interpreter)
    prefix = os.path.dirname(os.path.dirname(real))
    if real.startswith("/usr/") or prefix in ("", "/"):
        return []
    return ["--ro-bind", prefix, prefix]


def bwrap_argv(bwrap: str, interpreter: str, *, files: list[tuple[int, str]], tmpfs_bytes: int, status_fd: int,
               env: dict[str, str]) -> list[str]:
    """The bubblewrap command line up to (and including) `--`; the interpreter argv follows."""
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--uid", str(INSIDE_UID), "--gid", str(INSIDE_UID), "--hostname", "sandbox"]
    argv += _system_mounts() + interpreter_mounts(interpreter)
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--size", str(tmpfs_bytes), "--tmpfs", "/dev/shm",
             "--size", str(tmpfs_bytes), "--tmpfs", "/tmp",
             "--size", str(tmpfs_bytes), "--tmpfs", SANDBOX_DIR]
    for fd, name in files:
        argv += ["--file", str(fd), f"{SANDBOX_DIR}/{name}"]
    # bubblewrap's own root and /dev are uncapped tmpfs: read-only, so the only writable places
    # are the three size-capped tmpfs above (memory a program could otherwise fill with files).
    argv += ["--remount-ro", "/dev", "--remount-ro", "/"]
    argv += ["--chdir", SANDBOX_DIR, "--clearenv"]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    argv += ["--json-status-fd", str(status_fd), "--"]
    return argv


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


def find_kill() -> str | None:
    for path in ("/usr/bin/kill", "/bin/kill"):
        if os.access(path, os.X_OK):
            return path
    return None


@contextlib.contextmanager
def host_workdir(uid: int | None) -> Iterator[str]:
    """A fresh host temp dir for the weaker levels, owned by the sandbox uid; removed afterwards."""
    path = tempfile.mkdtemp(prefix="r1-sandbox-")
    try:
        if uid is not None:
            os.chown(path, uid, uid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
