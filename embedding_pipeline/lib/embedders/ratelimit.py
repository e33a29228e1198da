"""A client-side rate limiter per provider: requests per minute and tokens per minute.

Two token buckets refill continuously; `acquire` blocks until both hold enough. A provider
that reports its own budget (OpenAI's `x-ratelimit-remaining-*` / `x-ratelimit-reset-*`
headers) makes the limiter hold every request until the reset when a budget runs low, so
the client slows down before it is answered 429.

One limiter is shared by every embedder of a process that calls the same endpoint
(`limiter_for`); across processes and machines, Dagster's concurrency pool on the embedding
assets caps how many runs call a provider at once (docs/operations.md).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: str | None) -> float | None:
    """OpenAI's reset durations (`1s`, `6m0s`, `20ms`, `1h2m3.5s`) or plain seconds."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


@dataclass(frozen=True)
class RateLimits:
    """Per-minute budgets; None means unlimited. `low_water` is the fraction of a
    provider-reported budget under which requests wait for its reset."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    low_water: float = 0.05


class _Bucket:
    def __init__(self, per_minute: float) -> None:
        self.capacity = per_minute
        self.level = per_minute
        self.rate = per_minute / 60.0

    def refill(self, elapsed: float) -> None:
        self.level = min(self.capacity, self.level + elapsed * self.rate)

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (an amount above capacity waits for a full
        bucket, then goes: one huge request must not block forever)."""
        need = min(amount, self.capacity) - self.level
        return 0.0 if need <= 0 else need / self.rate


class RateLimiter:
    """Thread-safe; `acquire` returns the seconds it waited."""

    def __init__(
        self,
        limits: RateLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._requests = _Bucket(limits.requests_per_minute) if limits.requests_per_minute else None
        self._tokens = _Bucket(limits.tokens_per_minute) if limits.tokens_per_minute else None
        self._last = clock()
        self._paused_until = 0.0

    def _refill(self) -> None:
        now = self._clock()
        elapsed, self._last = now - self._last, now
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.refill(elapsed)

    def acquire(self, tokens: int = 1) -> float:
        waited = 0.0
        while True:
            with self._lock:
                self._refill()
                wait = max(0.0, self._paused_until - self._clock())
                if self._requests is not None:
                    wait = max(wait, self._requests.wait_for(1))
                if self._tokens is not None:
                    wait = max(wait, self._tokens.wait_for(tokens))
                if wait <= 0:
                    if self._requests is not None:
                        self._requests.level -= 1
                    if self._tokens is not None:
                        self._tokens.level -= min(tokens, self._tokens.capacity)
                    return waited
            self._sleep(wait)
            waited += wait

    def observe(self, headers: Mapping[str, str]) -> None:
        """Slow down on a provider's own report: when the requests or tokens it says remain
        fall under `low_water` of its limit, hold new requests until its reset."""
        pause = 0.0
        for kind in ("requests", "tokens"):
            remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            limit = _number(headers.get(f"x-ratelimit-limit-{kind}"))
            reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
            if remaining is None or reset is None:
                continue
            low = remaining <= 0 or (
                limit is not None and remaining < limit * self.limits.low_water
            )
            if low:
                pause = max(pause, reset)
        if pause:
            with self._lock:
                self._paused_until = max(self._paused_until, self._clock() + pause)

    def pause(self, seconds: float) -> None:
        """Hold every request of this limiter for `seconds` (a 429's Retry-After: the
        other requests in flight would only meet the same answer)."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


_SHARED: dict[tuple[str, RateLimits], RateLimiter] = {}
_SHARED_LOCK = threading.Lock()


def limiter_for(endpoint: str, limits: RateLimits) -> RateLimiter:
    """The process-wide limiter of one provider endpoint with these limits."""
    with _SHARED_LOCK:
        key = (endpoint, limits)
        if key not in _SHARED:
            _SHARED[key] = RateLimiter(limits)
        return _SHARED[key]
