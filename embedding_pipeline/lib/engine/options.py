"""How a run spreads its work (`EngineOptions`), what it reports while it works (`Progress`)
and what it did (`SyncResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from embedding_pipeline.lib.embedders.base import Embedder
from embedding_pipeline.lib.engine.row_errors import RowErrorPolicy

#: Connections that write a run's vectors (EP_WRITE_CONNECTIONS). Measured at 1536-d against
#: an instant provider on 2 cores (docs/benchmarks.md).
DEFAULT_WRITE_CONNECTIONS = 2


@dataclass(frozen=True)
class EngineOptions:
    """How a run spreads its work; every figure is a setting (README, Configuration)."""

    #: Rows per provider request, capped by the embedder's own limits.
    batch_size: int = 64
    #: Provider requests in flight at once; None: the embedder's default.
    concurrency: int | None = None
    #: Rows claimed per claim transaction; None: enough for every worker twice over, and
    #: at least the embedder's `default_claim_rows`, so that sorting by length has texts
    #: to group.
    claim_size: int | None = None
    row_errors: RowErrorPolicy = field(default_factory=RowErrorPolicy)
    #: Seconds between progress reports (a report per batch would flood the event log).
    progress_interval_seconds: float = 5.0
    #: A run whose first this-many isolated rows were all refused, with none embedded,
    #: stops: the provider refuses everything (a bad model or option), not these rows.
    refuse_all_after: int = 16
    #: How long a run tries to get its database connection back before it fails.
    reconnect_seconds: float = 60.0
    #: Connections that write vectors. 1: the run's own connection writes between its
    #: claims; more: that many writer threads, each with its own connection (opened with
    #: `reconnect`), write while the run's connection only claims, so PostgreSQL works on
    #: several cores (docs/operations.md, "Concurrency: the claim design").
    write_connections: int = DEFAULT_WRITE_CONNECTIONS
    #: Names the run in its claiming session's `application_name` (e.g. the Dagster run
    #: id), so that checks and operators can tell which run holds a row or builds an index.
    session_label: str = ""

    def workers(self, embedder: Embedder) -> int:
        return max(1, self.concurrency or embedder.default_concurrency)

    def request_rows(self, embedder: Embedder) -> int:
        return max(1, min(self.batch_size, embedder.max_batch_size))

    def claim_rows(self, embedder: Embedder) -> int:
        if self.claim_size:
            return max(1, self.claim_size)
        return max(
            embedder.default_claim_rows, 2 * self.workers(embedder) * self.request_rows(embedder)
        )


@dataclass(frozen=True)
class Progress:
    embedded: int
    failed: int
    pending_at_start: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rows_per_second
        left = max(0, self.pending_at_start - self.embedded - self.failed)
        return left / rate if rate > 0 else None

    def describe(self) -> str:
        eta = self.eta_seconds
        return (
            f"{self.embedded}/{self.pending_at_start} embedded"
            + (f", {self.failed} failed" if self.failed else "")
            + f", {self.rows_per_second:.0f} rows/s, {self.seconds:.0f}s"
            + (f", about {eta:.0f}s left" if eta is not None and self.embedded else "")
        )


IndexStrategy = Literal["unchanged", "incremental", "built after load"]


@dataclass
class SyncResult:
    table: str
    model_id: str
    dimension: int
    rows_in_window: int = 0
    pending_at_start: int = 0
    stale_model_at_start: int = 0
    embedded: int = 0
    changed_during_run: int = 0
    skipped_locked: int = 0
    failed: int = 0
    failed_samples: list[tuple[int, str]] = field(default_factory=list)
    empty_text_ids: list[int] = field(default_factory=list)
    #: Old vectors set to NULL because their row's current text was given up or is empty.
    withdrawn: int = 0
    #: The database snapshot (`pg_current_snapshot()`) taken before the first claim: the
    #: row versions that existed when the run started (`quality.count_missing`).
    start_snapshot: str = ""
    claims: int = 0
    provider_requests: int = 0
    isolation_requests: int = 0
    estimated_tokens: int = 0
    truncated: int = 0
    retries: int = 0
    retry_seconds: float = 0.0
    rate_limit_seconds: float = 0.0
    reconnects: int = 0
    index_strategy: IndexStrategy = "unchanged"
    index_seconds: float = 0.0
    seconds_without_index: float = 0.0
    seconds: float = 0.0

    @property
    def skipped_up_to_date(self) -> int:
        return self.rows_in_window - self.pending_at_start

    @property
    def rows_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds and self.embedded else 0.0
