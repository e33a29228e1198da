"""`vector` against `halfvec` storage (EP_VECTOR_TYPE) at 100,000 rows, side by side in one
invocation: table and HNSW index size, index build time, recall@10 and latency of the
search API's vector mode.

Starts a throw-away PostgreSQL+pgvector server (the project's embedded one) and fills two
databases with the same rows (`search_latency.load`: 384-dimension unit vectors scattered
around N / 100 random centres, the same seed): one keeps `vector(384)`, the other's column
becomes `halfvec(384)` (`ALTER COLUMN ... TYPE halfvec`, the storage `model switch
--vector-type halfvec` makes). Each gets the HNSW index the pipeline builds
(`build_hnsw_index_concurrently`: m 16, ef_construction 64, `vector_cosine_ops` or
`halfvec_cosine_ops` after the column) and `VACUUM ANALYZE`.

Queries are drawn like the rows and asked through `Searcher.search` (vector mode, vector
given, ef_search 40; the plan is checked to use the HNSW index). recall@10 compares with
the exact answer over the float4 vectors (the `vector` database with index scans off), so
halfvec's figure includes what rounding to float2 costs; "exact scan" is each column
scanned exactly, which isolates that.

    .venv/bin/python benchmarks/halfvec.py                       # 100,000 rows, 200 queries
    .venv/bin/python benchmarks/halfvec.py --rows 20000 --queries 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import harness
import numpy as np
import psycopg
from search_latency import load, unit_rows

from embedding_pipeline.lib.quality.index import describe_plan, index_scans
from embedding_pipeline.lib.store.hnsw import build_hnsw_index_concurrently, hnsw_index_name
from embedding_pipeline.lib.store.pgserver import temporary_server
from embedding_pipeline.search import Searcher, engine_for
from embedding_pipeline.settings import Settings

TYPES = ("vector", "halfvec")


def prepare(url: str, settings: Settings, rows: int, seed: int, vector_type: str) -> np.ndarray:
    """The rows (as `search_latency` makes them), the column in `vector_type`, the index;
    returns the centres queries are drawn around. Prints sizes and build time."""
    centres = load(url, settings, rows, np.random.default_rng(seed))
    spec = settings.tables["messages"]
    with psycopg.connect(url, autocommit=True) as conn:
        if vector_type == "halfvec":
            conn.execute(
                "ALTER TABLE messages ALTER COLUMN embedding TYPE halfvec(384) "
                "USING embedding::halfvec(384)"
            )
        started = time.monotonic()
        build_hnsw_index_concurrently(conn, spec, settings.hnsw)
        build = time.monotonic() - started
        conn.execute("VACUUM ANALYZE messages")
        index, table = conn.execute(
            "SELECT pg_relation_size(%s::regclass), pg_total_relation_size('messages') "
            "- pg_indexes_size('messages')",
            (hnsw_index_name(spec),),
        ).fetchone()
    print(
        f"  {vector_type:<8} index {index / 2**20:7.1f} MB, table {table / 2**20:7.1f} MB, "
        f"index build {build:6.1f} s",
        flush=True,
    )
    return centres


def answers(
    url: str, settings: Settings, queries: np.ndarray, *, exact: bool
) -> tuple[list[list[int]], list[float]]:
    """The ids of the ten nearest rows per query through the search API, and the time of
    each search (ms); `exact`: index scans off (the exact answer)."""
    searcher = Searcher(settings)
    engine = engine_for(url)
    ids, times = [], []
    with engine.connect() as conn:
        if exact:
            conn.exec_driver_sql("SET enable_indexscan = off")
        plan = searcher.explain(conn, "q", k=10, vector=queries[0])
        used = hnsw_index_name(settings.tables["messages"]) in index_scans(plan)
        assert used != exact, f"HNSW index {'used' if used else 'not used'}: {describe_plan(plan)}"
        for query in queries:
            started = time.perf_counter()
            hits = searcher.search(conn, "q", k=10, vector=query)
            times.append((time.perf_counter() - started) * 1000)
            ids.append([h.id for h in hits])
    engine.dispose()
    return ids, times


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    return statistics.fmean(
        len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    print(f"{args.rows} rows of 384 dimensions, {args.queries} queries")
    with temporary_server("ep-halfvec-") as server:
        urls, settings, centres = {}, {}, None
        for vector_type in TYPES:
            server.ensure_database(vector_type)
            urls[vector_type] = server.url(vector_type)
            base = Settings(database_url=urls[vector_type])
            settings[vector_type] = replace(
                base, embedder=replace(base.embedder, vector_type=vector_type)
            )
            centres = prepare(
                urls[vector_type], settings["vector"], args.rows, args.seed, vector_type
            )
        assert centres is not None
        queries = unit_rows(np.random.default_rng(args.seed + 1), centres, args.queries)
        truth, _ = answers(urls["vector"], settings["vector"], queries, exact=True)
        print("| storage | recall@10 (HNSW) | recall@10 (exact scan) | p50 ms | p95 ms |")
        for vector_type in TYPES:
            found, times = answers(urls[vector_type], settings[vector_type], queries, exact=False)
            scanned, _ = answers(urls[vector_type], settings[vector_type], queries, exact=True)
            print(
                f"| {vector_type} | {recall(found, truth):.3f} | {recall(scanned, truth):.3f} | "
                f"{statistics.median(times):.1f} | "
                f"{harness.percentile(times, 0.95, method='lower'):.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
