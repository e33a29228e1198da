"""Measurements behind the asset checks: completeness, freshness, shape, index and search.

Pure SQL over one embedded table, no Dagster: `checks.py` turns these reports into
`dg.AssetCheckResult`s, and the benchmark and tests call them directly. Every measurement
that could grow with the table reads a bounded sample and says so in its report.

Functions that set transaction-scoped options (`hnsw.ef_search`, planner switches) or need
one snapshot run their own transaction and therefore want an idle connection, so that a
`SET LOCAL` can never leak into a caller's transaction.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from embedding_pipeline.lib.engine.row_errors import recorded_expr
from embedding_pipeline.lib.engine.run import claimed_elsewhere_expr, claiming_sessions
from embedding_pipeline.lib.store.catalog import vector_column_dimension, vector_column_type
from embedding_pipeline.lib.store.domain import TableSpec, Window
from embedding_pipeline.lib.store.expressions import hash_expr, needs_embedding_expr, text_expr
from embedding_pipeline.lib.store.hnsw import bulk_load_lock_key, cosine_opclass

#: The operator class that serves `ORDER BY embedding <=> q` (cosine distance) on a
#: `vector` column, the order `nearest_query` and the search API use; an HNSW index of
#: another class cannot serve them (on a `halfvec` column: `halfvec_cosine_ops`).
EXPECTED_OPCLASS = cosine_opclass("vector")
#: pgvector's defaults, in effect when an index was built without WITH (...).
PGVECTOR_HNSW_DEFAULTS = {"m": 16, "ef_construction": 64}
#: Two similarities closer than this are a tie (float4 vectors, float8 arithmetic).
SIMILARITY_TIE = 1e-6


class QualityError(RuntimeError):
    """A measurement could not be taken as asked (e.g. the connection was mid-transaction)."""


@contextmanager
def _own_transaction(conn: psycopg.Connection, *, repeatable_read: bool = False) -> Iterator[None]:
    """A real transaction (not a savepoint) whose `SET LOCAL`s end with it."""
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise QualityError("this measurement needs an idle connection (commit or roll back first)")
    with conn.transaction():
        if repeatable_read:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        yield


def nearest_query(spec: TableSpec) -> sql.Composed:
    """The nearest-neighbour statement the checks measure: `ORDER BY embedding <=> $1
    LIMIT k` (cosine distance), the form the HNSW index serves and the search API's
    vector mode runs (`embedding_pipeline/search/statements.py`). Parameters:
    %(query)s (vector), %(k)s."""
    emb = sql.Identifier(spec.embedding_column)
    return sql.SQL(
        "SELECT {id}, 1 - ({emb} <=> %(query)s) AS similarity, {text} FROM {table} "
        "ORDER BY {emb} <=> %(query)s LIMIT %(k)s"
    ).format(
        id=sql.Identifier(spec.id_column),
        emb=emb,
        text=text_expr(spec),
        table=sql.Identifier(spec.table),
    )


def set_ef_search(conn: psycopg.Connection, ef_search: int) -> None:
    """`hnsw.ef_search` for the current transaction (candidates kept while searching)."""
    _set_local(conn, "hnsw.ef_search", str(int(ef_search)))


def _set_local(conn: psycopg.Connection, name: str, value: str) -> None:
    conn.execute("SELECT set_config(%s, %s, true)", (name, value))


def _table(spec: TableSpec) -> sql.Identifier:
    return sql.Identifier(spec.table)


def _array(value: Any) -> np.ndarray:
    """A stored vector as float32 numpy (pgvector's loader returns `Vector` objects)."""
    to_numpy = getattr(value, "to_numpy", None)
    return np.asarray(to_numpy() if to_numpy else value, dtype=np.float32)


# -- missing and stale ---------------------------------------------------------------------


@dataclass(frozen=True)
class MissingReport:
    """Rows with a NULL embedding, and why each has none.

    Of the `missing`: `failed` the provider refused (no_failed_rows owns them), `empty`
    have no text to embed (not a fault); the others are `pending`. Of those, `claimed`
    are held by another run's claiming session right now (named in `claimed_by`) and
    `overdue` are held by nobody and have waited longer than the freshness limit: nothing
    is embedding them. With a run's window and start snapshot, `owed` are the pending
    rows of the run's months that no one holds and that existed, as they are now, when
    the run started: the rows the run should have embedded. `new_in_run` are rows of its
    months written after it started (inserted or edited by the application): the next
    run's."""

    table: str
    rows: int
    missing: int
    failed: int = 0
    empty: int = 0
    claimed: int = 0
    overdue: int = 0
    sample_ids: list[int] = field(default_factory=list)
    claimed_by: list[str] = field(default_factory=list)
    in_run: bool = False
    owed: int = 0
    new_in_run: int = 0
    claimed_in_run: int = 0
    pending_in_run: int = 0

    @property
    def pending(self) -> int:
        return self.missing - self.failed - self.empty

    @property
    def ok(self) -> bool:
        return self.pending == 0


def _full_xid(xid: sql.Composable) -> sql.Composed:
    """The 64-bit id (`xid8`) of a 32-bit transaction id seen recently (a row's `xmin`):
    its epoch is the current one, or the one before when it is above the current
    counter. Frozen and very old ids come out below every snapshot's horizon."""
    return sql.SQL(
        "(SELECT ((c >> 32) << 32) + x - CASE WHEN x > (c & 4294967295) THEN 4294967296 "
        "ELSE 0 END FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS c, "
        "{}::text::bigint AS x) v)::text::xid8"
    ).format(xid)


def count_missing(
    conn: psycopg.Connection,
    spec: TableSpec,
    *,
    sample_ids: int,
    model_id: str,
    overdue_minutes: float,
    window: Window | None = None,
    start_snapshot: str | None = None,
) -> MissingReport:
    """Count NULL embeddings by reason (one pass over the table's missing rows) and list
    up to `sample_ids` ids of those that need action: rows the run owed (with `window` and
    `start_snapshot`, `pg_current_snapshot()` taken when the run started), else overdue
    rows, else pending ones."""
    emb = sql.Identifier("t", spec.embedding_column)
    in_run = window is not None and bool(start_snapshot)
    where: sql.Composable
    existed: sql.Composable
    if in_run:
        assert window is not None
        where, params = window.clause(spec, "t")
        existed = sql.SQL("pg_visible_in_snapshot({}, %(snapshot)s::pg_snapshot)").format(
            _full_xid(sql.Identifier("t", "xmin"))
        )
        params = {**params, "snapshot": start_snapshot}
    else:
        where, existed, params = sql.SQL("FALSE"), sql.SQL("FALSE"), {}
    params = {**params, "overdue": f"{overdue_minutes} minutes", "n": sample_ids}
    with _own_transaction(conn):
        rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(_table(spec))).fetchone()
        assert rows is not None
        missing = conn.execute(
            sql.SQL("""
            WITH m AS MATERIALIZED (
                SELECT t.{id} AS id,
                       {failed} AS failed,
                       {empty} AS empty,
                       {claimed} AS claimed,
                       coalesce(t.{since}, '-infinity') < now() - %(overdue)s::interval
                           AS overdue,
                       {where} AS in_run,
                       {existed} AS existed
                FROM {table} t WHERE {emb} IS NULL
            ), p AS (SELECT * FROM m WHERE NOT failed AND NOT empty)
            SELECT (SELECT count(*) FROM m),
                   (SELECT count(*) FROM m WHERE failed),
                   (SELECT count(*) FROM m WHERE empty AND NOT failed),
                   (SELECT count(*) FROM p WHERE claimed),
                   (SELECT count(*) FROM p WHERE NOT claimed AND overdue),
                   (SELECT count(*) FROM p WHERE in_run AND NOT claimed AND existed),
                   (SELECT count(*) FROM p WHERE in_run AND NOT claimed AND NOT existed),
                   (SELECT count(*) FROM p WHERE in_run AND claimed),
                   (SELECT count(*) FROM p WHERE in_run),
                   ARRAY(SELECT id FROM p ORDER BY
                         (in_run AND NOT claimed AND existed) DESC,
                         (NOT claimed AND overdue) DESC, id LIMIT %(n)s)
            """).format(
                id=sql.Identifier(spec.id_column),
                failed=recorded_expr(spec, model_id, kind="failed"),
                empty=recorded_expr(spec, model_id, kind="empty"),
                claimed=claimed_elsewhere_expr(spec, "t"),
                since=sql.Identifier(spec.pending_since_column),
                where=where,
                existed=existed,
                table=_table(spec),
                emb=emb,
            ),
            params,
        ).fetchone()
        assert missing is not None
        claimed_by = claiming_sessions(conn, spec) if missing[3] else []
    return MissingReport(
        table=spec.table,
        rows=int(rows[0]),
        missing=int(missing[0]),
        failed=int(missing[1]),
        empty=int(missing[2]),
        claimed=int(missing[3]),
        overdue=int(missing[4]),
        sample_ids=[int(i) for i in missing[9]],
        claimed_by=claimed_by,
        in_run=in_run,
        owed=int(missing[5]),
        new_in_run=int(missing[6]),
        claimed_in_run=int(missing[7]),
        pending_in_run=int(missing[8]),
    )


@dataclass(frozen=True)
class StaleReport:
    """Embedded rows whose vector no longer matches the text or the configured model.

    Staleness is read from the stored source hash the tracking trigger keeps (no row is
    hashed); `untracked` counts sampled rows whose stored source hash differs from the
    hash of their text, which only happens when writes bypass the trigger (disabled
    triggers, `session_replication_role = replica`)."""

    table: str
    model_id: str
    rows: int
    embedded: int
    stale: int
    text_changed: int
    other_model: int
    sample_ids: list[int]
    tracking_sampled: int = 0
    untracked: int = 0

    @property
    def ok(self) -> bool:
        return self.stale == 0 and self.untracked == 0


def count_stale(
    conn: psycopg.Connection,
    spec: TableSpec,
    *,
    model_id: str,
    sample_ids: int,
    tracking_sample: int = 1000,
) -> StaleReport:
    """Count stale embeddings by `needs_embedding_expr` (the rule the sync itself uses),
    split by reason (a row can be stale for both), and check the tracking trigger on a
    sample of `tracking_sample` rows."""
    emb = sql.Identifier(spec.embedding_column)
    model = sql.Identifier(spec.model_column)
    needs = needs_embedding_expr(spec, model_id=model_id)
    with _own_transaction(conn):
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), count(*) FILTER (WHERE {emb} IS NOT NULL), "
                "count(*) FILTER (WHERE {emb} IS NOT NULL AND {needs}), "
                "count(*) FILTER (WHERE {emb} IS NOT NULL AND {hash} IS DISTINCT FROM {source}), "
                "count(*) FILTER (WHERE {emb} IS NOT NULL AND {model} IS DISTINCT FROM "
                "%(model_id)s) FROM {table}"
            ).format(
                emb=emb,
                needs=needs,
                hash=sql.Identifier(spec.hash_column),
                source=sql.Identifier(spec.source_hash_column),
                model=model,
                table=_table(spec),
            ),
            {"model_id": model_id},
        ).fetchone()
        assert row is not None
        ids: list[int] = []
        if row[2]:
            ids = [
                int(r[0])
                for r in conn.execute(
                    sql.SQL(
                        "SELECT {id} FROM {table} WHERE {emb} IS NOT NULL AND {needs} "
                        "ORDER BY {id} LIMIT %(n)s"
                    ).format(
                        id=sql.Identifier(spec.id_column), table=_table(spec), emb=emb, needs=needs
                    ),
                    {"n": sample_ids},
                ).fetchall()
            ]
        estimate = conn.execute(
            "SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)",
            (_table(spec).as_string(),),
        ).fetchone()
        estimated_rows = float(estimate[0]) if estimate and estimate[0] > 0 else 0.0
        percent = (
            100.0 if estimated_rows <= 0 else min(100.0, 300.0 * tracking_sample / estimated_rows)
        )
        tracking = conn.execute(
            sql.SQL(
                "SELECT count(*), count(*) FILTER (WHERE {source} IS DISTINCT FROM {current}) "
                "FROM (SELECT * FROM {table} TABLESAMPLE SYSTEM (%(percent)s) LIMIT %(n)s) t"
            ).format(
                source=sql.Identifier(spec.source_hash_column),
                current=hash_expr(spec),
                table=_table(spec),
            ),
            {"n": tracking_sample, "percent": percent},
        ).fetchone()
        assert tracking is not None
    return StaleReport(
        table=spec.table,
        model_id=model_id,
        rows=int(row[0]),
        embedded=int(row[1]),
        stale=int(row[2]),
        text_changed=int(row[3]),
        other_model=int(row[4]),
        sample_ids=ids,
        tracking_sampled=int(tracking[0]),
        untracked=int(tracking[1]),
    )


# -- dimension -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DimensionReport:
    """The column's declared type against the model's dimension, and a sample of stored
    vectors (a declared `vector(n)` already makes PostgreSQL reject any other length)."""

    table: str
    column_type: str | None
    declared: int | None
    expected: int
    sampled: int
    dimensions_found: dict[int, int]
    mismatched_ids: list[int]

    @property
    def ok(self) -> bool:
        return self.declared == self.expected and all(
            d == self.expected for d in self.dimensions_found
        )


def check_dimension(
    conn: psycopg.Connection, spec: TableSpec, *, expected: int, sample_size: int, sample_ids: int
) -> DimensionReport:
    with _own_transaction(conn):
        row = conn.execute(
            "SELECT format_type(a.atttypid, a.atttypmod), t.typname FROM pg_attribute a "
            "JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND NOT a.attisdropped",
            (_table(spec).as_string(conn), spec.embedding_column),
        ).fetchone()
        column_type = str(row[0]) if row else None
        declared = vector_column_dimension(conn, spec) if row else None
        found: dict[int, int] = {}
        mismatched: list[int] = []
        sampled = 0
        if row is not None and row[1] in ("vector", "halfvec"):
            rows = conn.execute(
                sql.SQL(
                    "SELECT {id}, vector_dims({emb}) FROM {table} WHERE {emb} IS NOT NULL "
                    "LIMIT %(n)s"
                ).format(
                    id=sql.Identifier(spec.id_column),
                    emb=sql.Identifier(spec.embedding_column),
                    table=_table(spec),
                ),
                {"n": sample_size},
            ).fetchall()
            sampled = len(rows)
            for row_id, dims in rows:
                found[int(dims)] = found.get(int(dims), 0) + 1
                if int(dims) != expected and len(mismatched) < sample_ids:
                    mismatched.append(int(row_id))
    return DimensionReport(
        table=spec.table,
        column_type=column_type,
        declared=declared,
        expected=expected,
        sampled=sampled,
        dimensions_found=found,
        mismatched_ids=mismatched,
    )


# -- the HNSW index ------------------------------------------------------------------------


@dataclass(frozen=True)
class HnswIndex:
    name: str
    opclass: str
    m: int
    ef_construction: int
    size_bytes: int
    valid: bool
    definition: str


@dataclass(frozen=True)
class IndexReport:
    """Every HNSW index on the embedding column; `usable` is the first one search can use."""

    table: str
    column: str
    expected_name: str
    expected_opclass: str
    indexes: list[HnswIndex]

    @property
    def usable(self) -> HnswIndex | None:
        candidates = [i for i in self.indexes if i.valid and i.opclass == self.expected_opclass]
        named = [i for i in candidates if i.name == self.expected_name]
        preferred = named or candidates
        return preferred[0] if preferred else None

    @property
    def ok(self) -> bool:
        return self.usable is not None


def index_builds(conn: psycopg.Connection, spec: TableSpec) -> list[str]:
    """Other sessions building `spec`'s indexes now (`CREATE INDEX`, with its progress),
    or holding the column's build lock (a run loading without the HNSW index, to build it
    at its end): each named by its `application_name` (a run's claiming session carries
    the run's id) and process id. Empty when nobody is at work on them."""
    with _own_transaction(conn):
        rows = conn.execute(
            """
            SELECT a.application_name, p.pid, p.phase,
                   CASE WHEN p.tuples_total > 0
                        THEN round(100.0 * p.tuples_done / p.tuples_total) END
            FROM pg_stat_progress_create_index p JOIN pg_stat_activity a ON a.pid = p.pid
            WHERE p.relid = to_regclass(%(table)s) AND p.pid <> pg_backend_pid()
            UNION ALL
            SELECT a.application_name, l.pid, NULL, NULL
            FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0
              AND l.objid = %(key)s AND l.objsubid = 1 AND l.pid <> pg_backend_pid()
              AND l.mode = 'ExclusiveLock'
              AND l.pid NOT IN (SELECT pid FROM pg_stat_progress_create_index)
            ORDER BY 2
            """,
            {"table": _table(spec).as_string(conn), "key": bulk_load_lock_key(spec)},
        ).fetchall()
    out = []
    for name, pid, phase, percent in rows:
        who = f"{name or 'a session'} (pid {pid})"
        if phase is None:
            out.append(f"{who} holds the build lock (loading without the index, builds it next)")
        else:
            done = f", {percent:.0f}% of rows" if percent is not None else ""
            out.append(f"{who} is building it ({phase}{done})")
    return out


def _index_options(reloptions: Sequence[str] | None) -> dict[str, int]:
    options = dict(PGVECTOR_HNSW_DEFAULTS)
    for item in reloptions or []:
        key, _, value = item.partition("=")
        if key in options and value.isdigit():
            options[key] = int(value)
    return options


def find_hnsw_indexes(conn: psycopg.Connection, spec: TableSpec, expected_name: str) -> IndexReport:
    """HNSW indexes whose first key column is the embedding column, from the catalogs."""
    with _own_transaction(conn):
        rows = conn.execute(
            """
            SELECT i.relname, opc.opcname, i.reloptions, pg_relation_size(i.oid),
                   x.indisvalid AND x.indisready, pg_get_indexdef(i.oid)
            FROM pg_index x
            JOIN pg_class i ON i.oid = x.indexrelid
            JOIN pg_am am ON am.oid = i.relam
            JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
            JOIN pg_opclass opc ON opc.oid = x.indclass[0]
            WHERE x.indrelid = to_regclass(%s) AND am.amname = 'hnsw' AND a.attname = %s
            ORDER BY i.relname
            """,
            (_table(spec).as_string(conn), spec.embedding_column),
        ).fetchall()
        column = vector_column_type(conn, spec)
    indexes = []
    for name, opclass, reloptions, size, valid, definition in rows:
        options = _index_options(reloptions)
        indexes.append(
            HnswIndex(
                name=str(name),
                opclass=str(opclass),
                m=options["m"],
                ef_construction=options["ef_construction"],
                size_bytes=int(size),
                valid=bool(valid),
                definition=str(definition),
            )
        )
    return IndexReport(
        table=spec.table,
        column=spec.embedding_column,
        expected_name=expected_name,
        expected_opclass=cosine_opclass(column[0] if column else "vector"),
        indexes=indexes,
    )


# -- plans ---------------------------------------------------------------------------------


def plan_nodes(plan: Any) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) result (or of one plan node), depth first."""
    if isinstance(plan, list):
        return [node for item in plan for node in plan_nodes(item)]
    if not isinstance(plan, Mapping):
        return []
    node = plan.get("Plan", plan)
    nodes: list[dict[str, Any]] = [dict(node)]
    for child in node.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


def index_scans(plan: Any) -> list[str]:
    """Names of the indexes the plan scans (Index Scan and Index Only Scan nodes)."""
    return [
        str(n["Index Name"])
        for n in plan_nodes(plan)
        if n.get("Node Type") in ("Index Scan", "Index Only Scan") and n.get("Index Name")
    ]


def describe_plan(plan: Any) -> str:
    """A one-line outline, e.g. `Limit > Index Scan using messages_embedding_hnsw_idx`."""
    parts = []
    for node in plan_nodes(plan):
        text = str(node.get("Node Type"))
        if node.get("Index Name"):
            text += f" using {node['Index Name']}"
        elif node.get("Relation Name"):
            text += f" on {node['Relation Name']}"
        parts.append(text)
    return " > ".join(parts)


def explain_nearest(
    conn: psycopg.Connection,
    spec: TableSpec,
    query: np.ndarray,
    *,
    k: int,
    ef_search: int,
    settings: Mapping[str, str] | None = None,
) -> Any:
    """EXPLAIN (FORMAT JSON) of the search statement itself, in its own transaction with
    `hnsw.ef_search` and any planner `settings` applied locally."""
    with _own_transaction(conn):
        set_ef_search(conn, ef_search)
        for name, value in (settings or {}).items():
            _set_local(conn, name, value)
        row = conn.execute(
            sql.SQL("EXPLAIN (FORMAT JSON) {}").format(nearest_query(spec)),
            {"query": query, "k": k},
        ).fetchone()
    assert row is not None
    return row[0]


#: Planner switches that leave the index as the only way to order by distance.
FORCE_INDEX = {"enable_seqscan": "off"}
#: Planner switches that leave a sequential scan and sort as the only way: the exact answer.
FORCE_EXACT = {"enable_indexscan": "off", "enable_indexonlyscan": "off", "enable_bitmapscan": "off"}


@dataclass(frozen=True)
class IndexUseReport:
    """Two separate answers: can the index serve the search at all (tested with sequential
    scans disabled), and does the planner choose it with default settings at this size."""

    table: str
    index_name: str | None
    rows: int
    ef_search: int
    k: int
    can_serve: bool
    chosen_by_default: bool
    default_plan: Any
    forced_plan: Any

    @property
    def default_outline(self) -> str:
        return describe_plan(self.default_plan)

    @property
    def forced_outline(self) -> str:
        return describe_plan(self.forced_plan)


def count_rows(conn: psycopg.Connection, spec: TableSpec) -> int:
    with _own_transaction(conn):
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(_table(spec))).fetchone()
    assert row is not None
    return int(row[0])


def probe_vector(conn: psycopg.Connection, spec: TableSpec, dimension: int) -> np.ndarray:
    """A stored vector to plan and search with, or a unit vector when none is stored."""
    with _own_transaction(conn):
        row = conn.execute(
            sql.SQL("SELECT {emb} FROM {table} WHERE {emb} IS NOT NULL LIMIT 1").format(
                emb=sql.Identifier(spec.embedding_column), table=_table(spec)
            )
        ).fetchone()
    if row is not None:
        return _array(row[0])
    unit = np.zeros(dimension, dtype=np.float32)
    unit[0] = 1.0
    return unit


def check_index_use(
    conn: psycopg.Connection,
    spec: TableSpec,
    index_name: str | None,
    *,
    dimension: int,
    k: int,
    ef_search: int,
) -> IndexUseReport:
    query = probe_vector(conn, spec, dimension)
    default_plan = explain_nearest(conn, spec, query, k=k, ef_search=ef_search)
    forced_plan = explain_nearest(conn, spec, query, k=k, ef_search=ef_search, settings=FORCE_INDEX)
    return IndexUseReport(
        table=spec.table,
        index_name=index_name,
        rows=count_rows(conn, spec),
        ef_search=ef_search,
        k=k,
        can_serve=index_name is not None and index_name in index_scans(forced_plan),
        chosen_by_default=index_name is not None and index_name in index_scans(default_plan),
        default_plan=default_plan,
        forced_plan=forced_plan,
    )


# -- samples of stored vectors -------------------------------------------------------------


@dataclass(frozen=True)
class VectorSample:
    ids: list[int]
    vectors: list[np.ndarray]
    method: str


def sample_vectors(
    conn: psycopg.Connection, spec: TableSpec, size: int, *, seed: int = 0
) -> VectorSample:
    """Up to `size` stored vectors, reproducibly: a page sample (TABLESAMPLE SYSTEM, about
    three times `size` rows by the planner's row estimate) so large tables are not read
    whole, topped up from the start of the table when the pages held too few."""
    emb = sql.Identifier(spec.embedding_column)
    id_col = sql.Identifier(spec.id_column)
    with _own_transaction(conn):
        estimate_row = conn.execute(
            "SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)",
            (_table(spec).as_string(conn),),
        ).fetchone()
        estimate = float(estimate_row[0]) if estimate_row else -1.0
        percent = 100.0 if estimate <= 0 else min(100.0, 300.0 * size / estimate)
        rows = conn.execute(
            sql.SQL(
                "SELECT {id}, {emb} FROM {table} TABLESAMPLE SYSTEM (%(p)s) "
                "REPEATABLE (%(seed)s) WHERE {emb} IS NOT NULL"
            ).format(id=id_col, emb=emb, table=_table(spec)),
            {"p": percent, "seed": seed},
        ).fetchall()
        method = f"TABLESAMPLE SYSTEM ({percent:.3g}%) REPEATABLE ({seed})"
        if len(rows) < size:
            seen = {r[0] for r in rows}
            extra = conn.execute(
                sql.SQL(
                    "SELECT {id}, {emb} FROM {table} WHERE {emb} IS NOT NULL "
                    "ORDER BY {id} LIMIT %(n)s"
                ).format(id=id_col, emb=emb, table=_table(spec)),
                {"n": size + len(seen)},
            ).fetchall()
            rows += [r for r in extra if r[0] not in seen]
            method += ", topped up in id order"
    chosen = random.Random(seed).sample(rows, min(size, len(rows)))
    chosen.sort(key=lambda r: r[0])
    return VectorSample(
        ids=[int(r[0]) for r in chosen], vectors=[_array(r[1]) for r in chosen], method=method
    )


# -- recall --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecallReport:
    """recall@k of the HNSW search against an exact scan, over stored vectors as queries.

    A returned row counts as a true neighbour when it is at least as similar as the exact
    k-th neighbour, so ties (duplicate texts have equal vectors) are not counted as misses.
    When the table holds fewer than k embedded rows, a query's k is what exists.
    """

    table: str
    k: int
    ef_search: int
    queries: int
    recall: float | None
    min_query_recall: float | None
    worst_query_ids: list[int]
    sample_method: str
    hnsw_plan: str
    exact_plan: str
    index_used: bool
    exact_is_sequential: bool


def _nearest(
    conn: psycopg.Connection, spec: TableSpec, query: np.ndarray, k: int
) -> list[tuple[int, float]]:
    rows = conn.execute(nearest_query(spec), {"query": query, "k": k}).fetchall()
    return [(int(r[0]), float(r[1])) for r in rows if r[1] is not None]


def measure_recall(
    conn: psycopg.Connection,
    spec: TableSpec,
    index_name: str | None,
    *,
    k: int,
    sample_size: int,
    ef_search: int,
    seed: int = 0,
) -> RecallReport:
    """Run the search statement for each sampled vector twice in one REPEATABLE READ
    snapshot: through the HNSW index (sequential scans off, `ef_search` as configured),
    then exactly (index scans off: a sequential scan and sort). Both plans are EXPLAINed
    in the same transaction and reported, so the comparison is known to be what it claims."""
    sample = sample_vectors(conn, spec, sample_size, seed=seed)
    approximate: list[list[tuple[int, float]]] = []
    exact: list[list[tuple[int, float]]] = []
    hnsw_plan: Any = None
    exact_plan: Any = None
    explain = sql.SQL("EXPLAIN (FORMAT JSON) {}").format(nearest_query(spec))
    with _own_transaction(conn, repeatable_read=True):
        set_ef_search(conn, ef_search)
        for name, value in FORCE_INDEX.items():
            _set_local(conn, name, value)
        if sample.vectors:
            hnsw_plan = _fetch_plan(conn, explain, sample.vectors[0], k)
        approximate = [_nearest(conn, spec, v, k) for v in sample.vectors]
        _set_local(conn, "enable_seqscan", "on")
        for name, value in FORCE_EXACT.items():
            _set_local(conn, name, value)
        if sample.vectors:
            exact_plan = _fetch_plan(conn, explain, sample.vectors[0], k)
        exact = [_nearest(conn, spec, v, k) for v in sample.vectors]
    per_query: list[tuple[float, int]] = []
    found = expected = 0
    for query_id, hnsw, truth in zip(sample.ids, approximate, exact, strict=True):
        if not truth:
            continue
        cutoff = truth[-1][1] - SIMILARITY_TIE
        hits = min(len(truth), sum(1 for _, similarity in hnsw if similarity >= cutoff))
        found += hits
        expected += len(truth)
        per_query.append((hits / len(truth), query_id))
    per_query.sort()
    return RecallReport(
        table=spec.table,
        k=k,
        ef_search=ef_search,
        queries=len(per_query),
        recall=found / expected if expected else None,
        min_query_recall=per_query[0][0] if per_query else None,
        worst_query_ids=[q for r, q in per_query[:5] if r < 1.0],
        sample_method=sample.method,
        hnsw_plan=describe_plan(hnsw_plan) if hnsw_plan else "",
        exact_plan=describe_plan(exact_plan) if exact_plan else "",
        index_used=bool(hnsw_plan)
        and index_name is not None
        and index_name in index_scans(hnsw_plan),
        exact_is_sequential=bool(exact_plan) and not index_scans(exact_plan),
    )


def _fetch_plan(conn: psycopg.Connection, explain: sql.Composed, query: np.ndarray, k: int) -> Any:
    row = conn.execute(explain, {"query": query, "k": k}).fetchone()
    assert row is not None
    return row[0]


# -- latency -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyReport:
    """Wall time of the search statement as search runs it (default planner settings,
    configured `ef_search`), one warm-up query excluded."""

    table: str
    k: int
    ef_search: int
    queries: int
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None
    sample_method: str
    plan: str
    timings_ms: list[float] = field(default_factory=list)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of already sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = (len(sorted_values) - 1) * q
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def measure_latency(
    conn: psycopg.Connection,
    spec: TableSpec,
    *,
    k: int,
    sample_size: int,
    ef_search: int,
    seed: int = 1,
) -> LatencyReport:
    sample = sample_vectors(conn, spec, sample_size, seed=seed)
    plan = ""
    timings: list[float] = []
    if sample.vectors:
        plan = describe_plan(
            explain_nearest(conn, spec, sample.vectors[0], k=k, ef_search=ef_search)
        )
        statement = nearest_query(spec)
        for i, vector in enumerate([sample.vectors[0], *sample.vectors]):
            with _own_transaction(conn):
                set_ef_search(conn, ef_search)
                started = time.perf_counter()
                conn.execute(statement, {"query": vector, "k": k}).fetchall()
                elapsed = (time.perf_counter() - started) * 1000.0
            if i:
                timings.append(elapsed)
    ordered = sorted(timings)
    return LatencyReport(
        table=spec.table,
        k=k,
        ef_search=ef_search,
        queries=len(timings),
        p50_ms=statistics.median(ordered) if ordered else None,
        p95_ms=_percentile(ordered, 0.95) if ordered else None,
        max_ms=ordered[-1] if ordered else None,
        sample_method=sample.method,
        plan=plan,
        timings_ms=timings,
    )
