"""State every replica of an application shares: stored responses and the latest metrics of each replica.

Each is a named, detached Ray actor per application (found by name from any replica, surviving replica
restarts and redeploys) with no CPU reserved: it only holds small dicts. Callers await its methods; nothing
here blocks an event loop.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import ray

NAMESPACE = "gptoss_serve"


def actor_name(app_name: str, role: str) -> str:
    return f"gptoss:{app_name}:{role}"


@ray.remote(num_cpus=0, max_concurrency=64)
class ResponseStoreActor:
    """Stored Responses API results by id, the least recently used dropped beyond max_items."""

    def __init__(self, max_items: int):
        self._max_items = max_items
        self._records: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def get(self, response_id: str) -> dict[str, Any] | None:
        record = self._records.get(response_id)
        if record is not None:
            self._records.move_to_end(response_id)
        return record

    def put(self, response_id: str, record: dict[str, Any]) -> None:
        self._records[response_id] = record
        self._records.move_to_end(response_id)
        while len(self._records) > self._max_items:
            self._records.popitem(last=False)

    def delete(self, response_id: str) -> bool:
        return self._records.pop(response_id, None) is not None


@ray.remote(num_cpus=0, max_concurrency=64)
class MetricsHubActor:
    """The latest metrics snapshot of every replica that pushed one recently."""

    def __init__(self):
        self._latest: dict[str, tuple[float, Any]] = {}

    def push(self, source: str, snapshot: Any) -> None:
        self._latest[source] = (time.monotonic(), snapshot)

    def collect(self, max_age_s: float) -> dict[str, Any]:
        """Snapshots by source; those older than max_age_s (a replica that went away) are dropped."""
        now = time.monotonic()
        self._latest = {s: (t, snap) for s, (t, snap) in self._latest.items() if now - t <= max_age_s}
        return {source: snap for source, (_, snap) in self._latest.items()}


async def get_or_create(actor_class, app_name: str, role: str, *args) -> ray.actor.ActorHandle:
    """The application's shared actor, created by whichever replica asks first."""
    options = actor_class.options(name=actor_name(app_name, role), namespace=NAMESPACE, lifetime="detached",
                                  get_if_exists=True)
    return await asyncio.to_thread(options.remote, *args)  # a GCS round trip: kept off the event loop


class RayResponseStore:
    """The ResponseStore the Responses handler uses, backed by the application's store actor."""

    def __init__(self, actor: ray.actor.ActorHandle):
        self._actor = actor

    async def get(self, response_id: str) -> dict[str, Any] | None:
        return await self._actor.get.remote(response_id)

    async def put(self, response_id: str, record: dict[str, Any]) -> None:
        await self._actor.put.remote(response_id, record)


def kill_shared_actors(app_name: str) -> list[str]:
    """Removes an application's shared actors (for `gptoss-serve down`); returns the names removed."""
    removed = []
    for role in ("responses", "metrics"):
        try:
            actor = ray.get_actor(actor_name(app_name, role), namespace=NAMESPACE)
        except ValueError:
            continue
        ray.kill(actor)
        removed.append(actor_name(app_name, role))
    return removed
