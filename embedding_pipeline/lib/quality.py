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

from embedding_pipeline.lib.db import hash_expr, needs_embedding_expr, text_expr
from embedding_pipeline.lib.engine.errors import recorded_expr
from embedding_pipeline.lib.schema import (
    cosine_opclass,
    vector_column_dimension,
    vector_column_type,
)
from embedding_pipeline.lib.sync import Window, claimed_elsewhere_expr
from embedding_pipeline.settings import TableSpec

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
    """Rows with a NULL embedding: in the whole table and, when asked, in one window.
    `failed` of them are recorded in the errors table (the provider refused their text);
    the others are pending."""

    table: str
    rows: int
    missing: int
    sample_ids: list[int]
    missing_in_window: int | None = None
    failed: int = 0
    failed_in_window: int | None = None
    #: Pending rows of the window whose claim another session holds: another run of the
    #: same backlog is embedding them at this moment.
    claimed_in_window: int = 0

    @property
    def ok(self) -> bool:
        return self.missing == 0

    @property
    def pending(self) -> int:
        return self.missing - self.failed

    @property
    def pending_in_window(self) -> int:
        return (self.missing_in_window or 0) - (self.failed_in_window or 0)


def count_missing(
    conn: psycopg.Connection,
    spec: TableSpec,
    *,
    sample_ids: int,
    model_id: str,
    window: Window | None = None,
) -> MissingReport:
    """Count NULL embeddings (one pass over the table), those of them recorded as failed,
    and list the first `sample_ids` ids.

    `window` additionally counts the missing rows a partitioned run was responsible for.
    """
    emb = sql.Identifier("t", spec.embedding_column)
    where, params = window.clause(spec, "t") if window is not None else (sql.SQL("FALSE"), {})
    # the same rows no_failed_rows counts, due for another try or not
    failed = recorded_expr(spec, model_id)
    with _own_transaction(conn):
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), count(*) FILTER (WHERE {emb} IS NULL), "
                "count(*) FILTER (WHERE {emb} IS NULL AND {where}), "
                "count(*) FILTER (WHERE {emb} IS NULL AND {failed}), "
                "count(*) FILTER (WHERE {emb} IS NULL AND {where} AND {failed}), "
                "count(*) FILTER (WHERE {emb} IS NULL AND {where} AND NOT {failed} AND {claimed}) "
                "FROM {table} t"
            ).format(
                emb=emb,
                where=where,
                failed=failed,
                claimed=claimed_elsewhere_expr(spec, "t"),
                table=_table(spec),
            ),
            params,
        ).fetchone()
        assert row is not None
        ids: list[int] = []
        if row[1]:
            ids = [
                int(r[0])
                for r in conn.execute(
                    sql.SQL(
                        "SELECT {id} FROM {table} t WHERE {emb} IS NULL ORDER BY {id} LIMIT %(n)s"
                    ).format(id=sql.Identifier("t", spec.id_column), table=_table(spec), emb=emb),
                    {"n": sample_ids},
                ).fetchall()
            ]
    return MissingReport(
        table=spec.table,
        rows=int(row[0]),
        missing=int(row[1]),
        sample_ids=ids,
        missing_in_window=int(row[2]) if window is not None else None,
        failed=int(row[3]),
        failed_in_window=int(row[4]) if window is not None else None,
        claimed_in_window=int(row[5]),
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
