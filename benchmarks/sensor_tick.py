"""The cost of one extraction-sensor tick and one backlog-sensor tick as the tables grow.

For each size N, messages, topics and atoms get N rows each, spread over two years and
1000 extractions; then one new extraction changes 50 messages and 10 atoms. Timed, as the
median of repeated evaluations:

- ``idle``: a tick with nothing new (the common case, every 30 seconds);
- ``new``: a tick that finds the new extraction and requests its runs;
- ``sql``: the tick's two statements alone (no Dagster).

It prints the plans of both statements (EXPLAIN ANALYZE, BUFFERS) at the largest size: index
scans whose buffers follow the new extraction's rows, not the table.

Backlog sensor (`--backlog`, on by default): every row of the three tables is then marked
embedded (one constant unit vector, the configured model, the hash of its text), and the
HNSW index is stood in for by an empty partial HNSW index of the same name (the tick only
reads the index's validity from `pg_index`; building a real one over 3 million vectors
takes hours on two cores). Timed, as medians:

- ``idle``: nothing pending (the common case, every 300 seconds);
- ``drift``: 50 messages set to NULL and 10 atom texts edited in SQL, spread over the
  months: the tick that requests the repair runs and reports the months;
- ``sql``: the tick's reads alone (`read_tables`: pending rows per month, index state).

Run: ``.venv/bin/python benchmarks/sensor_tick.py --sizes 10000,100000`` (a throwaway
embedded server unless ``--database-url`` points at an empty database).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Mapping

import dagster as dg
import harness
import psycopg
from psycopg import sql

from embedding_pipeline.definitions import build_definitions
from embedding_pipeline.lib.embedders import LOCAL_MODEL_ID
from embedding_pipeline.lib.sources.extractions import (
    ExtractionCursor,
    months_query,
    new_extractions_query,
    read_new_extractions,
    touched_months,
)
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.hnsw import hnsw_index_name
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.partitions import monthly_partitions
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.sensors import BACKLOG_SENSOR, SENSOR_NAME
from embedding_pipeline.sensors.backlog import read_tables
from embedding_pipeline.settings import Settings

EXTRACTIONS = 1000


def populate(conn: psycopg.Connection, rows: int) -> int:
    """N rows per table over 1000 extractions, then one more extraction touching 50
    messages and 10 atoms; returns the cursor position before it."""
    conn.execute("TRUNCATE extractions, messages, topics, atoms, atoms_messages CASCADE")
    conn.execute("ALTER SEQUENCE extractions_id_seq RESTART WITH 1")
    conn.execute(
        "INSERT INTO extractions (source) SELECT 'bulk ' || g FROM generate_series(1, %s) g",
        (EXTRACTIONS,),
    )
    step = sql.SQL("(timestamptz '2024-01-01' + g * (interval '730 days' / %(rows)s))")
    conn.execute(
        sql.SQL(
            "INSERT INTO messages (chat_id, telegram_message_id, sent_at, content, extraction_id) "
            "SELECT 1, g, {step}, 'message number ' || g, 1 + g %% %(ex)s "
            "FROM generate_series(1, %(rows)s) g"
        ).format(step=step),
        {"rows": rows, "ex": EXTRACTIONS},
    )
    for table, columns, values in (
        ("topics", "key, name, created_at", "'t' || g, 'topic ' || g, {step}"),
        (
            "atoms",
            "key, kind, title, content, created_at",
            "'a' || g, 'fact', 'atom ' || g, 'content ' || g, {step}",
        ),
    ):
        conn.execute(
            sql.SQL(
                "INSERT INTO {t} ({c}, extraction_id) SELECT {v}, 1 + g %% %(ex)s "
                "FROM generate_series(1, %(rows)s) g"
            ).format(
                t=sql.Identifier(table), c=sql.SQL(columns), v=sql.SQL(values).format(step=step)
            ),
            {"rows": rows, "ex": EXTRACTIONS},
        )
    conn.commit()
    new = conn.execute("INSERT INTO extractions (source) VALUES ('new') RETURNING id").fetchone()
    assert new is not None
    conn.execute(
        "UPDATE messages SET content = content || ' (edited)', extraction_id = %s "
        "WHERE id IN (SELECT id FROM messages ORDER BY random() LIMIT 50)",
        (new[0],),
    )
    conn.execute(
        "UPDATE atoms SET content = content || ' (edited)', extraction_id = %s "
        "WHERE id IN (SELECT id FROM atoms ORDER BY random() LIMIT 10)",
        (new[0],),
    )
    conn.commit()
    autocommit = conn.autocommit
    conn.autocommit = True
    for table in ("extractions", "messages", "topics", "atoms"):
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(table)))
    conn.autocommit = autocommit
    return int(new[0]) - 1


def plans(conn: psycopg.Connection, settings: Settings, after: int) -> str:
    out = []
    ids = [after + 1]
    statements: list[tuple[str, sql.Composed, Mapping[str, object]]] = [
        (
            "new extractions",
            new_extractions_query(settings.extraction_table),
            {"gaps": [], "after": after, "limit": 200},
        ),
        *[
            (f"months of {spec.table}", months_query(spec), {"ids": ids})
            for spec in settings.tables.values()
        ],
    ]
    for title, query, params in statements:
        rows = conn.execute(
            sql.Composed([sql.SQL("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) "), query]), params
        ).fetchall()
        out.append(f"-- {title}\n" + "\n".join(r[0] for r in rows))
    conn.rollback()
    return "\n\n".join(out)


def measure(url: str, rows: int, repeat: int) -> tuple[dict[str, float], str]:
    settings = Settings(database_url=url)
    with db.connection(url, vector=False) as conn:
        ensure_schema(conn, settings, 384)
        after = populate(conn, rows)
    resources = {"postgres": PostgresResource(database_url=url), "embedder": EmbedderResource()}
    defs = build_definitions(settings, resources)
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    before = ExtractionCursor(last_id=after).serialize()
    caught_up = ExtractionCursor(last_id=after + 1).serialize()
    with dg.instance_for_test() as instance:

        def tick(cursor: str) -> dg.SensorResult:
            with dg.build_sensor_context(
                instance=instance,
                cursor=cursor,
                resources=resources,
            ) as context:
                result = sensor(context)
            assert isinstance(result, dg.SensorResult)
            return result

        requested = tick(before).run_requests or []
        assert requested, "the new extraction requested no run"
        idle = harness.median_ms(lambda: tick(caught_up), repeat)
        new = harness.median_ms(lambda: tick(before), repeat)
    with db.connection(url, vector=False) as conn:

        def statements() -> None:
            found = read_new_extractions(
                conn,
                settings.extraction_table,
                ExtractionCursor(last_id=after),
                limit=200,
                now=time.time(),
                grace_seconds=600,
            )
            touched_months(conn, settings.tables.items(), found.ids)
            conn.rollback()

        only_sql = harness.median_ms(statements, repeat)
        plan = plans(conn, settings, after)
    return {
        "idle_ms": idle,
        "new_ms": new,
        "sql_ms": only_sql,
        "runs_requested": float(len(requested)),
    }, plan


def mark_embedded(conn: psycopg.Connection, settings: Settings) -> None:
    """Every row current: a constant unit vector by the configured model, hash = text hash;
    the HNSW index replaced by an empty partial one of the same name (see the docstring)."""
    autocommit = conn.autocommit
    conn.autocommit = True
    for spec in settings.tables.values():
        index = sql.Identifier(hnsw_index_name(spec))
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(index))
        conn.execute(
            sql.SQL(
                "UPDATE {t} SET embedding = (SELECT array_fill(1 / sqrt(384), ARRAY[384]))"
                "::vector, embedding_model = %s, embedding_hash = embedding_source_hash"
            ).format(t=sql.Identifier(spec.table)),
            (LOCAL_MODEL_ID,),
        )
        conn.execute(
            sql.SQL(
                "CREATE INDEX {i} ON {t} USING hnsw (embedding vector_cosine_ops) WHERE id < 0"
            ).format(i=index, t=sql.Identifier(spec.table))
        )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(spec.table)))
    conn.autocommit = autocommit


def drift(conn: psycopg.Connection) -> None:
    conn.execute(
        "UPDATE messages SET embedding = NULL "
        "WHERE id IN (SELECT id FROM messages ORDER BY random() LIMIT 50)"
    )
    conn.execute(
        "UPDATE atoms SET content = content || ' (edited in SQL)' "
        "WHERE id IN (SELECT id FROM atoms ORDER BY random() LIMIT 10)"
    )
    conn.commit()


def measure_backlog(url: str, repeat: int) -> dict[str, float]:
    """The backlog sensor's tick on the tables `measure` filled (see the docstring)."""
    settings = Settings(database_url=url)
    with db.connection(url, vector=False) as conn:
        ensure_schema(conn, settings, 384, LOCAL_MODEL_ID)  # the model's pending index
        mark_embedded(conn, settings)
    resources = {"postgres": PostgresResource(database_url=url), "embedder": EmbedderResource()}
    defs = build_definitions(settings, resources)
    sensor = defs.resolve_sensor_def(BACKLOG_SENSOR)
    partitions_def = monthly_partitions(settings.partition_start)
    with dg.instance_for_test() as instance:

        def tick(cursor: str | None) -> dg.SensorResult:
            with dg.build_sensor_context(
                instance=instance, cursor=cursor, resources=resources
            ) as context:
                result = sensor(context)
            assert isinstance(result, dg.SensorResult)
            return result

        settled = tick(None).cursor
        assert not tick(settled).run_requests
        idle = harness.median_ms(lambda: tick(settled), repeat)
        with db.connection(url, vector=False) as conn:
            drift(conn)
        requested = tick(settled).run_requests or []
        assert len(requested) == 2, [r.job_name for r in requested]
        busy = harness.median_ms(lambda: tick(settled), repeat)
    with db.connection(url, vector=False) as conn:
        only_sql = harness.median_ms(
            lambda: read_tables(conn, settings.tables.items(), LOCAL_MODEL_ID, partitions_def),
            repeat,
        )
    return {"idle_ms": idle, "drift_ms": busy, "sql_ms": only_sql, "runs": float(len(requested))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="rows per table, comma-separated")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument(
        "--database-url", help="an empty database (default: a throwaway embedded server)"
    )
    parser.add_argument("--no-backlog", action="store_true", help="time the extraction sensor only")
    args = parser.parse_args(argv)
    logging.getLogger("dagster").setLevel(logging.WARNING)
    with harness.bench_database("ep-bench-", url=args.database_url) as url:
        plan = ""
        backlog_lines = []
        print("extraction_sensor")
        print(f"{'rows/table':>10} {'idle tick':>10} {'new tick':>10} {'SQL only':>10} runs")
        for size in (int(s) for s in args.sizes.split(",")):
            figures, plan = measure(url, size, args.repeat)
            print(
                f"{size:>10} {figures['idle_ms']:>8.1f}ms {figures['new_ms']:>8.1f}ms "
                f"{figures['sql_ms']:>8.2f}ms {int(figures['runs_requested'])}",
                flush=True,
            )
            if not args.no_backlog:
                tick = measure_backlog(url, args.repeat)
                backlog_lines.append(
                    f"{size:>10} {tick['idle_ms']:>8.1f}ms {tick['drift_ms']:>8.1f}ms "
                    f"{tick['sql_ms']:>8.2f}ms {int(tick['runs'])}"
                )
        if backlog_lines:
            print("\nbacklog_sensor")
            print(f"{'rows/table':>10} {'idle tick':>10} {'drift tick':>10} {'SQL only':>10} runs")
            print("\n".join(backlog_lines))
        print("\nplans at the largest size:\n")
        print(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
