"""Search quality: recall of the index against an exact scan, and query latency."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from embedding_pipeline.lib.quality.index import (
    FORCE_EXACT,
    FORCE_INDEX,
    describe_plan,
    explain_nearest,
    index_scans,
)
from embedding_pipeline.lib.quality.queries import (
    SIMILARITY_TIE,
    as_array,
    nearest_query,
    own_transaction,
    set_ef_search,
    set_local,
    table_identifier,
)
from embedding_pipeline.lib.store.domain import TableSpec


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
    with own_transaction(conn):
        estimate_row = conn.execute(
            "SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)",
            (table_identifier(spec).as_string(conn),),
        ).fetchone()
        estimate = float(estimate_row[0]) if estimate_row else -1.0
        percent = 100.0 if estimate <= 0 else min(100.0, 300.0 * size / estimate)
        rows = conn.execute(
            sql.SQL(
                "SELECT {id}, {emb} FROM {table} TABLESAMPLE SYSTEM (%(p)s) "
                "REPEATABLE (%(seed)s) WHERE {emb} IS NOT NULL"
            ).format(id=id_col, emb=emb, table=table_identifier(spec)),
            {"p": percent, "seed": seed},
        ).fetchall()
        method = f"TABLESAMPLE SYSTEM ({percent:.3g}%) REPEATABLE ({seed})"
        if len(rows) < size:
            seen = {r[0] for r in rows}
            extra = conn.execute(
                sql.SQL(
                    "SELECT {id}, {emb} FROM {table} WHERE {emb} IS NOT NULL "
                    "ORDER BY {id} LIMIT %(n)s"
                ).format(id=id_col, emb=emb, table=table_identifier(spec)),
                {"n": size + len(seen)},
            ).fetchall()
            rows += [r for r in extra if r[0] not in seen]
            method += ", topped up in id order"
    chosen = random.Random(seed).sample(rows, min(size, len(rows)))
    chosen.sort(key=lambda r: r[0])
    return VectorSample(
        ids=[int(r[0]) for r in chosen], vectors=[as_array(r[1]) for r in chosen], method=method
    )


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
    with own_transaction(conn, repeatable_read=True):
        set_ef_search(conn, ef_search)
        for name, value in FORCE_INDEX.items():
            set_local(conn, name, value)
        if sample.vectors:
            hnsw_plan = _fetch_plan(conn, explain, sample.vectors[0], k)
        approximate = [_nearest(conn, spec, v, k) for v in sample.vectors]
        set_local(conn, "enable_seqscan", "on")
        for name, value in FORCE_EXACT.items():
            set_local(conn, name, value)
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
            with own_transaction(conn):
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
