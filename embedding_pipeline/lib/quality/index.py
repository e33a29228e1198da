"""The HNSW index: it exists with the expected settings, no build is under way, and the
planner uses it for a nearest-neighbour query (EXPLAIN)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from embedding_pipeline.lib.quality.queries import (
    PGVECTOR_HNSW_DEFAULTS,
    as_array,
    nearest_query,
    own_transaction,
    set_ef_search,
    set_local,
    table_identifier,
)
from embedding_pipeline.lib.store.catalog import vector_column_type
from embedding_pipeline.lib.store.domain import TableSpec
from embedding_pipeline.lib.store.hnsw import bulk_load_lock_key, cosine_opclass


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
    with own_transaction(conn):
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
            {"table": table_identifier(spec).as_string(conn), "key": bulk_load_lock_key(spec)},
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
    with own_transaction(conn):
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
            (table_identifier(spec).as_string(conn), spec.embedding_column),
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
    with own_transaction(conn):
        set_ef_search(conn, ef_search)
        for name, value in (settings or {}).items():
            set_local(conn, name, value)
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
    with own_transaction(conn):
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(table_identifier(spec))
        ).fetchone()
    assert row is not None
    return int(row[0])


def probe_vector(conn: psycopg.Connection, spec: TableSpec, dimension: int) -> np.ndarray:
    """A stored vector to plan and search with, or a unit vector when none is stored."""
    with own_transaction(conn):
        row = conn.execute(
            sql.SQL("SELECT {emb} FROM {table} WHERE {emb} IS NOT NULL LIMIT 1").format(
                emb=sql.Identifier(spec.embedding_column), table=table_identifier(spec)
            )
        ).fetchone()
    if row is not None:
        return as_array(row[0])
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
