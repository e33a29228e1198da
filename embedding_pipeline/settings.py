"""Every setting of the pipeline, read from the environment in exactly one place.

`load_settings()` is called by the composition root (`definitions.py`) and by the CLI;
nothing else reads environment variables. Tests build `Settings` directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path


def _project_root() -> Path:
    """The source checkout this package runs from, or the working directory when the
    package is installed elsewhere (site-packages is no place for data)."""
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


#: Where the embedded database (`.pgdata`) and the local Dagster instance live by default.
PROJECT_ROOT = _project_root()


@dataclass(frozen=True)
class TableSpec:
    """Where one embedded entity lives and which of its columns the pipeline reads and writes.

    Every name is a setting so the pipeline can be pointed at an existing application
    database: the text the model sees is the non-NULL `text_columns` joined by newlines.
    """

    entity: str
    table: str
    text_columns: tuple[str, ...]
    partition_column: str
    id_column: str = "id"
    embedding_column: str = "embedding"
    model_column: str = "embedding_model"
    hash_column: str = "embedding_hash"
    embedded_at_column: str = "embedded_at"
    extraction_column: str = "extraction_id"
    #: Generated tsvector of the text columns (full-text and hybrid search).
    tsv_column: str = "search_tsv"

    @property
    def asset_name(self) -> str:
        return f"{self.entity}_embeddings"

    @property
    def source_asset_name(self) -> str:
        return self.table if self.table.isidentifier() else self.entity


def default_tables() -> dict[str, TableSpec]:
    return {
        "messages": TableSpec(
            entity="message",
            table="messages",
            text_columns=("content",),
            partition_column="sent_at",
        ),
        "topics": TableSpec(
            entity="topic",
            table="topics",
            text_columns=("name", "description"),
            partition_column="created_at",
        ),
        "atoms": TableSpec(
            entity="atom",
            table="atoms",
            text_columns=("title", "content"),
            partition_column="created_at",
        ),
    }


@dataclass(frozen=True)
class HnswSettings:
    """HNSW index parameters, and when a run builds the index after loading instead.

    A run with at least `bulk_load_min_rows` pending rows, more than the index already
    holds, loads without the index and builds it at the end (measurements in
    docs/operations.md).
    """

    m: int = 16
    ef_construction: int = 64
    ef_search: int = 40
    bulk_load_min_rows: int = 2_000


@dataclass(frozen=True)
class SensorSettings:
    """The extraction sensor: how often it looks and how much it takes per tick."""

    interval_seconds: int = 30
    max_extractions_per_tick: int = 200
    #: How long an extraction id missing below the cursor (a transaction still running,
    #: or one rolled back) is watched for before the sensor stops looking for it.
    gap_grace_seconds: int = 600


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


@dataclass(frozen=True)
class EmbedderSettings:
    """Which model embeds; `provider` is one of local, openai, ollama."""

    provider: str = "local"
    model: str | None = None
    dimensions: int | None = None
    batch_size: int = 64
    openai_base_url: str | None = None
    ollama_host: str = "http://127.0.0.1:11434"
    timeout_seconds: float = 60.0


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    embedded: EmbeddedDatabaseSettings = field(default_factory=EmbeddedDatabaseSettings)
    embedder: EmbedderSettings = field(default_factory=EmbedderSettings)
    tables: Mapping[str, TableSpec] = field(default_factory=default_tables)
    hnsw: HnswSettings = field(default_factory=HnswSettings)
    sensor: SensorSettings = field(default_factory=SensorSettings)
    checks: CheckSettings = field(default_factory=CheckSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    partition_start: str = "2024-01-01"
    extraction_table: str = "extractions"

    @property
    def uses_embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def effective_database_url(self) -> str:
        return self.database_url or self.embedded.url


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


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


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from environment variables (the README's Configuration table)."""
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
        dimensions=_int(env, "EP_EMBEDDING_DIMENSIONS", 0) or None,
        batch_size=_int(env, "EP_BATCH_SIZE", EmbedderSettings.batch_size),
        openai_base_url=env.get("OPENAI_BASE_URL") or None,
        ollama_host=env.get("OLLAMA_HOST", EmbedderSettings.ollama_host),
    )
    tables = {key: _table_from_env(env, key, spec) for key, spec in default_tables().items()}
    return Settings(
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
        ),
        sensor=SensorSettings(
            interval_seconds=_int(
                env, "EP_SENSOR_INTERVAL_SECONDS", SensorSettings.interval_seconds
            ),
            max_extractions_per_tick=_int(
                env, "EP_SENSOR_MAX_EXTRACTIONS", SensorSettings.max_extractions_per_tick
            ),
        ),
        checks=_checks_from_env(env),
        search=_search_from_env(env),
        partition_start=env.get("EP_PARTITION_START", Settings.partition_start),
        extraction_table=env.get("EP_EXTRACTION_TABLE", Settings.extraction_table),
    )
