"""Loading N vectors with the HNSW index in place against loading first and indexing after.

The load is what an embedding run does: rows exist with a NULL embedding, vectors arrive
in batches, each batch is COPYed into a temporary table and written with one UPDATE, and
committed. Three strategies are timed on the same random unit vectors:

- ``incremental``: the HNSW index exists (empty) before the load; every UPDATE inserts
  into the graph;
- ``build-after``: no index during the load, then ``CREATE INDEX``;
- ``build-after-concurrently``: no index during the load, then
  ``CREATE INDEX CONCURRENTLY`` (writers are not blocked while it builds).

With ``--indexed N`` the table already holds N vectors before the load (a top-up, as a
backlog run on a used table sees): ``incremental`` starts from an index over them (built
outside the clock), ``build-after`` rebuilds over all N + rows at the end. That is the
trade-off `EP_HNSW_REBUILD_FRACTION` settles (docs/operations.md).

Run: ``.venv/bin/python benchmarks/index_build.py --rows 50000`` (starts a throwaway
embedded server unless ``--database-url`` is given). Random vectors have no cluster
structure, which makes HNSW work a little harder than real embeddings do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import harness
import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

TABLE = "bench_index_build"


def unit_vectors(rows: int, dimension: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, dimension), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def prepare(url: str, rows: int, dimension: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint PRIMARY KEY, content text NOT NULL, "
                "embedding vector({}))"
            ).format(sql.Identifier(TABLE), sql.Literal(dimension))
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (id, content) SELECT g, 'row ' || g FROM generate_series(1, %s) g"
            ).format(sql.Identifier(TABLE)),
            (rows,),
        )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(TABLE)))


def create_index(
    conn: psycopg.Connection, *, concurrently: bool, m: int, ef_construction: int
) -> float:
    started = time.perf_counter()
    conn.execute(
        sql.SQL(
            "CREATE INDEX {} {} ON {} USING hnsw (embedding vector_cosine_ops) "
            "WITH (m = {}, ef_construction = {})"
        ).format(
            sql.SQL("CONCURRENTLY") if concurrently else sql.SQL(""),
            sql.Identifier(f"{TABLE}_hnsw"),
            sql.Identifier(TABLE),
            sql.Literal(m),
            sql.Literal(ef_construction),
        )
    )
    return time.perf_counter() - started


def load(url: str, vectors: np.ndarray, batch_size: int, first_id: int = 1) -> float:
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        register_vector(conn)
        conn.execute(
            "CREATE TEMP TABLE staging (id bigint, embedding vector) ON COMMIT DELETE ROWS"
        )
        conn.commit()
        update = sql.SQL(
            "UPDATE {} t SET embedding = s.embedding FROM staging s WHERE t.id = s.id"
        ).format(sql.Identifier(TABLE))
        for start in range(0, len(vectors), batch_size):
            block = vectors[start : start + batch_size]
            with conn.cursor().copy(
                "COPY staging (id, embedding) FROM STDIN WITH (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int8", "vector"])
                for offset, vector in enumerate(block):
                    copy.write_row((first_id + start + offset, vector))
            conn.execute(update)
            conn.commit()
    return time.perf_counter() - started


def run_strategy(
    url: str, strategy: str, vectors: np.ndarray, args: argparse.Namespace
) -> dict[str, object]:
    indexed = unit_vectors(args.indexed, vectors.shape[1], seed=11)
    prepare(url, len(indexed) + len(vectors), vectors.shape[1])
    index_seconds = 0.0
    if len(indexed):
        load(url, indexed, args.batch_size)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(args.maintenance_work_mem))
        )
        if strategy == "incremental":
            prebuilt = create_index(
                conn, concurrently=False, m=args.m, ef_construction=args.ef_construction
            )
            index_seconds = 0.0 if len(indexed) else prebuilt
        load_seconds = load(url, vectors, args.batch_size, first_id=len(indexed) + 1)
        if strategy != "incremental":
            index_seconds = create_index(
                conn,
                concurrently=strategy.endswith("concurrently"),
                m=args.m,
                ef_construction=args.ef_construction,
            )
        size = conn.execute("SELECT pg_relation_size(%s)", (f"{TABLE}_hnsw",)).fetchone()
    total = load_seconds + index_seconds
    return {
        "strategy": strategy,
        "rows": len(vectors),
        "indexed_before": len(indexed),
        "dimension": vectors.shape[1],
        "load_seconds": round(load_seconds, 2),
        "index_seconds": round(index_seconds, 2),
        "total_seconds": round(total, 2),
        "rows_per_second": round(len(vectors) / total, 1),
        "index_mb": round((size[0] if size else 0) / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--indexed", type=int, default=0, help="vectors in place before")
    parser.add_argument("--dimension", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=64)
    parser.add_argument("--maintenance-work-mem", default="256MB")
    parser.add_argument("--strategies", default="incremental,build-after,build-after-concurrently")
    parser.add_argument(
        "--database-url", help="an existing database (default: a throwaway embedded server)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines only")
    args = parser.parse_args(argv)

    vectors = unit_vectors(args.rows, args.dimension, seed=7)
    with harness.bench_database("ep-bench-", url=args.database_url, name="postgres") as url:
        results = [
            run_strategy(url, s.strip(), vectors, args)
            for s in args.strategies.split(",")
            if s.strip()
        ]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))
    for result in results:
        if args.json:
            print(json.dumps(result))
        else:
            print(
                f"{result['strategy']:<26} +{result['rows']} on {result['indexed_before']}: "
                f"load {result['load_seconds']:>7.2f}s  index "
                f"{result['index_seconds']:>7.2f}s  total {result['total_seconds']:>7.2f}s  "
                f"{result['rows_per_second']:>8.1f} rows/s  index {result['index_mb']} MB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
