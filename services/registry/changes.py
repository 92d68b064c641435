"""The change feed behind WatchAdapters: one poller per registry process reads the metadata
store's change table (written in the same transaction as each version and deletion, so replicas
over one PostgreSQL see each other's changes) and fans the rows out to subscribers.

    async for change in feed.watch("team/"):     # Change(seq, kind, adapter_id, version, latest)
        ...
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog

from services.common.errors import Unavailable
from services.registry.stores import Change, MetadataStore

log = structlog.get_logger(__name__)

QUEUE_LIMIT = 10_000                       # a subscriber this far behind is dropped (UNAVAILABLE)
_END = object()                            # close(): streams end normally (clients re-subscribe)


class ChangeFeed:
    def __init__(self, metadata: MetadataStore | None, interval: float = 0.2):
        self.metadata = metadata
        self.interval = interval
        self._subs: dict[int, tuple[str, asyncio.Queue]] = {}
        self._seq = 0
        self._task: asyncio.Task | None = None
        self._start = asyncio.Lock()

    async def watch(self, prefix: str = "") -> AsyncIterator[Change]:
        """Changes committed after the call, oldest first, whose id starts with `prefix`."""
        queue: asyncio.Queue = asyncio.Queue(QUEUE_LIMIT)
        async with self._start:
            if self._task is None:
                self._seq = await asyncio.to_thread(self.metadata.last_change)
                self._task = asyncio.create_task(self._poll())
            self._subs[id(queue)] = (prefix, queue)
        try:
            while True:
                change = await queue.get()
                if change is _END:
                    return
                if change is None:
                    raise Unavailable("this watcher fell too far behind the change feed; "
                                      "re-subscribe and re-list (ListAdapters)")
                yield change
        finally:
            self._subs.pop(id(queue), None)

    async def close(self) -> None:
        """End every open watch stream (on drain: a stream never ends by itself)."""
        for _, queue in list(self._subs.values()):
            while queue.full():
                queue.get_nowait()
            queue.put_nowait(_END)

    async def _poll(self) -> None:
        try:
            while self._subs:
                try:
                    rows = await asyncio.to_thread(self.metadata.changes_after, self._seq)
                except Exception as exc:               # the database blinked: keep polling
                    log.warning("change_feed_poll_failed", error=str(exc))
                    rows = []
                for change in rows:
                    self._seq = change.seq
                    for prefix, queue in list(self._subs.values()):
                        if change.adapter_id.startswith(prefix):
                            self._put(queue, change)
                if len(rows) < 1000:
                    await asyncio.sleep(self.interval)
        finally:
            self._task = None

    @staticmethod
    def _put(queue: asyncio.Queue, change: Change) -> None:
        if queue.qsize() >= QUEUE_LIMIT - 1:
            if queue.qsize() < QUEUE_LIMIT:
                queue.put_nowait(None)
            return
        queue.put_nowait(change)
