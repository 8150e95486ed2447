"""The launcher: the first process of every sandbox run, started as `python -I -S -c <this file>`.

It sets the resource limits, drops to the sandbox uid/gid (when one is given) and `exec`s the
sandbox (bubblewrap, or the interpreter directly at the rlimits level). It exists so that the
parent never runs Python code between `fork` and `exec`: a Ray worker has many threads, and
`subprocess`'s `preexec_fn` is unsafe there. Standard library only, Python 3.8+, and it imports
nothing slow (no json): it runs once per sandbox run.

It does not build the sandbox's argv or decide anything. Arguments, in order (see `encode`):
uid gid cwd status_fd status_cloexec num_rlimits (NAME soft hard)* num_env (KEY=VALUE)* -- argv...
("-" for no uid/gid/cwd). If anything before `exec` fails it writes "launcher_error: ..." to the
status fd and exits 127, so the parent can tell "the sandbox did not start" from "the program
failed".
"""

import os
import resource
import sys


def encode(*, uid, gid, cwd, status_fd, status_cloexec, rlimits, env, argv):
    """The launcher's arguments (used by the parent; kept here next to the parser)."""
    args = ["-" if uid is None else str(uid), "-" if gid is None else str(gid), cwd or "-", str(status_fd),
            "1" if status_cloexec else "0", str(len(rlimits))]
    for name, (soft, hard) in rlimits.items():
        args += [name, str(soft), str(hard)]
    args.append(str(len(env)))
    args += ["%s=%s" % item for item in env.items()]
    return args + ["--", *argv]


def main():
    args = sys.argv[1:]
    status_fd = int(args[3])
    try:
        uid, gid, cwd, cloexec = args[0], args[1], args[2], args[4] == "1"
        position = 6
        for _ in range(int(args[5])):
            name, soft, hard = args[position:position + 3]
            resource.setrlimit(getattr(resource, name), (int(soft), int(hard)))
            position += 3
        env = dict(item.split("=", 1) for item in args[position + 1:position + 1 + int(args[position])])
        position += 1 + int(args[position])
        if args[position] != "--":
            raise ValueError("malformed launcher arguments")
        argv = args[position + 1:]
        if uid != "-":
            os.setgroups([])
            os.setresgid(int(gid), int(gid), int(gid))
            os.setresuid(int(uid), int(uid), int(uid))
        os.umask(0o077)
        if cwd != "-":
            os.chdir(cwd)
        # At the rlimits level the status fd only says "exec failed"; closing it on exec keeps it
        # out of the program. bubblewrap needs it open (it writes the child's pid and exit code).
        os.set_inheritable(status_fd, not cloexec)
        os.execve(argv[0], argv, env)
    except BaseException as error:  # noqa: BLE001 - everything must reach the parent as data
        message = "launcher_error: %s: %s\n" % (type(error).__name__, str(error).replace("\n", " "))
        try:
            os.write(status_fd, message.encode("utf-8", "backslashreplace"))
        finally:
            os._exit(127)


if __name__ == "__main__":
    main()
