"""Starting (or joining) a Ray cluster, with one more try when Ray's own start-up races.

Ray 2.60's raylet waits a fixed 15 s for its dashboard agent (a Python process that imports much of
Ray) to write its port files, and exits if the agent is slower, which happens when every core is
busy. `ray.init` then fails with "The current node timed out during startup" and nothing of the
cluster is left running (ray-project/ray#65983; seen once in this project's test suite, on two
busy cores). A second start usually finds the machine's caches warm and succeeds, so `init_ray`
tries once more for that error alone, saying so; any other error is raised as it is.

A cluster that `init_ray` starts also gives Ray Serve's HTTP proxy more time to start
(`LOCAL_CLUSTER_ENV`): Serve's controller gives a new proxy 5 s to answer its first readiness
check and kills it otherwise (the next one gets 10 s, then 15 s, ...), while `serve.start` waits
60 s but fails as soon as the first proxy dies. On a busy machine, starting the proxy's worker
process (Python, Ray, uvicorn) can take longer than 5 s; with 30 s for the first check, such a
start has the whole 60 s of `serve.start`. (With the cores oversubscribed four to seven times it
took longer than 60 s as well, and Serve failed either way.) The cluster's processes inherit the
variable from the process that starts it; a cluster joined by address keeps its own settings, and
a value already in the environment is kept.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

STARTUP_RACE = "timed out during startup"
LOCAL_CLUSTER_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}


def init_ray(**kwargs: Any) -> Any:
    """`ray.init(**kwargs)`, started once more if the local node timed out during start-up."""
    import ray

    for name, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(name, value)  # read by the processes of a cluster started here

    try:
        return ray.init(**kwargs)
    except Exception as error:  # Ray raises a bare Exception for this
        if STARTUP_RACE not in str(error):
            raise
        logger.warning("Ray's local node timed out during start-up (its agent was slow to start on a busy "
                       "machine); starting it once more")
        ray.shutdown()
        return ray.init(**kwargs)
