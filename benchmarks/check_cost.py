"""What the asset checks cost on a large table.

Starts a throw-away PostgreSQL+pgvector server (the project's embedded one) in a temporary
folder, fills `messages` with N rows of random unit vectors that are current for the
configured model (so every check should pass), builds the HNSW index with the configured
parameters, then runs the seven checks of `message_embeddings` through Dagster, `--passes`
times, and prints what each one took (its own `check_seconds`) and found.

    .venv/bin/python benchmarks/check_cost.py              # 100,000 rows
    .venv/bin/python benchmarks/check_cost.py --rows 20000

Random unit vectors in 384 dimensions have no cluster structure: the hardest case for an
HNSW graph, so the recall measured on them is a floor, not an estimate for real embeddings.
`--data clustered` draws the vectors around `rows / 100` random centres instead (nearest
neighbours at cosine similarity 0.5 to 0.6, as sentence embeddings of related texts have),
which is closer to what the index meets in production.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import dagster as dg
import harness
import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from embedding_pipeline.definitions import build_definitions
from embedding_pipeline.lib.embedders import LOCAL_DIMENSION, LOCAL_MODEL_ID
from embedding_pipeline.lib.store.expressions import compose_text, content_hash
from embedding_pipeline.lib.store.hnsw import build_hnsw_index_concurrently, hnsw_index_name
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.runner import CheckRun, run_embedding_checks
from embedding_pipeline.settings import Settings

WORDS = [
    "deploy",
    "backup",
    "disk",
    "gateway",
    "outage",
    "rollback",
    "cache",
    "test",
    "build",
    "onboarding",
    "laptop",
    "access",
    "pizza",
    "friday",
    "incident",
    "postmortem",
    "volume",
    "pods",
    "cluster",
    "database",
    "index",
    "query",
    "latency",
]


def unit_vectors(rng: np.random.Generator, n: int, centres: np.ndarray | None) -> np.ndarray:
    """`n` random unit vectors, uniform on the sphere or scattered around `centres`."""
    if centres is None:
        vectors = rng.normal(size=(n, LOCAL_DIMENSION))
    else:
        picked = centres[rng.integers(0, len(centres), size=n)]
        vectors = picked + rng.normal(scale=0.045, size=(n, LOCAL_DIMENSION))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def load_rows(url: str, settings: Settings, rows: int, seed: int, data: str) -> float:
    """Create the schema and COPY `rows` current, embedded messages; seconds taken."""
    spec = settings.tables["messages"]
    rng = np.random.default_rng(seed)
    centres = unit_vectors(rng, max(1, rows // 100), None) if data == "clustered" else None
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        ensure_schema(conn, settings, LOCAL_DIMENSION)
        register_vector(conn)
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(hnsw_index_name(spec))))
        base = datetime(2024, 1, 1, tzinfo=UTC)
        columns = sql.SQL(", ").join(
            sql.Identifier(c)
            for c in (
                "chat_id",
                "telegram_message_id",
                "author",
                "sent_at",
                spec.text_columns[0],
                spec.embedding_column,
                spec.model_column,
                spec.hash_column,
                spec.embedded_at_column,
            )
        )
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT BINARY)").format(
            sql.Identifier(spec.table), columns
        )
        now = datetime.now(UTC)
        chunk = 10_000
        with conn.cursor().copy(copy_sql) as copy:
            copy.set_types(
                [
                    "int8",
                    "int8",
                    "text",
                    "timestamptz",
                    "text",
                    "vector",
                    "text",
                    "text",
                    "timestamptz",
                ]
            )
            for start in range(0, rows, chunk):
                n = min(chunk, rows - start)
                vectors = unit_vectors(rng, n, centres)
                minutes = rng.integers(0, 2 * 365 * 24 * 60, size=n)
                for i in range(n):
                    text = " ".join(rng.choice(WORDS, size=12)) + f" #{start + i}"
                    copy.write_row(
                        [
                            1,
                            start + i + 1,
                            "bench",
                            base + timedelta(minutes=int(minutes[i])),
                            text,
                            vectors[i],
                            LOCAL_MODEL_ID,
                            content_hash(compose_text([text])),
                            now,
                        ]
                    )
        conn.commit()
    return time.perf_counter() - started


def build_index(url: str, settings: Settings) -> float:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        build_hnsw_index_concurrently(conn, settings.tables["messages"], settings.hnsw)
        conn.execute("VACUUM ANALYZE messages")
    return time.perf_counter() - started


def table_sizes(url: str) -> tuple[str, str]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT pg_size_pretty(pg_table_size('messages')), "
            "pg_size_pretty(pg_relation_size('messages_embedding_hnsw_idx'))"
        ).fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


def print_table(runs: list[CheckRun]) -> None:
    header = "| check | " + " | ".join(f"pass {i + 1} (s)" for i in range(len(runs)))
    print(header + " | result |")
    print(harness.table_rule("l" + "r" * len(runs) + "l"))
    for i, outcome in enumerate(runs[-1].outcomes):
        seconds = " | ".join(
            f"{run.outcomes[i].metadata.get('check_seconds', 0.0):.3f}" for run in runs
        )
        status = "pass" if outcome.passed else f"FAIL {outcome.severity}"
        print(f"| {outcome.check} | {seconds} | {status}: {outcome.description} |")
    sums = " | ".join(
        f"{sum(o.metadata.get('check_seconds', 0.0) for o in run.outcomes):.3f}" for run in runs
    )
    walls = " | ".join(f"{run.seconds:.1f}" for run in runs)
    print(f"| **sum of the checks** | {sums} | |")
    print(f"| **Dagster run, wall** | {walls} | |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=["random", "clustered"], default="random")
    parser.add_argument("--ef-search", type=int, help="hnsw.ef_search (default: the setting)")
    parser.add_argument("--keep", action="store_true", help="leave the server and data running")
    args = parser.parse_args(argv)

    with harness.bench_database("ep-check-cost-", keep=args.keep) as url:
        settings = Settings(database_url=url)
        if args.ef_search:
            settings = replace(settings, hnsw=replace(settings.hnsw, ef_search=args.ef_search))
        load_seconds = load_rows(url, settings, args.rows, args.seed, args.data)
        index_seconds = build_index(url, settings)
        heap, index = table_sizes(url)
        print(
            f"{args.rows} {args.data} rows loaded in {load_seconds:.1f}s; HNSW index "
            f"(m={settings.hnsw.m}, ef_construction={settings.hnsw.ef_construction}) built in "
            f"{index_seconds:.1f}s; "
            f"table {heap}, index {index}"
        )
        defs = build_definitions(
            settings,
            {"postgres": PostgresResource(database_url=url), "embedder": EmbedderResource()},
        )
        runs = []
        with dg.instance_for_test() as instance:
            for _ in range(args.passes):
                runs.append(
                    run_embedding_checks(
                        settings, defs=defs, instance=instance, tables=["messages"]
                    )
                )
        print()
        print_table(runs)
        return 0 if all(o.passed for o in runs[-1].outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
