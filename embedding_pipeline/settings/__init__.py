"""Every setting of the pipeline, read from the environment in exactly one place.

`load_settings()` is called by the composition root (`definitions.py`) and by the CLI;
nothing else reads environment variables. Tests build `Settings` directly.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from urllib.parse import urlsplit

from embedding_pipeline.lib.engine.options import DEFAULT_WRITE_CONNECTIONS
from embedding_pipeline.lib.store.conninfo import URL_FORMS, connection_problem, redact_url
from embedding_pipeline.lib.store.domain import (
    MAX_INDEXED_DIMENSIONS,
    SEARCH_FILTER_COLUMNS,
    SHADOW_SUFFIX,
    VECTOR_TYPES,
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

    interval_seconds: int = 30
    max_extractions_per_tick: int = 200
    #: How long an extraction id missing below the cursor (a transaction still running,
    #: or one rolled back) is watched for before the sensor stops looking for it.
    gap_grace_seconds: int = 600
    #: Seconds between ticks of the backlog sensor (rows missing, stale or due for a retry
    #: by any cause, and missing HNSW indexes).
    backlog_interval_seconds: int = 300


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


#: Rows per provider request when EP_BATCH_SIZE is not set: the local model pads each
#: request to its longest text, OpenAI's fixed cost per request rewards large ones, and
#: Ollama embeds a request's inputs one after another.
DEFAULT_BATCH_SIZES = {"local": 64, "openai": 256, "ollama": 32}


@dataclass(frozen=True)
class EmbedderSettings:
    """Which model embeds and how hard it may be pushed; `provider` is one of local,
    openai, ollama. None means the provider's default."""

    provider: str = "local"
    model: str | None = None
    dimensions: int | None = None
    batch_size: int | None = None
    concurrency: int | None = None
    openai_base_url: str | None = None
    ollama_host: str = "http://127.0.0.1:11434"
    ollama_max_input_tokens: int | None = None
    timeout_seconds: float = 60.0
    retry_deadline_seconds: float = 300.0
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    #: Text put before every search query / every document embedded (EP_QUERY_PREFIX,
    #: EP_DOCUMENT_PREFIX); None: the model's known prompts (lib/embedders/catalog.py),
    #: "" none. Part of the stored model id: changing one re-embeds.
    query_prefix: str | None = None
    document_prefix: str | None = None
    #: How vectors are stored and indexed (EP_VECTOR_TYPE): `vector` (float4, HNSW up to
    #: 2,000 dimensions) or `halfvec` (float2: half the size, HNSW up to 4,000).
    vector_type: str = "vector"

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


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise SettingsError(f"{name} must be a number, got {raw!r}")
    return value


def _checks_from_env(env: Mapping[str, str]) -> CheckSettings:
    d = CheckSettings()
    return CheckSettings(
        recall_threshold=_float(env, "EP_CHECK_RECALL_THRESHOLD", d.recall_threshold),
        recall_sample_size=_int(env, "EP_CHECK_RECALL_SAMPLE_SIZE", d.recall_sample_size),
        k=_int(env, "EP_CHECK_K", d.k),
        latency_sample_size=_int(env, "EP_CHECK_LATENCY_SAMPLE_SIZE", d.latency_sample_size),
        latency_warn_ms=_float(env, "EP_CHECK_LATENCY_WARN_MS", d.latency_warn_ms),
        planner_warn_rows=_int(env, "EP_CHECK_PLANNER_WARN_ROWS", d.planner_warn_rows),
        sample_ids=_int(env, "EP_CHECK_SAMPLE_IDS", d.sample_ids),
        dimension_sample_size=_int(env, "EP_CHECK_DIMENSION_SAMPLE_SIZE", d.dimension_sample_size),
        schedule_cron=env.get("EP_CHECK_SCHEDULE", d.schedule_cron),
        run_recall_sample_size=_int(
            env, "EP_CHECK_RUN_RECALL_SAMPLE_SIZE", d.run_recall_sample_size
        ),
        run_latency_sample_size=_int(
            env, "EP_CHECK_RUN_LATENCY_SAMPLE_SIZE", d.run_latency_sample_size
        ),
        freshness_warn_minutes=_float(env, "EP_FRESHNESS_WARN_MINUTES", d.freshness_warn_minutes),
        eval_questions=Path(env["EP_EVAL_QUESTIONS"]) if env.get("EP_EVAL_QUESTIONS") else None,
        eval_min_recall=_float(env, "EP_EVAL_MIN_RECALL", d.eval_min_recall),
        eval_min_mrr=_float(env, "EP_EVAL_MIN_MRR", d.eval_min_mrr),
    )


def _search_from_env(env: Mapping[str, str]) -> SearchSettings:
    d = SearchSettings()
    return SearchSettings(
        text_language=env.get("EP_SEARCH_TEXT_LANGUAGE") or d.text_language,
        rrf_k=_int(env, "EP_SEARCH_RRF_K", d.rrf_k),
        hybrid_candidates=_int(env, "EP_SEARCH_HYBRID_CANDIDATES", d.hybrid_candidates),
        iterative_scan=(env.get("EP_SEARCH_ITERATIVE_SCAN") or d.iterative_scan).lower(),
        max_scan_tuples=_int(env, "EP_SEARCH_MAX_SCAN_TUPLES", d.max_scan_tuples),
        exact_below_rows=_int(env, "EP_SEARCH_EXACT_BELOW_ROWS", d.exact_below_rows),
    )


def _api_from_env(env: Mapping[str, str]) -> ApiSettings:
    d = ApiSettings()
    origins = env.get("EP_API_CORS_ORIGINS") or ""
    return ApiSettings(
        max_query_chars=_int(env, "EP_API_MAX_QUERY_CHARS", d.max_query_chars),
        max_body_bytes=_int(env, "EP_API_MAX_BODY_BYTES", d.max_body_bytes),
        statement_timeout_seconds=_float(
            env, "EP_API_STATEMENT_TIMEOUT_SECONDS", d.statement_timeout_seconds
        ),
        db_pool_size=_int(env, "EP_API_DB_POOL_SIZE", d.db_pool_size),
        embed_workers=_optional_int(env, "EP_API_EMBED_WORKERS"),
        query_cache_size=_int(env, "EP_API_QUERY_CACHE_SIZE", d.query_cache_size),
        cors_origins=tuple(o.strip() for o in origins.split(",") if o.strip()),
    )


def api_keys(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The search service's API keys from EP_API_KEYS: comma-separated keys, or an absolute
    path (starting with `/`) to a file of keys (one per line or comma-separated; blank
    lines and `#` comments ignored). Empty or unset: no keys. Like OPENAI_API_KEY, never
    kept in `Settings`; a `SettingsError` never shows a key."""
    env = os.environ if env is None else env
    raw = (env.get("EP_API_KEYS") or "").strip()
    if not raw:
        return ()
    if raw.startswith("/"):
        try:
            text = Path(raw).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise SettingsError(f"EP_API_KEYS names the file {raw!r}: {reason}") from None
        lines = [line.split("#", 1)[0] for line in text.splitlines()]
        raw, where = ",".join(lines), f"the file {raw!r}"
    else:
        where = "EP_API_KEYS"
    keys = tuple(dict.fromkeys(k.strip() for k in raw.split(",") if k.strip()))
    if not keys:
        raise SettingsError(f"EP_API_KEYS is set but {where} holds no key")
    if not all(key.isascii() and key.isprintable() and " " not in key for key in keys):
        raise SettingsError(
            f"a key in {where} contains a space, a control or a non-ASCII character (an HTTP "
            "header could not carry it)"
        )
    return keys


def openai_api_key(env: Mapping[str, str] | None = None) -> str | None:
    """OPENAI_API_KEY, read when a client is built and never kept in `Settings` (Dagster
    runs get it through `dg.EnvVar` instead)."""
    env = os.environ if env is None else env
    return env.get("OPENAI_API_KEY") or None


def _table_from_env(env: Mapping[str, str], key: str, spec: TableSpec) -> TableSpec:
    prefix = f"EP_{key.upper()}_"
    text_columns = env.get(prefix + "TEXT_COLUMNS")
    return replace(
        spec,
        table=env.get(prefix + "TABLE", spec.table),
        id_column=env.get(prefix + "ID_COLUMN", spec.id_column),
        text_columns=(
            tuple(c.strip() for c in text_columns.split(",") if c.strip())
            if text_columns
            else spec.text_columns
        ),
        partition_column=env.get(prefix + "PARTITION_COLUMN", spec.partition_column),
        embedding_column=env.get(prefix + "EMBEDDING_COLUMN", spec.embedding_column),
    )


def _optional_int(env: Mapping[str, str], name: str) -> int | None:
    return _int(env, name, 0) or None


def _optional_float(env: Mapping[str, str], name: str) -> float | None:
    return _float(env, name, 0.0) or None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from environment variables (the README's Configuration table);
    `SettingsError` names the first variable that is malformed or cannot work."""
    env = os.environ if env is None else env
    embedded_defaults = EmbeddedDatabaseSettings()
    embedded = EmbeddedDatabaseSettings(
        data_dir=Path(env.get("EP_PGDATA", str(embedded_defaults.data_dir))).resolve(),
        port=_int(env, "EP_PG_PORT", embedded_defaults.port),
        database=env.get("EP_PG_DATABASE", embedded_defaults.database),
    )
    embedder = EmbedderSettings(
        provider=env.get("EP_EMBEDDING_PROVIDER", "local").lower(),
        model=env.get("EP_EMBEDDING_MODEL") or None,
        dimensions=_optional_int(env, "EP_EMBEDDING_DIMENSIONS"),
        batch_size=_optional_int(env, "EP_BATCH_SIZE"),
        concurrency=_optional_int(env, "EP_EMBEDDING_CONCURRENCY"),
        openai_base_url=env.get("OPENAI_BASE_URL") or None,
        ollama_host=env.get("OLLAMA_HOST", EmbedderSettings.ollama_host),
        ollama_max_input_tokens=_optional_int(env, "EP_OLLAMA_MAX_INPUT_TOKENS"),
        timeout_seconds=_float(
            env, "EP_EMBEDDING_TIMEOUT_SECONDS", EmbedderSettings.timeout_seconds
        ),
        retry_deadline_seconds=_float(
            env, "EP_RETRY_DEADLINE_SECONDS", EmbedderSettings.retry_deadline_seconds
        ),
        requests_per_minute=_optional_float(env, "EP_RATE_LIMIT_REQUESTS_PER_MINUTE"),
        tokens_per_minute=_optional_float(env, "EP_RATE_LIMIT_TOKENS_PER_MINUTE"),
        query_prefix=env.get("EP_QUERY_PREFIX"),
        document_prefix=env.get("EP_DOCUMENT_PREFIX"),
        vector_type=(env.get("EP_VECTOR_TYPE") or EmbedderSettings.vector_type).strip().lower(),
    )
    engine = EngineSettings(
        row_max_attempts=_int(env, "EP_ROW_MAX_ATTEMPTS", EngineSettings.row_max_attempts),
        row_retry_base_seconds=_float(
            env, "EP_ROW_RETRY_BASE_SECONDS", EngineSettings.row_retry_base_seconds
        ),
        progress_interval_seconds=_float(
            env, "EP_PROGRESS_INTERVAL_SECONDS", EngineSettings.progress_interval_seconds
        ),
        claim_size=_optional_int(env, "EP_CLAIM_SIZE"),
        write_connections=_int(env, "EP_WRITE_CONNECTIONS", EngineSettings.write_connections),
        backfill_partitions_per_run=_optional_int(env, "EP_BACKFILL_PARTITIONS_PER_RUN"),
    )
    tables = {key: _table_from_env(env, key, spec) for key, spec in default_tables().items()}
    settings = Settings(
        database_url=env.get("DATABASE_URL") or None,
        embedded=embedded,
        embedder=embedder,
        tables=tables,
        hnsw=HnswSettings(
            m=_int(env, "EP_HNSW_M", HnswSettings.m),
            ef_construction=_int(env, "EP_HNSW_EF_CONSTRUCTION", HnswSettings.ef_construction),
            ef_search=_int(env, "EP_HNSW_EF_SEARCH", HnswSettings.ef_search),
            bulk_load_min_rows=_int(
                env, "EP_HNSW_BULK_LOAD_MIN_ROWS", HnswSettings.bulk_load_min_rows
            ),
            rebuild_fraction=_float(env, "EP_HNSW_REBUILD_FRACTION", HnswSettings.rebuild_fraction),
            bulk_load_max_indexed_rows=_int(
                env,
                "EP_HNSW_BULK_LOAD_MAX_INDEXED_ROWS",
                HnswSettings.bulk_load_max_indexed_rows,
            ),
            build_memory_mb=_int(env, "EP_HNSW_BUILD_MEMORY_MB", HnswSettings.build_memory_mb),
            build_workers=(
                _int(env, "EP_HNSW_BUILD_WORKERS", 0) if env.get("EP_HNSW_BUILD_WORKERS") else None
            ),
        ),
        sensor=SensorSettings(
            interval_seconds=_int(
                env, "EP_SENSOR_INTERVAL_SECONDS", SensorSettings.interval_seconds
            ),
            max_extractions_per_tick=_int(
                env, "EP_SENSOR_MAX_EXTRACTIONS", SensorSettings.max_extractions_per_tick
            ),
            backlog_interval_seconds=_int(
                env, "EP_BACKLOG_SENSOR_INTERVAL_SECONDS", SensorSettings.backlog_interval_seconds
            ),
        ),
        checks=_checks_from_env(env),
        engine=engine,
        search=_search_from_env(env),
        api=_api_from_env(env),
        partition_start=env.get("EP_PARTITION_START", Settings.partition_start),
        extraction_table=env.get("EP_EXTRACTION_TABLE", Settings.extraction_table),
    )
    return validate_settings(settings)


# -- validation -----------------------------------------------------------------------

#: The embedding providers `EP_EMBEDDING_PROVIDER` may name (lib/embedders builds them).
PROVIDERS = ("local", "openai", "ollama")
#: PostgreSQL cuts longer names short (NAMEDATALEN - 1), so an index made under a longer
#: name would never be found again under it.
MAX_IDENTIFIER_BYTES = 63
#: The most EP_API_MAX_QUERY_CHARS may allow: a 1 MB query held PostgreSQL's text search for
#: 40 s before it failed with "stack depth limit exceeded".
MAX_QUERY_CHARS = 100_000


def _whole_number_ranges(s: Settings) -> list[tuple[str, int | None, int, int | None]]:
    """(variable, value, lowest, highest) of the integer settings; None: no bound."""
    return [
        ("EP_PG_PORT", s.embedded.port, 1, 65535),
        (
            "EP_EMBEDDING_DIMENSIONS",
            s.embedder.dimensions,
            1,
            MAX_INDEXED_DIMENSIONS[s.embedder.vector_type],
        ),
        ("EP_BATCH_SIZE", s.embedder.batch_size, 1, None),
        ("EP_EMBEDDING_CONCURRENCY", s.embedder.concurrency, 1, 64),
        ("EP_OLLAMA_MAX_INPUT_TOKENS", s.embedder.ollama_max_input_tokens, 1, None),
        ("EP_ROW_MAX_ATTEMPTS", s.engine.row_max_attempts, 1, None),
        ("EP_CLAIM_SIZE", s.engine.claim_size, 1, None),
        ("EP_WRITE_CONNECTIONS", s.engine.write_connections, 1, 8),
        ("EP_BACKFILL_PARTITIONS_PER_RUN", s.engine.backfill_partitions_per_run, 1, None),
        ("EP_HNSW_M", s.hnsw.m, 2, 100),
        ("EP_HNSW_EF_CONSTRUCTION", s.hnsw.ef_construction, max(4, 2 * s.hnsw.m), 1000),
        ("EP_HNSW_EF_SEARCH", s.hnsw.ef_search, 1, 1000),
        ("EP_HNSW_BULK_LOAD_MIN_ROWS", s.hnsw.bulk_load_min_rows, 0, None),
        ("EP_HNSW_BULK_LOAD_MAX_INDEXED_ROWS", s.hnsw.bulk_load_max_indexed_rows, 0, None),
        ("EP_HNSW_BUILD_MEMORY_MB", s.hnsw.build_memory_mb, 1, None),
        ("EP_HNSW_BUILD_WORKERS", s.hnsw.build_workers, 0, 64),
        ("EP_SENSOR_INTERVAL_SECONDS", s.sensor.interval_seconds, 1, None),
        ("EP_SENSOR_MAX_EXTRACTIONS", s.sensor.max_extractions_per_tick, 1, None),
        ("EP_BACKLOG_SENSOR_INTERVAL_SECONDS", s.sensor.backlog_interval_seconds, 1, None),
        ("EP_CHECK_RECALL_SAMPLE_SIZE", s.checks.recall_sample_size, 1, None),
        ("EP_CHECK_K", s.checks.k, 1, None),
        ("EP_CHECK_LATENCY_SAMPLE_SIZE", s.checks.latency_sample_size, 1, None),
        ("EP_CHECK_RUN_RECALL_SAMPLE_SIZE", s.checks.run_recall_sample_size, 1, None),
        ("EP_CHECK_RUN_LATENCY_SAMPLE_SIZE", s.checks.run_latency_sample_size, 1, None),
        ("EP_CHECK_PLANNER_WARN_ROWS", s.checks.planner_warn_rows, 0, None),
        ("EP_CHECK_SAMPLE_IDS", s.checks.sample_ids, 1, None),
        ("EP_CHECK_DIMENSION_SAMPLE_SIZE", s.checks.dimension_sample_size, 1, None),
        ("EP_API_MAX_QUERY_CHARS", s.api.max_query_chars, 1, MAX_QUERY_CHARS),
        ("EP_API_MAX_BODY_BYTES", s.api.max_body_bytes, 1024, None),
        ("EP_API_DB_POOL_SIZE", s.api.db_pool_size, 1, 1000),
        ("EP_API_EMBED_WORKERS", s.api.embed_workers, 1, 64),
        ("EP_API_QUERY_CACHE_SIZE", s.api.query_cache_size, 0, None),
    ]


#: Why a bound is what it is, where the number alone does not say.
_BOUND_REASONS = {
    "EP_EMBEDDING_DIMENSIONS": "pgvector's HNSW index takes vector up to 2000 dimensions "
    "and halfvec (EP_VECTOR_TYPE=halfvec) up to 4000",
    "EP_HNSW_M": "pgvector's limits",
    "EP_HNSW_EF_CONSTRUCTION": "pgvector's limits, and at least twice EP_HNSW_M",
    "EP_HNSW_EF_SEARCH": "pgvector's limits",
    "EP_API_MAX_QUERY_CHARS": "PostgreSQL's text search can exhaust its stack on longer input",
}


def _positive_ranges(s: Settings) -> list[tuple[str, float, float | None]]:
    """(variable, value, highest) of the settings that must be above 0."""
    return [
        ("EP_EMBEDDING_TIMEOUT_SECONDS", s.embedder.timeout_seconds, None),
        ("EP_PROGRESS_INTERVAL_SECONDS", s.engine.progress_interval_seconds, None),
        *(
            (variable, value, None)
            for variable, value in (
                ("EP_RATE_LIMIT_REQUESTS_PER_MINUTE", s.embedder.requests_per_minute),
                ("EP_RATE_LIMIT_TOKENS_PER_MINUTE", s.embedder.tokens_per_minute),
            )
            if value is not None
        ),
        ("EP_CHECK_RECALL_THRESHOLD", s.checks.recall_threshold, 1.0),
        ("EP_HNSW_REBUILD_FRACTION", s.hnsw.rebuild_fraction, 1.0),
        ("EP_CHECK_LATENCY_WARN_MS", s.checks.latency_warn_ms, None),
        ("EP_FRESHNESS_WARN_MINUTES", s.checks.freshness_warn_minutes, None),
        ("EP_API_STATEMENT_TIMEOUT_SECONDS", s.api.statement_timeout_seconds, 3600.0),
    ]


def _check_fractions(s: Settings) -> None:
    for variable, value in (
        ("EP_EVAL_MIN_RECALL", s.checks.eval_min_recall),
        ("EP_EVAL_MIN_MRR", s.checks.eval_min_mrr),
    ):
        if not 0 <= value <= 1:
            raise SettingsError(f"{variable} must be a number from 0 to 1, got {value:g}")
    questions = s.checks.eval_questions
    if questions is not None and not questions.is_file():
        raise SettingsError(f"EP_EVAL_QUESTIONS names no file: {questions}")


def _check_numbers(s: Settings) -> None:
    for variable, value in (
        ("EP_RETRY_DEADLINE_SECONDS", s.embedder.retry_deadline_seconds),
        ("EP_ROW_RETRY_BASE_SECONDS", s.engine.row_retry_base_seconds),
    ):
        if value < 0:
            raise SettingsError(f"{variable} must be 0 or more seconds, got {value:g}")
    for variable, whole, low, high in _whole_number_ranges(s):
        if whole is not None and (whole < low or (high is not None and whole > high)):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            why = f" ({_BOUND_REASONS[variable]})" if variable in _BOUND_REASONS else ""
            raise SettingsError(f"{variable} must be a whole number {span}{why}, got {whole}")
    for variable, value, top in _positive_ranges(s):
        if value <= 0 or (top is not None and value > top):
            span = f"above 0 and at most {top:g}" if top is not None else "above 0"
            raise SettingsError(f"{variable} must be a number {span}, got {value:g}")
    fields = s.checks.schedule_cron.split()
    if len(fields) != 5 or not all(re.fullmatch(r"[0-9A-Za-z*,/?#-]+", f) for f in fields):
        raise SettingsError(
            "EP_CHECK_SCHEDULE must be a cron expression of 5 fields (minute hour day month "
            f"weekday), got {s.checks.schedule_cron!r}"
        )
    try:
        start: date | None = date.fromisoformat(s.partition_start)
    except ValueError:
        start = None
    if start is None or len(s.partition_start) != 10 or start.day != 1:
        raise SettingsError(
            f"EP_PARTITION_START must be the first day of a month (YYYY-MM-01), got "
            f"{s.partition_start!r}"
        )
    if start > datetime.now(UTC).date():
        raise SettingsError(
            f"EP_PARTITION_START ({s.partition_start}) is in the future: there would be no "
            "partition to embed into"
        )


@dataclass(frozen=True)
class PostgresName:
    """A name the settings give a PostgreSQL object: the setting itself (`made_as` None)
    or a name derived from it, such as `{table}_{column}_hnsw_idx` (`made_as` "index")."""

    variable: str
    name: str
    made_as: str | None = None


def postgres_names(settings: Settings) -> list[PostgresName]:
    """Every table, column, index and database name the settings make, with the names
    lib/schema.py and lib/model_switch.py derive from them."""
    names = [
        PostgresName("EP_EXTRACTION_TABLE", settings.extraction_table),
        PostgresName("EP_PG_DATABASE", settings.embedded.database),
    ]
    for key, spec in settings.tables.items():
        var = f"EP_{key.upper()}_"
        table, embedding = var + "TABLE", var + "EMBEDDING_COLUMN"
        shadow = spec.embedding_column + SHADOW_SUFFIX
        names += [
            PostgresName(table, spec.table),
            PostgresName(var + "ID_COLUMN", spec.id_column),
            PostgresName(var + "PARTITION_COLUMN", spec.partition_column),
            PostgresName(embedding, spec.embedding_column),
            *(PostgresName(var + "TEXT_COLUMNS", c) for c in spec.text_columns),
            PostgresName(embedding, shadow, "shadow column"),
            PostgresName(
                f"{table} and {var}PARTITION_COLUMN",
                f"{spec.table}_{spec.partition_column}_idx",
                "index",
            ),
            PostgresName(table, f"{spec.table}_{spec.extraction_column}_idx", "index"),
            PostgresName(
                f"{table} and {embedding}",
                f"{spec.table}_{spec.embedding_column}_hnsw_idx",
                "index",
            ),
            PostgresName(f"{table} and {embedding}", f"{spec.table}_{shadow}_hnsw_idx", "index"),
            PostgresName(
                f"{table} and {embedding}",
                f"{spec.table}_{spec.embedding_column}_pending_000000",
                "index",
            ),
            PostgresName(table, f"{spec.table}_embedding_tracking", "trigger function"),
            PostgresName(table, f"{spec.table}_{spec.tsv_column}_gin_idx", "index"),
            *(
                PostgresName(table, f"{spec.table}_{column}_idx", "index")
                for column in SEARCH_FILTER_COLUMNS
            ),
        ]
        if key == "atoms":
            names.append(PostgresName(table, f"{spec.table}_messages", "link table"))
    return names


def _check_name(n: PostgresName) -> None:
    size = len(n.name.encode())
    if n.made_as is None:
        subject = f"{n.variable} ({n.name!r})"
    else:
        subject = f"the {n.made_as} name {n.name!r} made from {n.variable}"
    if not n.name.strip():
        raise SettingsError(f"{n.variable} is empty; it must name a PostgreSQL object")
    if "\x00" in n.name:
        raise SettingsError(f"{subject} contains a NUL character")
    if n.made_as is None and n.variable.endswith("_TABLE") and "." in n.name:
        raise SettingsError(
            f"{subject} contains a dot: schema-qualified names are not supported; put the "
            "schema on the search_path of the database user instead"
        )
    if size > MAX_IDENTIFIER_BYTES:
        raise SettingsError(
            f"{subject} is {size} bytes long; PostgreSQL names hold at most "
            f"{MAX_IDENTIFIER_BYTES} bytes (a longer one is cut short and never found again)"
        )


def _check_tables(settings: Settings) -> None:
    owner: dict[str, str] = {}
    tables = [("EP_EXTRACTION_TABLE", settings.extraction_table)]
    tables += [(f"EP_{key.upper()}_TABLE", spec.table) for key, spec in settings.tables.items()]
    tables.append(("EP_ATOMS_TABLE", f"{settings.tables['atoms'].table}_messages"))
    for variable, table in tables:
        if table in owner:
            raise SettingsError(
                f"{variable} names the table {table!r}, which {owner[table]} already uses"
            )
        owner[table] = variable
    for key, spec in settings.tables.items():
        var = f"EP_{key.upper()}_"
        if not spec.text_columns:
            raise SettingsError(f"{var}TEXT_COLUMNS must name at least one column")
        if len(set(spec.text_columns)) != len(spec.text_columns):
            raise SettingsError(f"{var}TEXT_COLUMNS names a column twice")
        others = {
            spec.id_column,
            spec.partition_column,
            *spec.text_columns,
            spec.model_column,
            spec.hash_column,
            spec.embedded_at_column,
            spec.extraction_column,
        }
        if spec.embedding_column in others:
            raise SettingsError(
                f"{var}EMBEDDING_COLUMN ({spec.embedding_column!r}) is also one of the "
                "table's other columns; vectors need a column of their own"
            )


def _check_embedder(e: EmbedderSettings) -> None:
    from embedding_pipeline.lib.embedders.catalog import local_model_problem

    if e.provider not in PROVIDERS:
        raise SettingsError(
            f"EP_EMBEDDING_PROVIDER must be one of {', '.join(PROVIDERS)}, got {e.provider!r}"
        )
    if e.vector_type not in VECTOR_TYPES:
        raise SettingsError(
            f"EP_VECTOR_TYPE must be one of {', '.join(VECTOR_TYPES)}, got {e.vector_type!r}"
        )
    if e.provider == "local":
        problem = local_model_problem(e.model)
        if problem:
            raise SettingsError(problem)
    _check_model_size(e)
    if e.openai_base_url is not None:
        try:
            parts = urlsplit(e.openai_base_url)
            usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            usable = False
        if not usable:
            raise SettingsError(
                "OPENAI_BASE_URL must be an http(s) URL such as https://api.openai.com/v1, got "
                f"{redact_url(e.openai_base_url)!r}"
            )


def _check_cors_origins(origins: tuple[str, ...]) -> None:
    for origin in origins:
        if origin == "*":
            continue
        try:
            parts = urlsplit(origin)
            usable = parts.scheme in ("http", "https") and bool(parts.hostname)
            usable = usable and parts.path in ("", "/") and not parts.query and parts.port != 0
        except ValueError:
            usable = False
        if not usable:
            raise SettingsError(
                "EP_API_CORS_ORIGINS must list origins such as https://app.example.com "
                f"(scheme, host and port only) or *, got {origin!r}"
            )


def _check_model_size(e: EmbedderSettings) -> None:
    """A model whose vectors the configured storage type cannot index is refused now, with
    the way out, rather than when the first index is built."""
    from embedding_pipeline.lib.embedders import expected_dimension, expected_model_id

    try:
        dimension = expected_dimension(e.provider, e.model, e.dimensions)
        model_id = expected_model_id(
            e.provider, e.model, e.dimensions, e.query_prefix, e.document_prefix
        )
    except ValueError as exc:
        if "is not known" in str(exc):
            return  # a model of unknown size: EP_EMBEDDING_DIMENSIONS is asked for at run time
        raise SettingsError(str(exc)) from None
    limit = MAX_INDEXED_DIMENSIONS[e.vector_type]
    if dimension > limit:
        hint = (
            "set EP_VECTOR_TYPE=halfvec (HNSW up to 4000 dimensions, half the size) or "
            "EP_EMBEDDING_DIMENSIONS to at most 2000"
            if e.vector_type == "vector"
            else "set EP_EMBEDDING_DIMENSIONS to at most 4000"
        )
        raise SettingsError(
            f"{model_id} makes {dimension}-dimension vectors; pgvector's "
            f"HNSW index takes {e.vector_type} up to {limit}: {hint}"
        )


def validate_settings(settings: Settings) -> Settings:
    """`settings`, or `SettingsError` naming the first variable that cannot work."""
    if settings.database_url is not None:
        problem = connection_problem(settings.database_url)
        if problem:
            raise SettingsError(
                f"DATABASE_URL ({redact_url(settings.database_url)}) is not a PostgreSQL "
                f"connection string ({URL_FORMS}): {problem}"
            )
    _check_embedder(settings.embedder)
    _check_numbers(settings)
    _check_cors_origins(settings.api.cors_origins)
    _check_fractions(settings)
    for name in postgres_names(settings):
        _check_name(name)
    _check_tables(settings)
    return settings
