"""`r1 submit`: run an r1 command as a Ray job on a running cluster and follow it.

    r1 submit --address http://127.0.0.1:8265 train grpo --config ray_configs/train_grpo.yaml

Wraps Ray's `JobSubmissionClient`: the working directory is uploaded as the job's runtime env
(`ray_configs/runtime_env.yaml`: what to exclude, env vars), the entrypoint is `r1 <the command>`,
the job's logs stream to stdout, and the exit status is the job's: 0 when it SUCCEEDED, 1 when it
FAILED or was STOPPED, 130 after Ctrl-C (which stops the job). `--no-follow` returns right after
submitting. Status lines go to stderr, prefixed `r1 submit:`. A job that failed before it started
because the cluster lost the uploaded working dir is submitted once more (see PACKAGE_LOST).

Token authentication (Ray >= 2.52; `ray start` turns it on by itself when ~/.ray/auth_token exists):
the token is sent when RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is set, when RAY_AUTH_MODE=token, or,
for a cluster on this machine (loopback address), when the default token file ~/.ray/auth_token
exists. The local default token is never sent to another host unasked.

It does not start clusters or install r1-cluster there: `r1` must already be on the PATH of the
cluster's head (its venv, or the image on Kubernetes); the uploaded directory only shadows the
installed Python packages.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
DEFAULT_RUNTIME_ENV = "ray_configs/runtime_env.yaml"
# A head that has just started answers "No available agent to submit job" until its dashboard
# agent is up; submissions are retried for this long.
AGENT_WAIT_S = 60.0
# After the log stream ends (or after a stop), how long to wait for the job to reach a final state.
FINAL_STATUS_WAIT_S = 60.0
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# How long to wait for a TCP connection to a host:port (GCS) address before saying it cannot be reached.
GCS_CONNECT_TIMEOUT_S = 5.0


def _say(message: str) -> None:
    print(f"r1 submit: {message}", file=sys.stderr, flush=True)


def build_entrypoint(command: list[str], working_dir: Path, excludes: list[str] | None = None) -> str:
    """`r1 <command>` after checking it parses as an r1 command and its --config is uploaded.

    `excludes` are the runtime env's; Ray's default excludes and the .gitignore/.rayignore files in
    the working dir apply as well, as they do when Ray packs the upload.
    """
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError("no command to submit; e.g. r1 submit train sft --config ray_configs/train_sft.yaml")
    if command[0] == "submit":
        raise ValueError("r1 submit cannot submit itself; give the command to run, e.g. r1 submit train sft ...")
    from cluster.cli import build_parser

    # Parse here so a typo fails now, with r1's usage message, not minutes later in the job.
    parsed = build_parser().parse_args(command)
    config = getattr(parsed, "config", None)
    if config and not Path(config).is_absolute():
        _check_uploaded_config(config, Path(os.path.abspath(working_dir)), excludes or [])
    return "r1 " + shlex.join(command)


def _check_uploaded_config(config: str, working_dir: Path, excludes: list[str]) -> None:
    """A relative --config must name a file that is uploaded: inside the working dir, not excluded."""
    hint = ("the job runs in the uploaded copy of the working dir; give a path inside it, or an absolute path that "
            "exists on the cluster")
    # Normalised without following symlinks: Ray uploads a symlink inside the working dir as the file it points to.
    path = Path(os.path.normpath(working_dir / config))
    if not path.is_relative_to(working_dir):
        raise ValueError(f"--config {config} is {path}, outside the working dir {working_dir}; {hint}")
    if not path.is_file():
        raise ValueError(f"--config {config} is not a file in the working dir {working_dir}; {hint}")
    excluded = _excluded_by_upload(path, working_dir, excludes)
    if excluded is not None:
        raise ValueError(
            f"--config {config} is not uploaded: {excluded.relative_to(working_dir)} matches the runtime env's "
            f"excludes, Ray's default excludes ({', '.join(_default_excludes())}) or a .gitignore/.rayignore; {hint}"
        )


def _default_excludes() -> list[str]:
    from ray._private import ray_constants

    return ray_constants.get_runtime_env_default_excludes()


def _upload_excludes(excludes: list[str]) -> list[str]:
    """What Ray's packaging leaves out of the working dir: its default excludes, then the runtime env's."""
    return _default_excludes() + list(excludes)


def _include_gitignore() -> bool:
    """Whether Ray's packaging honours .gitignore files (its RAY_RUNTIME_ENV_IGNORE_GITIGNORE)."""
    from ray._private import ray_constants

    return os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"


def snapshot_working_dir(runtime_env: dict[str, Any], into: Path) -> dict[str, Any]:
    """`runtime_env` with its working dir packed once into a zip under `into`, the zip as working_dir.

    Given a directory, Ray's client hashes it to name the package and then hashes it again to
    upload it: a file that changes in between (a log being written in the working dir) makes the
    job name a package that was never uploaded, and it fails before it starts ("Failed to download
    runtime_env file package"). A zip is named and uploaded by the hash of its bytes: one snapshot,
    one name. The zip is Ray's own package format (its `create_package`, with the same excludes,
    .gitignore and .rayignore files), so the job sees the same files.
    """
    from ray._private.runtime_env.packaging import create_package

    package = into / "working_dir.zip"
    create_package(str(runtime_env["working_dir"]), package, include_gitignore=_include_gitignore(),
                   include_parent_dir=False, excludes=_upload_excludes(runtime_env.get("excludes") or []),
                   logger=logging.getLogger(__name__))
    return {**runtime_env, "working_dir": str(package)}


def _excluded_by_upload(path: Path, working_dir: Path, excludes: list[str]) -> Path | None:
    """The first of `path` and its parents below `working_dir` that Ray's packaging skips, or None.

    Walks down from `working_dir` the way Ray's `_dir_travel` does, with the matchers Ray builds.
    """
    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    include_gitignore = _include_gitignore()
    quiet = logging.getLogger(__name__)  # not Ray's logger, which says at INFO which ignore files it read

    def ignore_files(directory: Path) -> list[Any]:
        return get_excludes_from_ignore_files(directory, include_gitignore=include_gitignore, logger=quiet)

    matchers = [_get_excludes(working_dir, _upload_excludes(excludes)), *ignore_files(working_dir)]
    current = working_dir
    for part in path.relative_to(working_dir).parts:
        current = current / part
        matchers += ignore_files(current)
        if any(matches(current) for matches in matchers):
            return current
    return None


def load_runtime_env(path: Path, working_dir: Path) -> dict[str, Any]:
    """The runtime env file with `working_dir` set to the directory to upload."""
    if not working_dir.exists():
        raise ValueError(f"--working-dir {working_dir} does not exist")
    if not working_dir.is_dir():
        raise ValueError(f"--working-dir {working_dir} is not a directory")
    if not path.is_file():
        raise ValueError(f"runtime env file {path} not found; pass --runtime-env with the project's "
                         f"{DEFAULT_RUNTIME_ENV} (or your own)")
    try:
        runtime_env = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"runtime env file {path} is not valid YAML: {error}") from None
    if not isinstance(runtime_env, dict):
        raise ValueError(f"runtime env file {path} must hold a mapping (working_dir, excludes, env_vars, ...)")
    runtime_env["working_dir"] = str(working_dir)
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**runtime_env)  # Ray's own validation, before anything is uploaded
    except (TypeError, ValueError) as error:
        raise ValueError(f"runtime env file {path} is not a valid Ray runtime env: {error}") from None
    return runtime_env


def _read_token(path: Path) -> str:
    try:
        token = path.expanduser().read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ValueError(f"cannot read the Ray auth token file {path}: {error}") from None
    if not token:
        raise ValueError(f"the Ray auth token file {path} is empty")
    return token


def auth_headers(dashboard_url: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The Authorization header for a token-authenticated cluster, or {} (see the module docstring).

    Precedence is Ray's: RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token.
    """
    env = os.environ if environ is None else environ
    mode = env.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return {}
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN'].strip()}"}
    if env.get("RAY_AUTH_TOKEN_PATH"):
        return {"Authorization": f"Bearer {_read_token(Path(env['RAY_AUTH_TOKEN_PATH']))}"}
    default = Path(env.get("HOME", "~")).expanduser() / ".ray" / "auth_token"
    if mode == "token":
        if not default.is_file():
            raise ValueError("RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, "
                             "or put the cluster's token in ~/.ray/auth_token")
        return {"Authorization": f"Bearer {_read_token(default)}"}
    if urlparse(dashboard_url).hostname in LOOPBACK_HOSTS and default.is_file():
        return {"Authorization": f"Bearer {_read_token(default)}"}
    return {}


def dashboard_address(address: str | None) -> str:
    """`--address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else the local default dashboard."""
    chosen = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    if "://" in chosen:
        return chosen
    # A GCS address such as 127.0.0.1:6379 (what `ray start` prints), or "auto": Ray asks the GCS for the
    # dashboard's address. Ray waits ~40 s for a GCS that is not there; a plain TCP connect tells in seconds.
    host, _, port = chosen.rpartition(":")
    if port.isdigit():
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=GCS_CONNECT_TIMEOUT_S).close()
        except OSError as error:
            raise ValueError(_unreachable(chosen, error)) from None
    from ray.dashboard.utils import ray_address_to_api_server_url
    from ray.exceptions import RpcError

    try:
        return ray_address_to_api_server_url(chosen)
    except (RpcError, ConnectionError, ValueError) as error:
        raise ValueError(_unreachable(chosen, error)) from None


def _unreachable(address: str, error: BaseException) -> str:
    reason = getattr(error, "message", None) or str(error) or type(error).__name__
    return (f"cannot reach the Ray cluster at {address} ({reason}); check that it is up (`ray start --head` starts "
            "one), or pass its dashboard's URL instead, e.g. --address http://<head>:8265")


def connect(address: str) -> Any:
    """A JobSubmissionClient for `address`; a wrong address or token is a ValueError saying so."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers(address))
    except AuthenticationError as error:
        raise ValueError(f"the Ray cluster at {address} refused the auth token: {error}") from None
    except ConnectionError as error:
        raise ValueError(f"cannot reach a Ray dashboard at {address} ({error}); start a cluster with "
                         "`ray start --head` or pass --address / set RAY_ADDRESS") from None


def _submit(client: Any, **kwargs: Any) -> str:
    deadline = time.monotonic() + AGENT_WAIT_S
    waited = False
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            if not waited:
                _say(f"the cluster's job agent is still starting; retrying for up to {AGENT_WAIT_S:.0f} s")
                waited = True
            time.sleep(1.0)


async def _stream_logs(client: Any, job_id: str, streamed: list[int]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        streamed[0] += len(chunk)


def wait_final_status(client: Any, job_id: str, timeout_s: float) -> Any:
    """The job's status once it is final (SUCCEEDED, FAILED, STOPPED), or the last one seen."""
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    return status


# A failed job's message shown in full when the job wrote no logs, up to this many lines.
MESSAGE_MAX_LINES = 40
# Ray's error when the node could not download the uploaded working dir from the GCS: the package
# was deleted between its upload and the job's start (Ray's message says it may happen; the other
# cause, a working dir that changed while Ray's client hashed it twice, `snapshot_working_dir`
# rules out). The job never ran, so submitting it again (which uploads the package again) is safe;
# done once.
PACKAGE_LOST = "Failed to download runtime_env file package"
# `follow`'s result for such a job when a resubmission is allowed.
RESUBMIT = -1


def _outcome(client: Any, job_id: str, status: Any, logs_streamed: bool, may_resubmit: bool = False) -> int:
    info = client.get_job_info(job_id)
    lines = (info.message or "").strip().splitlines()
    if may_resubmit and status.value == "FAILED" and not logs_streamed and PACKAGE_LOST in (info.message or ""):
        _say(f"job {job_id} FAILED before it started: the cluster lost the uploaded working dir "
             f"({next(line for line in lines if PACKAGE_LOST in line)[:200]}); submitting it once more")
        return RESUBMIT
    if status.value == "SUCCEEDED" or not lines:
        detail = ""
    elif logs_streamed:
        # The message of a failed job repeats the last logs, already streamed above: keep its first line.
        detail = f": {lines[0]}"
    else:
        # No logs (the job never started, e.g. its runtime env could not be set up): the message is
        # the only place that says why, so it is shown whole (the end of it, if long).
        shown = lines if len(lines) <= MESSAGE_MAX_LINES else ["...", *lines[-MESSAGE_MAX_LINES:]]
        detail = ": " + "\n".join(shown)
    _say(f"job {job_id} {status.value}{detail}")
    return 0 if status.value == "SUCCEEDED" else 1


def follow(client: Any, job_id: str, may_resubmit: bool = False) -> int:
    """Stream the job's logs until it ends; the exit status is the job's. Ctrl-C stops the job.

    With `may_resubmit`, a job that failed because its uploaded working dir was lost before it
    started returns RESUBMIT instead (see PACKAGE_LOST).
    """
    streamed = [0]
    try:
        try:
            asyncio.run(_stream_logs(client, job_id, streamed))
        except RuntimeError as error:  # the log stream broke; the job itself may still be fine
            _say(f"log stream ended early ({error}); waiting for the job to finish")
        status = wait_final_status(client, job_id, timeout_s=float("inf"))
    except KeyboardInterrupt:
        _say(f"Ctrl-C: stopping job {job_id}")
        client.stop_job(job_id)
        status = wait_final_status(client, job_id, timeout_s=FINAL_STATUS_WAIT_S)
        _say(f"job {job_id} {status.value}")
        return 130
    return _outcome(client, job_id, status, logs_streamed=streamed[0] > 0, may_resubmit=may_resubmit)


def run_submit(args: argparse.Namespace) -> int:
    working_dir = Path(args.working_dir).expanduser().resolve()
    runtime_env_path = Path(args.runtime_env) if args.runtime_env else working_dir / DEFAULT_RUNTIME_ENV
    runtime_env = load_runtime_env(runtime_env_path, working_dir)
    entrypoint = build_entrypoint(list(args.command), working_dir, runtime_env.get("excludes") or [])
    address = dashboard_address(args.address)

    # Ray lets RAY_ADDRESS override an explicit address; the one resolved above is the one used.
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    os.environ["RAY_ADDRESS"] = address
    client = connect(address)
    # A second submission needs an id of its own, so one given with --submission-id is never resubmitted.
    may_resubmit = not args.submission_id
    while True:
        with tempfile.TemporaryDirectory(prefix="r1-submit-") as scratch:
            job_id = _submit(client, entrypoint=entrypoint, runtime_env=snapshot_working_dir(runtime_env, Path(scratch)),
                             submission_id=args.submission_id, metadata={"submitted_by": "r1 submit"})
        _say(f"submitted {job_id} to {address}: {entrypoint}")
        if args.no_follow:
            _say(f"follow it with: ray job logs --follow --address {address} {job_id}")
            return 0
        code = follow(client, job_id, may_resubmit=may_resubmit)
        if code != RESUBMIT:
            return code
        may_resubmit = False


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="run an r1 command as a Ray job on a running cluster",
        description="Submit `r1 <command>` as a Ray job: upload the working dir (runtime env from "
        f"{DEFAULT_RUNTIME_ENV}), follow the logs, exit 0 if the job SUCCEEDED and 1 otherwise. Ctrl-C stops "
        "the job. A job that fails before it starts because the cluster lost the uploaded working dir is "
        "submitted once more. Example: r1 submit --address http://127.0.0.1:8265 train grpo --config "
        "ray_configs/train_grpo.yaml",
    )
    parser.add_argument("--address", help="Ray dashboard URL, or the cluster's GCS host:port that `ray start` prints "
                        f"(default: RAY_ADDRESS, else {DEFAULT_DASHBOARD})")
    parser.add_argument("--working-dir", default=".", help="directory to upload as the job's working dir (default .)")
    parser.add_argument("--runtime-env", help=f"runtime env YAML (default: <working-dir>/{DEFAULT_RUNTIME_ENV})")
    parser.add_argument("--submission-id", help="job id to use (default: generated by Ray)")
    parser.add_argument("--no-follow", action="store_true", help="return after submitting instead of following logs")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                        help="the r1 command to run, e.g. train sft --config ray_configs/train_sft.yaml")
    parser.set_defaults(func=run_submit)
