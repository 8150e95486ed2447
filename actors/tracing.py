"""Ray glue for tracing: getting the tracing settings into every worker, and naming each actor's spans.

Ray workers do not inherit the driver's environment, so a driver (the `r1` CLI, a test, a job
entrypoint) puts `telemetry_env_vars(config)` into the runtime_env it starts Ray or the Serve app
with: `with_telemetry_env(runtime_env, config)`. Each actor then calls `setup_actor_tracing(role)`
in its constructor, so its spans carry `service.name = <service_name>-<role>`; an actor that does
not call it still traces (set up lazily on its first span, under the plain service name).
"""

from __future__ import annotations

import logging
from typing import Any

from r1.config import TelemetryConfig
from r1.telemetry import config_from_env, setup_tracing, telemetry_env_vars

logger = logging.getLogger(__name__)


def with_telemetry_env(runtime_env: dict[str, Any] | None, config: TelemetryConfig | None = None) -> dict[str, Any]:
    """`runtime_env` (not modified) plus the tracing environment variables; its own env_vars win."""
    runtime_env = dict(runtime_env or {})
    env_vars = telemetry_env_vars(config or config_from_env())
    env_vars.update(runtime_env.get("env_vars") or {})
    runtime_env["env_vars"] = env_vars
    return runtime_env


def setup_actor_tracing(role: str) -> bool:
    """Set up this worker's tracing from the environment as `<service_name>-<role>`; True when on.

    A bad tracing setting in a worker is logged, not raised: the driver validated the same settings
    before starting anything (`setup_tracing(config)` raises there), and an actor must not fail to
    start over its telemetry.
    """
    try:
        config = config_from_env()
        return setup_tracing(config, service_name=f"{config.service_name}-{role}") is not None
    except (ValueError, ImportError) as error:
        logger.error("tracing is off in the %s actor: %s", role, error)
        return False
