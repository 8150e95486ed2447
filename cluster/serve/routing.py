"""Routing requests to LLM-server replicas: prefix affinity with a load bound (`llm.routing`).

Serve's default router picks the less loaded of two random replicas, so a chat's later turns land
on any replica, and with every replica keeping its own prefix cache (r1/engine/prefix_cache.py) the
history they repeat is cached only where an earlier turn ran. `PrefixAffinityRouter` sends a request
to the replica its prompt's start belongs to (`r1.serving.affinity`: rendezvous hashing, the same
answer in every ingress replica without shared state), the key's second replica when the first has
`imbalance_threshold` more requests queued than it, and any other replica when both are full (as
Serve's own router then would). Requests without a key (short prompts, a body of another shape)
go to the less loaded of two random replicas, as with Serve's router.

Ray Serve's request-router API is alpha (Ray 2.60); `llm.routing: power_of_two` keeps Serve's
default router.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import LocalityMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from r1.serving.affinity import affinity_key, rank_replicas

ROUTER_CLASS = "cluster.serve.routing:PrefixAffinityRouter"


def request_key(pending_request: PendingRequest | None) -> bytes | None:
    """The affinity key of an LLM-server call (`LLMServer.stream(body)`: the body's prompt)."""
    if pending_request is None or not pending_request.args:
        return None
    body: Any = pending_request.args[0]
    return affinity_key(body.get("prompt")) if isinstance(body, dict) else None


class PrefixAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Each request to the replica its prompt's start belongs to, within a load bound (module doc)."""

    def initialize_state(self, imbalance_threshold: int = 4, **kwargs: Any) -> None:
        self.imbalance_threshold = imbalance_threshold

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata: Any = None) -> None:
        """Give the replica to the very request it was chosen for. Serve's router finds that request
        by its internal id, which the calls an ingress request makes at once share (n > 1 choices,
        a batch of prompts): all but the first were never found, and waited forever. Serve's own
        router does not notice, as it hands each chosen replica to the oldest waiting request."""
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                self._cancel_routing_task_for_pending_request(pending)
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                self._remove_pending_request_from_indices(pending)
                return

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Every rank below covers all replicas: when none had room, Serve is to back off before
            # asking again (without this it asks again at once, and its queue-length probes flood
            # the replicas).
            pending_request.routing_context.should_backoff = True
        key = request_key(pending_request)
        if key is None or len(candidate_replicas) == 1:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = rank_replicas(key, candidate_replicas, lambda replica: replica.replica_id.unique_id)
        first, second = ranked[0], ranked[1]
        queued = self._replica_queue_len_cache.get
        first_len, second_len = queued(first.replica_id), queued(second.replica_id)
        if first_len is not None and second_len is not None and first_len - second_len > self.imbalance_threshold:
            first, second = second, first
        # Serve tries the ranks in order and takes, within one, a replica with room: the key's
        # replica, then its second, then the least loaded of the rest.
        return [[first], [second], ranked[2:]]
