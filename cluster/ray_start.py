"""Starting (or joining) a Ray cluster, with one more try when Ray's own start-up races.

Ray 2.60's raylet waits a fixed 15 s for its dashboard agent (a Python process that imports much of
Ray) to write its port files, and exits if the agent is slower, which happens when every core is
busy. `ray.init` then fails with "The current node timed out during startup" and nothing of the
cluster is left running (ray-project/ray#65983; seen once in this project's test suite, on two
busy cores). A second start usually finds the machine's caches warm and succeeds, so `init_ray`
tries once more for that error alone, saying so; any other error is raised as it is.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

STARTUP_RACE = "timed out during startup"


def init_ray(**kwargs: Any) -> Any:
    """`ray.init(**kwargs)`, started once more if the local node timed out during start-up."""
    import ray

    try:
        return ray.init(**kwargs)
    except Exception as error:  # Ray raises a bare Exception for this
        if STARTUP_RACE not in str(error):
            raise
        logger.warning("Ray's local node timed out during start-up (its agent was slow to start on a busy "
                       "machine); starting it once more")
        ray.shutdown()
        return ray.init(**kwargs)
