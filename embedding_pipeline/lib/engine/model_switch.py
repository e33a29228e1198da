"""Switching the embedding model of a table without mixing two models in one column.

The new model's vectors go into shadow columns (`embedding_next` of the new dimension,
with its own model, hash and time columns), filled by the same batch machinery as every
run (`sync_embeddings` on a `TableSpec` naming the shadow columns: resumable, crash-safe,
concurrency-safe). Then the shadow gets its HNSW index (built concurrently) and one short
transaction swaps every table's shadow in at once: the old columns and indexes are
dropped, the shadow ones renamed, and the registry table `embedding_models` records each
column's new model. Until that
moment search keeps using the old vectors and index; after it, only new-model vectors
exist (rows that arrived since the last pass are NULL and embedded by the next run).

Runs configured for another model than the registered one refuse to write
(`preflight.check_model`), so a forgotten configuration change fails loudly instead of
re-embedding the column back to the old model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import psycopg
from psycopg import sql

from embedding_pipeline.lib.embedders.base import Embedder
from embedding_pipeline.lib.engine.options import Progress, SyncResult
from embedding_pipeline.lib.engine.run import sync_embeddings
from embedding_pipeline.lib.store.catalog import (
    column_type_sql,
    index_state,
    relation_exists,
    vector_column_dimension,
    vector_column_type,
)
from embedding_pipeline.lib.store.db import connect
from embedding_pipeline.lib.store.domain import SHADOW_SUFFIX, HnswSettings, TableSpec, Window
from embedding_pipeline.lib.store.hnsw import build_hnsw_index_concurrently, hnsw_index_name
from embedding_pipeline.lib.store.schema import (
    MODEL_REGISTRY_TABLE,
    SCHEMA_LOCK_KEY,
    STATE_TABLE,
    SchemaError,
    registered_model,
    set_state,
)

#: How long the swap waits for its table lock before giving up (the command then says to
#: run it again; the filled shadow columns are kept).
SWAP_LOCK_TIMEOUT = "10s"


def shadow_spec(spec: TableSpec) -> TableSpec:
    """`spec` with the shadow columns in place of the live ones."""
    return replace(
        spec,
        embedding_column=spec.embedding_column + SHADOW_SUFFIX,
        model_column=spec.model_column + SHADOW_SUFFIX,
        hash_column=spec.hash_column + SHADOW_SUFFIX,
        embedded_at_column=spec.embedded_at_column + SHADOW_SUFFIX,
    )


def _column_pairs(spec: TableSpec) -> list[tuple[str, str]]:
    shadow = shadow_spec(spec)
    return [
        (spec.embedding_column, shadow.embedding_column),
        (spec.model_column, shadow.model_column),
        (spec.hash_column, shadow.hash_column),
        (spec.embedded_at_column, shadow.embedded_at_column),
    ]


@dataclass
class SwitchReport:
    table: str
    previous_model: str | None
    previous_dimension: int | None
    model_id: str
    dimension: int
    embedded: int = 0
    provider_requests: int = 0
    passes: int = 0
    index_seconds: float = 0.0
    swap_seconds: float = 0.0
    left_for_next_run: int = 0
    seconds: float = 0.0


def ensure_registry(conn: psycopg.Connection) -> None:
    conn.execute(
        sql.SQL("""
        CREATE TABLE IF NOT EXISTS {} (
            table_name text NOT NULL,
            column_name text NOT NULL,
            model_id text NOT NULL,
            dimension integer NOT NULL,
            switched_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (table_name, column_name)
        )""").format(sql.Identifier(MODEL_REGISTRY_TABLE))
    )


def prepare_shadow(
    conn: psycopg.Connection, spec: TableSpec, dimension: int, vector_type: str = "vector"
) -> None:
    """Add the shadow columns for a `dimension`-sized model stored as `vector_type` (kept
    if already there with that type, so an interrupted switch resumes). A shadow of
    another type is replaced only while empty; with vectors in it, that is another switch
    in progress."""
    shadow = shadow_spec(spec)
    table = sql.Identifier(spec.table)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        ensure_registry(conn)
        if vector_column_dimension(conn, spec) is None:
            raise SchemaError(
                f"{spec.table}.{spec.embedding_column} does not exist or is not "
                "a vector column; run `embedding-pipeline schema` first"
            )
        declared = vector_column_type(conn, shadow)
        if declared is not None and declared != (vector_type, dimension):
            filled = conn.execute(
                sql.SQL("SELECT count({}), max({}) FROM {}").format(
                    sql.Identifier(shadow.embedding_column),
                    sql.Identifier(shadow.model_column),
                    table,
                )
            ).fetchone()
            if filled and filled[0]:
                raise SchemaError(
                    f"{spec.table} has a switch to {filled[1]} ({declared[0]}({declared[1]})) in "
                    f"progress with {filled[0]} rows embedded; finish it with the same "
                    "model or discard it with `embedding-pipeline model switch --abort`"
                )
            _drop_shadow(conn, spec)
        for column, type_sql in (
            (shadow.embedding_column, column_type_sql(vector_type, dimension)),
            (shadow.model_column, sql.SQL("text")),
            (shadow.hash_column, sql.SQL("text")),
            (shadow.embedded_at_column, sql.SQL("timestamptz")),
        ):
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    table, sql.Identifier(column), type_sql
                )
            )


def _drop_shadow(conn: psycopg.Connection, spec: TableSpec) -> None:
    shadow = shadow_spec(spec)
    conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(hnsw_index_name(shadow))))
    conn.execute(
        sql.SQL("ALTER TABLE {} {}").format(
            sql.Identifier(spec.table),
            sql.SQL(", ").join(
                sql.SQL("DROP COLUMN IF EXISTS {}").format(sql.Identifier(new))
                for _, new in _column_pairs(spec)
            ),
        )
    )


def abort_switch(conn: psycopg.Connection, spec: TableSpec) -> bool:
    """Discard a switch in progress (shadow columns and index); True if there was one."""
    shadow = shadow_spec(spec)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        existed = vector_column_dimension(conn, shadow) is not None
        _drop_shadow(conn, spec)
    return existed


def fill_shadow(
    conn: psycopg.Connection,
    spec: TableSpec,
    embedder: Embedder,
    *,
    batch_size: int,
    on_progress: Callable[[Progress], None] | None = None,
    max_passes: int = 5,
) -> list[SyncResult]:
    """Embed every row into the shadow columns; passes repeat while a pass found rows
    held by another session or rows that changed meanwhile."""
    results = []
    for _ in range(max_passes):
        result = sync_embeddings(
            conn,
            shadow_spec(spec),
            embedder,
            Window(),
            batch_size=batch_size,
            on_progress=on_progress,
        )
        results.append(result)
        if not (result.skipped_locked or result.changed_during_run):
            break
    return results


def swap_in(
    conn: psycopg.Connection, specs: Sequence[TableSpec], embedder: Embedder
) -> dict[str, int]:
    """Replace the live columns and indexes of every table in `specs` by the shadow ones,
    in one short transaction, and register the new model; returns per table the rows the
    next run still has to embed (those that arrived after the last pass)."""
    left: dict[str, int] = {}
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(SWAP_LOCK_TIMEOUT)))
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        for spec in sorted(specs, key=lambda s: s.table):
            left[spec.table] = _swap_table(conn, spec, embedder)
    return left


def _swap_table(conn: psycopg.Connection, spec: TableSpec, embedder: Embedder) -> int:
    shadow = shadow_spec(spec)
    table = sql.Identifier(spec.table)
    conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
    if vector_column_dimension(conn, shadow) != embedder.dimension:
        raise SchemaError(
            f"{spec.table} has no shadow column for {embedder.model_id} to "
            "swap in; the switch was aborted or already completed"
        )
    if index_state(conn, hnsw_index_name(shadow)) != "valid":
        raise SchemaError(f"{spec.table}: the shadow column's HNSW index is missing")
    conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(hnsw_index_name(spec))))
    conn.execute(
        sql.SQL("ALTER TABLE {} {}").format(
            table,
            sql.SQL(", ").join(
                sql.SQL("DROP COLUMN {}").format(sql.Identifier(old))
                for old, _ in _column_pairs(spec)
            ),
        )
    )
    for old, new in _column_pairs(spec):
        conn.execute(
            sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
                table, sql.Identifier(new), sql.Identifier(old)
            )
        )
    conn.execute(
        sql.SQL("ALTER INDEX {} RENAME TO {}").format(
            sql.Identifier(hnsw_index_name(shadow)), sql.Identifier(hnsw_index_name(spec))
        )
    )

    conn.execute(
        sql.SQL("""
        INSERT INTO {} (table_name, column_name, model_id, dimension, switched_at)
        VALUES (%s, %s, %s, %s, now())
        ON CONFLICT (table_name, column_name) DO UPDATE
           SET model_id = excluded.model_id, dimension = excluded.dimension,
               switched_at = excluded.switched_at
    """).format(sql.Identifier(MODEL_REGISTRY_TABLE)),
        (spec.table, spec.embedding_column, embedder.model_id, embedder.dimension),
    )
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(
            table, sql.Identifier(spec.embedding_column)
        )
    ).fetchone()
    return int(row[0]) if row else 0


def _live_model(conn: psycopg.Connection, spec: TableSpec) -> str | None:
    row = conn.execute(
        sql.SQL(
            "SELECT {m} FROM {t} WHERE {m} IS NOT NULL GROUP BY {m} ORDER BY count(*) DESC LIMIT 1"
        ).format(m=sql.Identifier(spec.model_column), t=sql.Identifier(spec.table))
    ).fetchone()
    conn.commit()
    return str(row[0]) if row else None


#: The state-table key recording the model a staged switch fills the shadow columns with.
CANDIDATE_KEY = "model_switch_candidate"


@dataclass(frozen=True)
class Candidate:
    """The configuration of the model a switch fills the shadow columns with: what `eval
    --compare` and `model switch --promote` need to embed queries and catch up rows with
    it. Never a key or URL: those come from the environment, as for any run."""

    provider: str
    model: str | None
    dimensions: int | None
    vector_type: str
    query_prefix: str | None
    document_prefix: str | None
    model_id: str

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Candidate:
        return cls(**json.loads(text))


def save_candidate(conn: psycopg.Connection, candidate: Candidate) -> None:
    with conn.transaction():
        set_state(conn, CANDIDATE_KEY, candidate.as_json())


def load_candidate(conn: psycopg.Connection) -> Candidate | None:
    """The candidate of the switch in progress, if one was staged."""
    if not relation_exists(conn, STATE_TABLE):
        return None
    row = conn.execute(
        sql.SQL("SELECT value FROM {} WHERE key = %s").format(sql.Identifier(STATE_TABLE)),
        (CANDIDATE_KEY,),
    ).fetchone()
    conn.commit()
    return Candidate.from_json(str(row[0])) if row else None


def clear_candidate(conn: psycopg.Connection) -> None:
    if relation_exists(conn, STATE_TABLE):
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE key = %s").format(sql.Identifier(STATE_TABLE)),
            (CANDIDATE_KEY,),
        )
    conn.commit()


def _fill_into(
    conn: psycopg.Connection,
    spec: TableSpec,
    report: SwitchReport,
    embedder: Embedder,
    batch_size: int,
    on_progress: Callable[[str, Progress], None] | None,
) -> None:
    progress = None if on_progress is None else (lambda p: on_progress(spec.table, p))
    for result in fill_shadow(conn, spec, embedder, batch_size=batch_size, on_progress=progress):
        report.embedded += result.embedded
        report.provider_requests += result.provider_requests
        report.passes += 1


def stage_switch(
    url: str,
    specs: Sequence[TableSpec],
    embedder: Embedder,
    hnsw: HnswSettings,
    *,
    batch_size: int,
    vector_type: str = "vector",
    on_progress: Callable[[str, Progress], None] | None = None,
) -> list[SwitchReport]:
    """The switch up to the swap: shadows for every table, filled, indexed, caught up.
    Search keeps using the live columns; the candidate can be scored next to them
    (`eval --compare`) before `promote_switch` swaps it in."""
    started = time.monotonic()
    reports: dict[str, SwitchReport] = {}
    with connect(url) as conn:
        for spec in specs:
            reports[spec.table] = SwitchReport(
                table=spec.table,
                previous_model=_live_model(conn, spec),
                previous_dimension=vector_column_dimension(conn, spec),
                model_id=embedder.model_id,
                dimension=embedder.dimension,
            )
            prepare_shadow(conn, spec, embedder.dimension, vector_type)
    with connect(url) as conn:
        for spec in specs:
            _fill_into(conn, spec, reports[spec.table], embedder, batch_size, on_progress)
    with connect(url, autocommit=True) as conn:
        for spec in specs:
            index_started = time.monotonic()
            build_hnsw_index_concurrently(conn, shadow_spec(spec), hnsw)
            reports[spec.table].index_seconds = time.monotonic() - index_started
    with connect(url) as conn:
        for spec in specs:
            _fill_into(conn, spec, reports[spec.table], embedder, batch_size, on_progress)
    for report in reports.values():
        report.seconds = time.monotonic() - started
    return list(reports.values())


def promote_switch(
    url: str,
    specs: Sequence[TableSpec],
    embedder: Embedder,
    *,
    batch_size: int,
    reports: Sequence[SwitchReport] | None = None,
    on_progress: Callable[[str, Progress], None] | None = None,
) -> list[SwitchReport]:
    """Catch the shadows up with rows changed since they were filled, then swap every
    table's shadow in at once (`swap_in`) and forget the candidate."""
    started = time.monotonic()
    by_table = {r.table: r for r in reports or []}
    with connect(url) as conn:
        for spec in specs:
            by_table.setdefault(
                spec.table,
                SwitchReport(
                    table=spec.table,
                    previous_model=_live_model(conn, spec),
                    previous_dimension=vector_column_dimension(conn, spec),
                    model_id=embedder.model_id,
                    dimension=embedder.dimension,
                ),
            )
            _fill_into(conn, spec, by_table[spec.table], embedder, batch_size, on_progress)
        swap_started = time.monotonic()
        left = swap_in(conn, specs, embedder)
        swap_seconds = time.monotonic() - swap_started
        clear_candidate(conn)
    for spec in specs:
        report = by_table[spec.table]
        report.left_for_next_run = left[spec.table]
        report.swap_seconds = swap_seconds
        report.seconds += time.monotonic() - started
    return [by_table[spec.table] for spec in specs]


def switch_models(
    url: str,
    specs: Sequence[TableSpec],
    embedder: Embedder,
    hnsw: HnswSettings,
    *,
    batch_size: int,
    vector_type: str = "vector",
    on_progress: Callable[[str, Progress], None] | None = None,
) -> list[SwitchReport]:
    """The whole switch: shadows for every table, filled, indexed, caught up, then all
    swapped in at once (the configuration is global, so every table changes together)."""
    reports = stage_switch(
        url,
        specs,
        embedder,
        hnsw,
        batch_size=batch_size,
        vector_type=vector_type,
        on_progress=on_progress,
    )
    return promote_switch(
        url, specs, embedder, batch_size=batch_size, reports=reports, on_progress=on_progress
    )


@dataclass(frozen=True)
class ModelStatus:
    table: str
    column: str
    dimension: int | None
    registered_model: str | None
    models: dict[str, int]
    missing: int
    shadow_dimension: int | None
    shadow_filled: int
    vector_type: str = "vector"
    shadow_vector_type: str = "vector"

    def describe(self) -> str:
        present = ", ".join(f"{m} ({n})" for m, n in self.models.items()) or "no vectors"
        line = (
            f"{self.table}.{self.column}: {self.vector_type}({self.dimension}), registered "
            f"{self.registered_model or '(none: no switch yet)'}; present: {present}; "
            f"{self.missing} NULL"
        )
        if self.shadow_dimension is not None:
            line += (
                f"; switch in progress to {self.shadow_vector_type}({self.shadow_dimension}), "
                f"{self.shadow_filled} rows done"
            )
        return line


def model_status(conn: psycopg.Connection, spec: TableSpec) -> ModelStatus:
    """What model(s) a table's embedding column holds and whether a switch is under way."""
    shadow = shadow_spec(spec)
    table = sql.Identifier(spec.table)
    models = {
        str(m): int(n)
        for m, n in conn.execute(
            sql.SQL(
                "SELECT {m}, count(*) FROM {t} WHERE {e} IS NOT NULL GROUP BY 1 ORDER BY 2 DESC"
            ).format(
                m=sql.Identifier(spec.model_column),
                e=sql.Identifier(spec.embedding_column),
                t=table,
            )
        )
    }
    missing = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(
            table, sql.Identifier(spec.embedding_column)
        )
    ).fetchone()
    live_type = vector_column_type(conn, spec)
    shadow_type = vector_column_type(conn, shadow)
    shadow_dimension = shadow_type[1] if shadow_type else None
    filled = 0
    if shadow_dimension is not None:
        row = conn.execute(
            sql.SQL("SELECT count({}) FROM {}").format(
                sql.Identifier(shadow.embedding_column), table
            )
        ).fetchone()
        filled = int(row[0]) if row else 0
    status = ModelStatus(
        table=spec.table,
        column=spec.embedding_column,
        dimension=live_type[1] if live_type else None,
        registered_model=registered_model(conn, spec),
        models=models,
        missing=int(missing[0]) if missing else 0,
        shadow_dimension=shadow_dimension,
        shadow_filled=filled,
        vector_type=live_type[0] if live_type else "vector",
        shadow_vector_type=shadow_type[0] if shadow_type else "vector",
    )
    conn.rollback()
    return status
