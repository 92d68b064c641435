"""The device tier: a page pool in accelerator memory, filled from the host arena by page copies.

    pool = DevicePool(layout, capacity_bytes, dtype, device)    # same page size and layout as the arena
    ids = pool.allocate(n)                                      # None: evict first (Residency decides)
    entry, copy = pool.fill(ids, arena, host_entry)             # copies issued, maybe still in flight
    pool.wait(copy)                                             # on a loader thread, never the engine's
    batch = pool.batch([entry, None])                           # the kernel reads the device pages

On CUDA the copy runs on a side stream: the adapter's arena pages (pinned) are gathered into a pinned
staging buffer, sent with one non_blocking copy, scattered into the pool's pages on the device, and an
event is recorded; the loader thread waits for that event before the request may join a batch, so the
running batch never waits for a copy. The side stream first waits for the work already queued on the
engine's stream (pages being reused may still be read by a step in flight). On CPU (--device-cache-bytes
on a CPU executor, for tests) the pool is a second host buffer and the copy is done when fill returns:
the same fill/pin/evict logic runs in CI as on a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.executor.adapters.arena import ArenaEntry, ArenaLayout, HostArena, PageLender, PagePool
from services.executor.ops.memory import host_pages


class DevicePool(PagePool):
    def __init__(self, layout: ArenaLayout, capacity_bytes: int, dtype: torch.dtype,
                 device: torch.device, pages: Tensor | None = None, lender: PageLender | None = None):
        elem = torch.empty((), dtype=dtype).element_size()
        num = capacity_bytes // (layout.page_elems * elem)
        if pages is None:
            pages = (host_pages((num, layout.page_elems), dtype) if torch.device(device).type == "cpu"
                     else torch.empty((num, layout.page_elems), dtype=dtype, device=device))
        super().__init__(layout, dtype, pages, num, lender)
        self._stream = torch.cuda.Stream(device) if self.device.type == "cuda" else None

    def fill(self, ids: list[int], arena: HostArena, src: ArenaEntry):
        """Copy the host placement `src` into pages `ids` -> (device entry, copy handle for wait)."""
        if len(ids) != src.pages.numel():
            raise ValueError(f"the adapter holds {src.pages.numel()} pages, {len(ids)} were given")
        entry = self.place(ids, src.meta, src.scalings, src.rank)
        if not ids:
            return entry, None
        if self._stream is None:
            rows = arena.pages.index_select(0, src.pages.long())      # [n, P] on the host
            self.pages.index_copy_(0, entry.pages.long(), rows)
            return entry, None
        staging = torch.empty((len(ids), self.layout.page_elems), dtype=self.dtype, pin_memory=True)
        torch.index_select(arena.pages, 0, src.pages.long(), out=staging)   # gathered once, pinned
        done = torch.cuda.Event()
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(torch.cuda.default_stream(self.device))
            dst = entry.pages.to(self.device, non_blocking=True).long()
            self.pages.index_copy_(0, dst, staging.to(self.device, non_blocking=True))
            done.record(self._stream)
        return entry, (done, staging)     # staging lives until the copy is done

    @staticmethod
    def wait(copy) -> None:
        """Block the calling (loader) thread until fill's copies have landed."""
        if copy is not None:
            copy[0].synchronize()
