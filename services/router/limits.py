"""Per-tenant admission at the router: a request rate (token bucket) and a cap on requests in flight.

    limits = TenantLimits(rate_per_s=20, burst=40, max_concurrent=8)
    with limits.admit(tenant):        # RateLimited (RESOURCE_EXHAUSTED) with retry_after_s
        ...serve the request...

0 turns a limit off. Admins and services are not limited (a gateway passes its callers' tokens on, so
each tenant is counted by its own token); on an open router every caller is one tenant, "".
"""

from __future__ import annotations

import contextlib
import math
import threading
import time

from services.common.errors import ResourceExhausted

RETRY_AFTER_KEY = "retry-after-ms"     # trailing metadata carrying the hint, milliseconds


class RateLimited(ResourceExhausted):
    def __init__(self, message: str, retry_after_s: float):
        super().__init__(f"{message}; retry after {retry_after_s:.3f} s")
        self.retry_after_s = retry_after_s


class TenantLimits:
    def __init__(self, rate_per_s: float = 0.0, burst: int = 0, max_concurrent: int = 0,
                 clock=time.monotonic):
        self.rate = rate_per_s
        self.burst = max(burst, 1) if burst else max(1, math.ceil(rate_per_s))
        self.max_concurrent = max_concurrent
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}     # tenant -> (tokens, when)
        self._inflight: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0 or self.max_concurrent > 0

    def _take_token(self, tenant: str) -> None:
        now = self._clock()
        tokens, when = self._buckets.get(tenant, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.rate)
        if tokens < 1.0:
            self._buckets[tenant] = (tokens, now)
            raise RateLimited(f"tenant {tenant!r} is over its request rate of {self.rate:g}/s "
                              f"(burst {self.burst}; --tenant-rate)", (1.0 - tokens) / self.rate)
        self._buckets[tenant] = (tokens - 1.0, now)

    @contextlib.contextmanager
    def admit(self, tenant: str):
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)

    def acquire(self, tenant: str) -> None:
        """Count one request in, or raise RateLimited; each acquire needs one release."""
        with self._lock:
            n = self._inflight.get(tenant, 0)
            if self.max_concurrent and n >= self.max_concurrent:
                raise RateLimited(f"tenant {tenant!r} has {n} requests in flight, its limit "
                                  "(--tenant-max-concurrent)", 0.1)
            if self.rate > 0:
                self._take_token(tenant)
            self._inflight[tenant] = n + 1

    def release(self, tenant: str) -> None:
        with self._lock:
            left = self._inflight[tenant] - 1
            if left:
                self._inflight[tenant] = left
            else:
                del self._inflight[tenant]
