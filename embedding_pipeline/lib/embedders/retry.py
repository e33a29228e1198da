"""Retrying transient provider failures: exponential backoff with full jitter, a total
deadline per request, and the provider's own `Retry-After` / rate-limit reset honoured.

Pure: the clock, the sleep and the random source are passed in, so tests drive it
without waiting.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from embedding_pipeline.lib.embedders.errors import EmbeddingError, TransientEmbeddingError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long one request may keep trying. `deadline_seconds` bounds the whole request,
    waits included; a wait the provider asks for that would pass it ends the request."""

    deadline_seconds: float = 300.0
    base_seconds: float = 0.5
    max_backoff_seconds: float = 30.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)] (attempt counts from 0)."""
        ceiling = min(self.max_backoff_seconds, self.base_seconds * (2**attempt))
        return rng.uniform(0, ceiling)


@dataclass
class RetryStats:
    """What retrying cost, summed over the requests of every worker thread."""

    retries: int = 0
    seconds_waited: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def note(self, reason: str, waited: float) -> None:
        with self.lock:
            self.retries += 1
            self.seconds_waited += waited
            self.reasons[reason] = self.reasons.get(reason, 0) + 1


def call_with_retries(
    attempt: Callable[[], T],
    policy: RetryPolicy,
    stats: RetryStats,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Call `attempt` until it returns, retrying `TransientEmbeddingError` within the
    policy's deadline. Any other exception passes through at once; when the deadline would
    be passed, an `EmbeddingError` names the attempts, the time spent and the last reason."""
    rng = rng or random.Random()
    started = clock()
    tries = 0
    while True:
        try:
            return attempt()
        except TransientEmbeddingError as exc:
            wait = policy.backoff(tries, rng)
            if exc.retry_after is not None:
                wait = max(wait, exc.retry_after)
            tries += 1
            spent = clock() - started
            if spent + wait > policy.deadline_seconds:
                raise EmbeddingError(
                    f"{exc} (gave up after {tries} attempt(s) in {spent:.1f}s; the retry "
                    f"deadline is {policy.deadline_seconds:g}s, EP_RETRY_DEADLINE_SECONDS)"
                ) from None
            stats.note(exc.kind, wait)
            sleep(wait)
