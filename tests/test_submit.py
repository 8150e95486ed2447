"""`r1 submit` and plain `ray job submit` against a real `ray start --head` with token auth.

The cluster is a real head node started with `ray start --head --block` on free ports and its own
temp dir, with RAY_AUTH_MODE=token and a random token (what a Ray >= 2.59 cluster enforces). It
is stopped by signalling the processes this module started, never with `ray stop` (which would take
down every Ray instance on the machine). The head runs with this venv's bin first on PATH, like a
head started from an activated venv, so the jobs find `r1`.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

from cluster.cli import main as r1_main
from cluster.submit import auth_headers, build_entrypoint, load_runtime_env
from tests.serve_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUNTIME_ENV = ROOT / "ray_configs" / "runtime_env.yaml"
TINY_SFT = "ray_configs/train_tiny_sft.yaml"


# -- the entrypoint ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command, entrypoint", [
    # The documented form: everything after the submit options is the r1 command.
    (["train", "sft", "--config", TINY_SFT], f"r1 train sft --config {TINY_SFT}"),
    # A leading "--" only separates submit's options from the command; it is not passed on.
    (["--", "eval", "--num-problems", "2"], "r1 eval --num-problems 2"),
    # Values with spaces and braces survive the shell that runs the entrypoint.
    (["train", "sft", "--set", "scaling.resources_per_worker={CPU: 1}"],
     "r1 train sft --set 'scaling.resources_per_worker={CPU: 1}'"),
    # An absolute --config may exist only on the cluster (e.g. in the image), so it is not checked here.
    (["train", "grpo", "--config", "/opt/r1/train_grpo.yaml"], "r1 train grpo --config /opt/r1/train_grpo.yaml"),
])
def test_entrypoint_is_r1_plus_the_command(command, entrypoint):
    assert build_entrypoint(command, ROOT) == entrypoint
    assert shlex.split(entrypoint)[1:] == [part for part in command if part != "--"]


@pytest.mark.parametrize("command, error", [
    # Nothing to run.
    ([], "no command to submit"),
    # A job that submits jobs is a mistake, not a feature.
    (["submit", "eval"], "cannot submit itself"),
    # A relative --config must be inside the uploaded working dir, or the job cannot read it.
    (["train", "sft", "--config", "ray_configs/no_such_file.yaml"], "not a file in the working dir"),
])
def test_bad_commands_are_refused_before_submitting(command, error):
    with pytest.raises(ValueError, match=error):
        build_entrypoint(command, ROOT)


@pytest.fixture
def project(tmp_path) -> Path:
    """A working dir with configs where they are uploaded and where they are not, and one outside it."""
    project = tmp_path / "project"
    for name in ("ray_configs/ok.yaml", "runs/r1-sft/config.yaml", "venv/config.yaml", "scratch/config.yaml",
                 "sub/dir/config.yaml"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("max_steps: 2\n")
    (project / ".gitignore").write_text("scratch/\n")
    (tmp_path / "outside.yaml").write_text("max_steps: 2\n")
    return project


@pytest.mark.parametrize("config, error", [
    # ".." leaves the working dir: the file exists here but is not part of the upload.
    ("../outside.yaml", r"\.\./outside\.yaml is .*outside\.yaml, outside the working dir"),
    # ... also when it comes back through a subdirectory of the working dir and out again.
    ("sub/../../outside.yaml", "outside the working dir"),
    # Excluded by the shipped runtime env's excludes (/runs).
    ("runs/r1-sft/config.yaml", "is not uploaded: runs matches"),
    # Excluded by Ray's own default excludes (.git, .venv, venv, __pycache__).
    ("venv/config.yaml", "is not uploaded: venv matches"),
    # Excluded by the working dir's .gitignore, which Ray honours.
    ("scratch/config.yaml", "is not uploaded: scratch/config.yaml matches"),
])
def test_configs_the_job_would_not_find_are_refused(project, config, error):
    excludes = load_runtime_env(RUNTIME_ENV, project)["excludes"]
    with pytest.raises(ValueError, match=error):
        build_entrypoint(["train", "sft", "--config", config], project, excludes)


def test_the_working_dir_is_uploaded_as_one_snapshot_with_the_upload_excludes(project, tmp_path):
    import zipfile as zf

    from cluster.submit import snapshot_working_dir

    runtime_env = load_runtime_env(RUNTIME_ENV, project)
    snapshot = snapshot_working_dir(runtime_env, tmp_path)
    assert snapshot["working_dir"] == str(tmp_path / "working_dir.zip") and runtime_env["working_dir"] == str(project)
    names = {name.rstrip("/") for name in zf.ZipFile(snapshot["working_dir"]).namelist()}
    # What the job would find: the files Ray uploads from the directory, without runs/ (the runtime
    # env's excludes), venv/ (Ray's default excludes) and scratch/ (the .gitignore).
    assert {"ray_configs/ok.yaml", "sub/dir/config.yaml"} <= names
    assert not {name for name in names if name.split("/")[0] in ("runs", "venv", "scratch")}


@pytest.mark.parametrize("config", [
    "ray_configs/ok.yaml",
    "sub/dir/../../ray_configs/ok.yaml",  # ".." that stays inside the working dir is fine
    "./sub/dir/config.yaml",
])
def test_configs_inside_the_upload_are_accepted(project, config):
    excludes = load_runtime_env(RUNTIME_ENV, project)["excludes"]
    entrypoint = build_entrypoint(["train", "sft", "--config", config], project, excludes)
    assert entrypoint == f"r1 train sft --config {config}"


def test_a_config_outside_the_working_dir_exits_2_from_the_cli(project, capsys, monkeypatch):
    # As typed in a shell: `cd project && r1 submit ... --config ../outside.yaml`; refused before connecting.
    monkeypatch.chdir(project)
    code = r1_main(["submit", "--address", "http://127.0.0.1:1", "--runtime-env", str(RUNTIME_ENV),
                    "train", "sft", "--config", "../outside.yaml"])
    assert code == 2
    assert f"r1: error: --config ../outside.yaml is {project.parent / 'outside.yaml'}, outside the working dir " \
           f"{project}" in capsys.readouterr().err


def test_a_typo_in_the_command_fails_locally_with_r1_usage(capsys):
    # Parsed with r1's own parser: a wrong stage fails now, not minutes later inside the job.
    with pytest.raises(SystemExit) as exit_info:
        build_entrypoint(["train", "grop"], ROOT)
    assert exit_info.value.code == 2
    assert "invalid choice: 'grop'" in capsys.readouterr().err


# -- token auth ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, default_token, url, expected", [
    # No token anywhere: nothing is sent (a cluster without auth).
    ({}, None, "http://127.0.0.1:8265", None),
    # RAY_AUTH_TOKEN is the first source, for any host.
    ({"RAY_AUTH_TOKEN": "env-token"}, "file-token", "http://ray.example:8265", "env-token"),
    # RAY_AUTH_TOKEN_PATH is the second.
    ({"RAY_AUTH_TOKEN_PATH": "{tmp}/token"}, "file-token", "http://ray.example:8265", "path-token"),
    # RAY_AUTH_MODE=disabled wins over any token.
    ({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "env-token"}, None, "http://127.0.0.1:8265", None),
    # A local cluster started by `ray start` uses ~/.ray/auth_token when it exists; so does r1 submit.
    ({}, "file-token", "http://127.0.0.1:8265", "file-token"),
    ({}, "file-token", "http://localhost:8265", "file-token"),
    # ... but the local default token is not sent to another host unasked.
    ({}, "file-token", "http://ray.example:8265", None),
    # RAY_AUTH_MODE=token asks for it explicitly.
    ({"RAY_AUTH_MODE": "token"}, "file-token", "http://ray.example:8265", "file-token"),
])
def test_auth_header_follows_rays_token_precedence(tmp_path, env, default_token, url, expected):
    (tmp_path / "token").write_text("path-token\n")
    if default_token:
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text(default_token)
    environ = {"HOME": str(tmp_path), **{k: v.format(tmp=tmp_path) for k, v in env.items()}}
    headers = auth_headers(url, environ)
    assert headers == ({"Authorization": f"Bearer {expected}"} if expected else {})


@pytest.mark.parametrize("env, error", [
    # Token mode without any token: say where to put one instead of sending an empty header.
    ({"RAY_AUTH_MODE": "token"}, "no token"),
    # An empty token file is a misconfiguration (Ray itself aborts on it too).
    ({"RAY_AUTH_TOKEN_PATH": "{tmp}/empty"}, "is empty"),
])
def test_missing_tokens_are_errors(tmp_path, env, error):
    (tmp_path / "empty").write_text("")
    environ = {"HOME": str(tmp_path), **{k: v.format(tmp=tmp_path) for k, v in env.items()}}
    with pytest.raises(ValueError, match=error):
        auth_headers("http://ray.example:8265", environ)


# -- the runtime env ----------------------------------------------------------------------------------

def test_shipped_runtime_env_uploads_the_code_but_not_venv_runs_git_or_caches(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "project"
    files = [
        "r1/config.py", "r1/runs_table.py", "cluster/cli.py", "ray_configs/train_sft.yaml",  # code and configs: kept
        "r1/assets/r1-tiny/model.safetensors",  # the embedded model ships with the code
        "tests/runs/fixture.txt",  # only the top-level runs/ is a run directory
        ".venv/bin/python", ".git/HEAD", "runs/r1-sft/metrics.jsonl", "build/lib/x.py", "dist/r1.whl",
        ".cache/x", "r1_cluster.egg-info/PKG-INFO", "r1/__pycache__/config.cpython-311.pyc",
        ".pytest_cache/v/cache", "cluster/stale.pyc",
    ]
    for name in files:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    runtime_env = load_runtime_env(RUNTIME_ENV, project)
    assert runtime_env["working_dir"] == str(project)
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    package = tmp_path / "pkg.zip"
    # Ray's own packaging, with .gitignore ignored: the excludes alone must keep these out.
    create_package(str(project), package, include_gitignore=False, excludes=runtime_env["excludes"])
    uploaded = sorted(zipfile.ZipFile(package).namelist())
    assert uploaded == sorted(files[:6])


@pytest.mark.parametrize("text, error", [
    # A list is not a runtime env.
    ("- working_dir\n", "must hold a mapping"),
    # Ray's validation runs before anything is uploaded: env var values must be strings.
    ("env_vars: {OMP_NUM_THREADS: 2}\n", "not a valid Ray runtime env"),
    # Broken YAML names the file.
    ("env_vars: {a: [}\n", "not valid YAML"),
])
def test_bad_runtime_env_files_are_errors(tmp_path, text, error):
    path = tmp_path / "runtime_env.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=error):
        load_runtime_env(path, tmp_path)


def test_missing_runtime_env_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="pass --runtime-env"):
        load_runtime_env(tmp_path / "ray_configs" / "runtime_env.yaml", tmp_path)


def test_a_missing_working_dir_is_named_as_such(tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(ValueError, match=f"--working-dir {missing} does not exist"):
        load_runtime_env(missing / "ray_configs" / "runtime_env.yaml", missing)
    assert r1_main(["submit", "--working-dir", str(missing), "eval"]) == 2
    assert f"r1: error: --working-dir {missing} does not exist" in capsys.readouterr().err


# -- the address --------------------------------------------------------------------------------------

def test_a_gcs_address_with_nothing_listening_exits_2_quickly(capsys):
    # host:port is a GCS address; Ray alone would wait ~40 s and end in an RpcError traceback.
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert r1_main(["submit", "--address", address, "--working-dir", str(ROOT), "eval"]) == 2
    assert time.monotonic() - started < 20
    err = capsys.readouterr().err
    assert f"r1: error: cannot reach the Ray cluster at {address}" in err
    assert "--address http://" in err  # how to pass the dashboard URL instead


# -- a real head node ---------------------------------------------------------------------------------

def _ray_pids(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


class Head:
    def __init__(self, dashboard: str, token: str, env: dict[str, str], log: Path):
        self.dashboard, self.token, self.env, self.log = dashboard, token, env, log

    def client_env(self, **extra: str) -> dict[str, str]:
        """What a user's shell has: the dashboard in RAY_ADDRESS and the token, not the head's RAY_AUTH_MODE."""
        env = {k: v for k, v in self.env.items() if k != "RAY_AUTH_MODE"}
        env.update(RAY_ADDRESS=self.dashboard, **extra)
        return env

    def job_status(self, job_id: str) -> str:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})
        return client.get_job_status(job_id).value


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    # A short temp dir: Ray's unix sockets live under it and paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="r1sub", dir="/tmp")
    token = secrets.token_hex(16)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=token, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    ports = {flag: free_port() for flag in ("--port", "--dashboard-port", "--dashboard-agent-listen-port",
                                             "--ray-client-server-port")}
    log = tmp_path_factory.mktemp("head") / "head.log"
    command = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
               "--temp-dir", temp_dir, "--disable-usage-stats"]
    for flag, port in ports.items():
        command += [flag, str(port)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        _wait_dashboard(dashboard, process, log, timeout_s=180)
        yield Head(dashboard, token, env, log)
    finally:
        _stop_head(process, temp_dir, keep_logs=log.parent / "ray-logs")


def _wait_dashboard(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"ray start exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/api/version", timeout=2).status_code in (200, 401, 403):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Ray dashboard at {url} did not come up within {timeout_s}s:\n{log.read_text()[-3000:]}")


def _stop_head(process: subprocess.Popen, temp_dir: str, keep_logs: Path) -> None:
    # `ray start --block` shuts its node down on SIGTERM; whatever is left of it after the
    # deadline (found by its temp dir; workers exit with their raylet) is killed. The node's logs
    # (runtime env agent, job drivers) are kept next to head.log for a failure's post-mortem.
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    for pid in _ray_pids(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    logs = Path(temp_dir) / "session_latest" / "logs"
    if logs.is_dir():
        try:
            shutil.copytree(logs, keep_logs, ignore_dangling_symlinks=True, dirs_exist_ok=True)
        except (OSError, shutil.Error):  # a file gone mid-copy; the rest is kept
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


def _tiny_sft_args(storage: Path, run_name: str) -> list[str]:
    """The tiny SFT config cut to 2 steps of one half-CPU worker, so two such jobs fit together."""
    overrides = ["max_steps=2", "data.num_examples=16", "batch_size_per_worker=2", "scaling.num_workers=1",
                 "scaling.resources_per_worker.CPU=0.5", "optim.warmup_steps=0", "checkpoint.every_steps=0",
                 "log_every_steps=1", "progress_bar=false", f"checkpoint.storage_path={storage}", f"checkpoint.run_name={run_name}"]
    return ["train", "sft", "--config", TINY_SFT] + [part for item in overrides for part in ("--set", item)]


def _wait(process: subprocess.Popen, log: Path, timeout_s: float) -> str:
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
        pytest.fail(f"{process.args[:3]} did not finish within {timeout_s}s:\n{log.read_text()[-4000:]}")
    return log.read_text()


def _steps(metrics: Path) -> list[int]:
    import json

    return [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "event" not in r]


def test_r1_submit_and_ray_job_submit_run_the_tiny_training_job(head, tmp_path):
    r1_log, ray_log = tmp_path / "r1_submit.log", tmp_path / "ray_job_submit.log"
    with open(r1_log, "w") as out:
        r1_submit = subprocess.Popen([str(BIN / "r1"), "submit", *_tiny_sft_args(tmp_path, "via-r1-submit")],
                                     stdout=out, stderr=subprocess.STDOUT, env=head.client_env(), cwd=ROOT)
    # Once r1 submit got its job in, the head's job agent is up: start the plain Ray CLI alongside it.
    deadline = time.monotonic() + 120
    while "submitted raysubmit_" not in r1_log.read_text():
        assert r1_submit.poll() is None, r1_log.read_text()[-4000:]
        assert time.monotonic() < deadline, r1_log.read_text()[-4000:]
        time.sleep(0.5)
    # The Ray CLI only sends the token in token mode: RAY_AUTH_MODE=token is part of its recipe.
    ray_command = [str(BIN / "ray"), "job", "submit", "--runtime-env", str(RUNTIME_ENV), "--",
                   "r1", *_tiny_sft_args(tmp_path, "via-ray-job-submit")]
    with open(ray_log, "w") as out:
        ray_submit = subprocess.Popen(ray_command, stdout=out, stderr=subprocess.STDOUT,
                                      env=head.client_env(RAY_AUTH_MODE="token"), cwd=ROOT)
    r1_text = _wait(r1_submit, r1_log, timeout_s=300)
    ray_text = _wait(ray_submit, ray_log, timeout_s=300)

    assert r1_submit.returncode == 0, r1_text[-4000:]
    # The job's own output streamed through, then the final status.
    assert "run via-r1-submit: finished at step 2" in r1_text
    assert "SUCCEEDED" in r1_text.splitlines()[-1]
    assert ray_submit.returncode == 0, ray_text[-4000:]
    assert "run via-ray-job-submit: finished at step 2" in ray_text
    for run_name in ("via-r1-submit", "via-ray-job-submit"):
        assert _steps(tmp_path / run_name / "metrics.jsonl") == [1, 2]
        assert (tmp_path / run_name / "final" / "config.json").is_file()


def test_ctrl_c_stops_the_job_and_exits_130(head, tmp_path):
    log = tmp_path / "r1_submit.log"
    # Thousands of problems: this job runs until it is stopped.
    command = [str(BIN / "r1"), "submit", "eval", "--num-problems", "100000", "--max-new-tokens", "96"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=head.client_env(), cwd=ROOT)
    deadline = time.monotonic() + 120
    while "Running entrypoint for job" not in log.read_text():
        assert process.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    text = _wait(process, log, timeout_s=120)
    assert process.returncode == 130, text[-4000:]
    job_id = text.split("submitted ", 1)[1].split()[0]
    assert f"Ctrl-C: stopping job {job_id}" in text
    assert head.job_status(job_id) == "STOPPED"


def test_a_wrong_token_is_refused_before_anything_is_uploaded(head, tmp_path):
    result = subprocess.run([str(BIN / "r1"), "submit", "eval", "--num-problems", "1"], capture_output=True,
                            text=True, env=head.client_env(RAY_AUTH_TOKEN="not-the-token"), cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refused the auth token" in result.stderr
    assert "submitted" not in result.stderr


def test_a_job_whose_package_is_lost_is_resubmitted_once_then_says_why(head, tmp_path):
    # A module package that the cluster does not hold fails as an uploaded package deleted too early
    # would: the job never starts (so it writes no logs). r1 submit submits it once more; when that
    # fails too, the reason (only in the job's status message) is shown whole.
    runtime_env = tmp_path / "runtime_env.yaml"
    missing = "gcs://_ray_pkg_00000000deadbeef.zip"
    runtime_env.write_text(RUNTIME_ENV.read_text() + f"py_modules: ['{missing}']\n")
    result = subprocess.run([str(BIN / "r1"), "submit", "--runtime-env", str(runtime_env), "eval", "--num-problems", "1"],
                            capture_output=True, text=True, env=head.client_env(), cwd=ROOT, timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    first, second = [line.split()[3] for line in result.stderr.splitlines() if line.startswith("r1 submit: submitted ")]
    assert first != second
    assert f"job {first} FAILED before it started: the cluster lost the uploaded working dir" in result.stderr
    final = result.stderr[result.stderr.index(f"job {second} FAILED"):]
    assert "runtime_env setup failed" in final and missing in final, result.stderr[-4000:]
    assert head.job_status(first) == head.job_status(second) == "FAILED"
