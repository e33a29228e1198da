"""Reading the settings from environment variables: `load_settings()` is called by the
composition root (`definitions.py`) and by the CLI; nothing else reads the environment.
Secrets (`OPENAI_API_KEY`, `EP_API_KEYS`) are read when needed and never kept in `Settings`."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from embedding_pipeline.lib.store.domain import (
    HnswSettings,
    TableSpec,
    default_tables,
)
from embedding_pipeline.settings.model import (
    ApiSettings,
    CheckSettings,
    EmbeddedDatabaseSettings,
    EmbedderSettings,
    EngineSettings,
    SearchSettings,
    SensorSettings,
    Settings,
    SettingsError,
)
from embedding_pipeline.settings.validation import validate_settings


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
            backlog_failure_backoff_seconds=_int(
                env,
                "EP_BACKLOG_FAILURE_BACKOFF_SECONDS",
                SensorSettings.backlog_failure_backoff_seconds,
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
