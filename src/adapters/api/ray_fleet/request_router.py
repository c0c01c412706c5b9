"""A Ray Serve request router that sends each conversation about a picture to the replica that
holds it (affinity.py), and everything else by the power of two choices.

Ray Serve asks `choose_replicas` for ranks of replicas, best first, and takes the least loaded
replica of the first rank that has room. A keyed request's first rank is its own replica, unless
that one is further behind the least loaded by more than `imbalance_limit` requests (a popular
picture must not pile up on one replica while another idles); its second rank is every replica.
Routing stays per request (no FIFO mixin): a replica found for one request is never handed to
another, which would send that one away from its cache. The request it was found for is told
apart by identity, not by Ray Serve's internal request id: calls made while one request is being
handled (the API's ingress replica describing the model: two calls at once) share that id, and
by id the second would never get its replica.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from vilaserve.adapters.api.ray_fleet.affinity import rendezvous_order
from vilaserve.adapters.api.ray_fleet.fleet import AFFINITY_KWARG

DEFAULT_IMBALANCE_LIMIT = 4


def _replica_name(replica: RunningReplica) -> str:
    return str(replica.replica_id.unique_id)


class ConversationAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance_limit: int = DEFAULT_IMBALANCE_LIMIT, **_: Any) -> None:
        self._imbalance_limit = imbalance_limit

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = _key_of(pending_request)
        if pending_request is not None:
            # This round offers every replica: when none has room, wait before the next one
            # (Ray Serve retries at once otherwise).
            pending_request.routing_context.should_backoff = True
        if key is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        order = rendezvous_order(key, candidate_replicas, _replica_name)
        if self._too_far_behind(order[0], candidate_replicas):
            return [order]
        return [order[:1], order]

    def _fulfill_next_pending_request(
        self, replica: RunningReplica, request_metadata: Any = None
    ) -> None:
        """Gives `replica` to the request whose routing found it (Ray Serve's hook; its own
        version looks the request up by its internal id)."""
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                self._remove_pending_request_from_indices(pending)
                return

    def _too_far_behind(self, preferred: RunningReplica, replicas: list[RunningReplica]) -> bool:
        cache = self.replica_queue_len_cache
        lengths = [cache.get(r.replica_id) for r in replicas]
        mine = cache.get(preferred.replica_id)
        known = [n for n in lengths if n is not None]
        if mine is None or not known:
            return False
        return mine - min(known) > getattr(self, "_imbalance_limit", DEFAULT_IMBALANCE_LIMIT)


def _key_of(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None:
        return None
    key = pending_request.kwargs.get(AFFINITY_KWARG)
    return key if isinstance(key, str) else None
