"""The settings as frozen dataclasses, one a concern, with their defaults. The domain types
`lib/` shares (`TableSpec`, `HnswSettings`) come from `lib/store/domain.py`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedding_pipeline.lib.embedders.catalog import DEFAULT_BATCH_SIZES
from embedding_pipeline.lib.engine.options import DEFAULT_WRITE_CONNECTIONS
from embedding_pipeline.lib.store.domain import (
    HnswSettings,
    TableSpec,
    default_tables,
)


def _project_root() -> Path:
    """The source checkout this package runs from, or the working directory when the
    package is installed elsewhere (site-packages is no place for data)."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


#: Where the embedded database (`.pgdata`) and the local Dagster instance live by default.
PROJECT_ROOT = _project_root()


@dataclass(frozen=True)
class SensorSettings:
    """The extraction sensor: how often it looks and how much it takes per tick."""

    #: Seconds between ticks of the extraction sensor: with the run queue's second and a
    #: run's start, a new row is searchable well within 30 s (docs/operations.md, "How
    #: soon a new row is searchable"); an idle tick is two index lookups.
    interval_seconds: int = 5
    max_extractions_per_tick: int = 200
    #: How long an extraction id missing below the cursor (a transaction still running,
    #: or one rolled back) is watched for before the sensor stops looking for it.
    gap_grace_seconds: int = 600
    #: Seconds between ticks of the backlog sensor (rows missing, stale or due for a retry
    #: by any cause, and missing HNSW indexes): rows the application writes without an
    #: extraction are embedded this soon too. An idle tick reads the partial pending index.
    backlog_interval_seconds: int = 10
    #: After an embedding run of a table failed (its retries too), the backlog sensor waits
    #: this long before it launches another for that table: a run that fails at once (a
    #: refused key, a wrong dimension) is not relaunched at every tick. 0: no wait.
    backlog_failure_backoff_seconds: int = 300


@dataclass(frozen=True)
class CheckSettings:
    """Thresholds and sample sizes of the asset checks (see docs/checks.md).

    Every figure a check samples or compares against lives here, so a large table can be
    checked more cheaply, or a stricter recall demanded, without editing code.
    """

    recall_threshold: float = 0.95
    recall_sample_size: int = 50
    k: int = 10
    latency_sample_size: int = 50
    latency_warn_ms: float = 50.0
    planner_warn_rows: int = 10_000
    sample_ids: int = 10
    dimension_sample_size: int = 1_000
    schedule_cron: str = "0 * * * *"
    #: `embedding_lag` warns when a row has needed an embedding for longer than this.
    freshness_warn_minutes: float = 15.0
    #: Queries of the recall and latency checks inside an embedding run (each recall query
    #: costs one sequential scan): every run that writes vectors evaluates all nine checks,
    #: on a sample cheap enough to afford; the schedule and `check` use the full samples.
    run_recall_sample_size: int = 10
    run_latency_sample_size: int = 20
    #: Labelled questions (EP_EVAL_QUESTIONS) the scheduled `search_eval` check scores;
    #: None: no such check. It warns when the vector or hybrid mode's recall@5 or MRR of a
    #: table falls below these floors.
    eval_questions: Path | None = None
    eval_min_recall: float = 0.5
    eval_min_mrr: float = 0.5


#: hnsw.iterative_scan values (pgvector 0.8): off, or keep scanning the index until enough
#: rows pass the filters, in exact (strict) or approximate (relaxed) distance order.
ITERATIVE_SCAN_MODES = ("off", "relaxed_order", "strict_order")


@dataclass(frozen=True)
class SearchSettings:
    """The search API (`embedding_pipeline.search`): full-text language, hybrid ranking and
    how filtered vector queries walk the HNSW index (`hnsw.ef_search` is `HnswSettings`')."""

    #: PostgreSQL text search configuration of the `search_tsv` columns and of queries.
    text_language: str = "english"
    #: The constant k of reciprocal rank fusion: score = sum of 1 / (k + rank).
    rrf_k: int = 60
    #: Rows each ranking (vector, text) contributes to a hybrid fusion, at least the limit.
    hybrid_candidates: int = 50
    iterative_scan: str = "relaxed_order"
    #: Most index tuples an iterative scan visits before it gives up (pgvector's default).
    max_scan_tuples: int = 20_000
    #: Filters the planner expects to keep fewer rows than this are answered by an exact
    #: scan of those rows instead of the HNSW index (faster and exact when few remain).
    exact_below_rows: int = 2_000

    def __post_init__(self) -> None:
        if self.iterative_scan not in ITERATIVE_SCAN_MODES:
            raise ValueError(
                f"EP_SEARCH_ITERATIVE_SCAN must be one of {', '.join(ITERATIVE_SCAN_MODES)}, "
                f"got {self.iterative_scan!r}"
            )
        for name in ("rrf_k", "hybrid_candidates", "max_scan_tuples"):
            if getattr(self, name) < 1:
                raise ValueError(f"EP_SEARCH_{name.upper()} must be at least 1")
        if self.exact_below_rows < 0:
            raise ValueError("EP_SEARCH_EXACT_BELOW_ROWS must not be negative")


@dataclass(frozen=True)
class EmbeddedDatabaseSettings:
    """The PostgreSQL+pgvector server the CLI starts when no DATABASE_URL is given."""

    data_dir: Path = PROJECT_ROOT / ".pgdata"
    host: str = "127.0.0.1"
    port: int = 55432
    database: str = "embedding_pipeline"
    user: str = "postgres"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"


def _described(default: Any, description: str) -> Any:
    """A dataclass field with its description (the Dagster resource built from the
    dataclass shows it in the launchpad)."""
    return field(default=default, metadata={"description": description})


@dataclass(frozen=True)
class EmbedderSettings:
    """Which model embeds and how hard it may be pushed; `provider` is one of local,
    openai, ollama. None means the provider's default.

    The one definition of the embedder's fields: `EmbedderResource` declares one config
    field per field here, with the description given here (`resources/embedder.py`).
    """

    provider: str = _described("local", "local (offline, the default), openai or ollama")
    model: str | None = _described(None, "the provider's model; None: its default")
    dimensions: int | None = _described(None, "vector size, when not the model's own")
    batch_size: int | None = _described(
        None, "rows per provider request; None: the provider's default"
    )
    concurrency: int | None = _described(
        None, "provider requests in flight per run; None: the provider's default"
    )
    openai_base_url: str | None = _described(
        None, "an OpenAI-compatible endpoint; None: api.openai.com"
    )
    ollama_host: str = _described("http://127.0.0.1:11434", "the Ollama server")
    ollama_max_input_tokens: int | None = _described(
        None, "Ollama inputs are cut to this many tokens; None: the model's context"
    )
    timeout_seconds: float = _described(60.0, "one request's time limit")
    retry_deadline_seconds: float = _described(
        300.0, "how long one request keeps retrying transient failures"
    )
    requests_per_minute: float | None = _described(None, "client-side limit; None: none")
    tokens_per_minute: float | None = _described(None, "client-side limit; None: none")
    #: Part of the stored model id: changing a prefix re-embeds.
    query_prefix: str | None = _described(
        None,
        "text before every search query (EP_QUERY_PREFIX); None: the model's known prompt "
        "(lib/embedders/catalog.py), empty: none",
    )
    document_prefix: str | None = _described(
        None,
        "text before every document embedded (EP_DOCUMENT_PREFIX); None: the model's known "
        "prompt, empty: none",
    )
    vector_type: str = _described(
        "vector",
        "how vectors are stored and indexed (EP_VECTOR_TYPE): vector (float4, HNSW up to "
        "2,000 dimensions) or halfvec (float2: half the size, HNSW up to 4,000)",
    )

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size or DEFAULT_BATCH_SIZES.get(self.provider, 64)


@dataclass(frozen=True)
class EngineSettings:
    """What a run does with rows the provider refuses, and how often it reports."""

    row_max_attempts: int = 3
    row_retry_base_seconds: float = 300.0
    progress_interval_seconds: float = 5.0
    #: Rows claimed per claim transaction; None: derived from batch size and concurrency.
    claim_size: int | None = None
    #: Connections that write a run's vectors; 1: the run's own connection, between its
    #: claims (docs/operations.md, "Concurrency: the claim design").
    write_connections: int = DEFAULT_WRITE_CONNECTIONS
    #: A backfill's partitions per run; None: one run for the whole range. With a number,
    #: a backfill fans out over that many partitions a run, which the run queue and the
    #: run launcher spread over workers (docs/deployment.md).
    backfill_partitions_per_run: int | None = None


@dataclass(frozen=True)
class ApiSettings:
    """The search service (`embedding-pipeline serve`) and the limits every search keeps.
    The API keys are not kept here: `api_keys()` reads them when the service starts."""

    #: Longest query, in characters, that a search accepts (HTTP 422 above it).
    max_query_chars: int = 2_000
    #: Largest request body the service reads, in bytes (HTTP 413 above it).
    max_body_bytes: int = 65_536
    #: How long one statement of a request may run (HTTP 504 "took too long" after it).
    statement_timeout_seconds: float = 5.0
    #: Database connections the service holds at most.
    db_pool_size: int = 8
    #: Threads embedding queries; None: the provider's default (1 local, 4 openai, 2 ollama).
    embed_workers: int | None = None
    #: Recent query vectors kept, by model and text; 0: none.
    query_cache_size: int = 1_024
    #: Browser origins allowed to call the service (CORS); none by default.
    cors_origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    embedded: EmbeddedDatabaseSettings = field(default_factory=EmbeddedDatabaseSettings)
    embedder: EmbedderSettings = field(default_factory=EmbedderSettings)
    tables: Mapping[str, TableSpec] = field(default_factory=default_tables)
    hnsw: HnswSettings = field(default_factory=HnswSettings)
    sensor: SensorSettings = field(default_factory=SensorSettings)
    checks: CheckSettings = field(default_factory=CheckSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    partition_start: str = "2024-01-01"
    extraction_table: str = "extractions"

    @property
    def uses_embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def effective_database_url(self) -> str:
        return self.database_url or self.embedded.url


class SettingsError(ValueError):
    """A setting is malformed or out of range; the message names the variable."""
