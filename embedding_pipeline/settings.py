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
    #: SHA-256 of the row's current text, kept by a trigger (`schema.ensure_tracking`), so
    #: that finding rows whose text changed is an index lookup, not a hash of every row.
    source_hash_column: str = "embedding_source_hash"
    #: When the row last started to need an embedding (inserted, text changed, vector
    #: removed); kept by the same trigger, read by the freshness check.
    pending_since_column: str = "embedding_pending_since"

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
        engine=engine,
        partition_start=env.get("EP_PARTITION_START", Settings.partition_start),
        extraction_table=env.get("EP_EXTRACTION_TABLE", Settings.extraction_table),
    )
