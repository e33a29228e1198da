"""Whether settings can work: ranges, names PostgreSQL can hold, a model whose vectors the
storage type can index. `validate_settings` raises `SettingsError` naming the variable."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from urllib.parse import urlsplit

from embedding_pipeline.lib.embedders import PROVIDERS, expected_dimension, expected_model_id
from embedding_pipeline.lib.embedders.catalog import local_model_problem, provider_problem
from embedding_pipeline.lib.store.conninfo import URL_FORMS, connection_problem, redact_url
from embedding_pipeline.lib.store.domain import (
    MAX_INDEXED_DIMENSIONS,
    SEARCH_FILTER_COLUMNS,
    SHADOW_SUFFIX,
    VECTOR_TYPES,
)
from embedding_pipeline.settings.model import EmbedderSettings, Settings, SettingsError

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
        ("EP_BACKLOG_FAILURE_BACKOFF_SECONDS", s.sensor.backlog_failure_backoff_seconds, 0, None),
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
    lib/store/ and lib/engine/model_switch.py derive from them."""
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
    if e.provider not in PROVIDERS:
        raise SettingsError(
            f"EP_EMBEDDING_PROVIDER must be one of {', '.join(PROVIDERS)}, got {e.provider!r}"
        )
    missing = provider_problem(e.provider)
    if missing:
        raise SettingsError(f"EP_EMBEDDING_PROVIDER: {missing}")
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
