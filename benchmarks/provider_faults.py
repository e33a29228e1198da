"""Embedding N rows through a provider that misbehaves, against the same rows with none.

What `embedding-pipeline materialize` does (one in-process Dagster run of
`message_embeddings` over every partition, on a throwaway embedded PostgreSQL 18 /
pgvector 0.8) with `EP_EMBEDDING_PROVIDER=openai` pointed at the fault-injecting server the
tests use too (`embedding_pipeline/testing/fault_server.py`), twice in one invocation:

- ``no faults``: every request answered;
- ``storm``: 30% of requests answered 429 with ``Retry-After`` (1 s by default), 10% 500.

Between the two every vector is removed again, so both embed the same rows from scratch
(the storm run also rebuilds the HNSW index after its bulk load, like the first). For
each it prints whether the one run completed, the rows embedded and still missing, the
requests, faults and retries, the inputs the server received more than once (re-sent
after a fault) and answered successfully more than once (paid twice: must be 0), and the
storm's rows/s (rows embedded per second of the embedding step, as its metadata reports,
index build included) as a fraction of the fault-free run's.

Run: ``.venv/bin/python benchmarks/provider_faults.py`` (20,000 rows; ``--rows``,
``--retry-after``, ``--rate-429``, ``--rate-500`` to vary it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import harness
import psycopg

from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.pgserver import temporary_server
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.runner import RunFailed, materialize_all
from embedding_pipeline.settings import Settings, load_settings
from embedding_pipeline.testing.fault_server import Faults, FaultServer

DIMENSION = 384
MODEL_ID = f"openai:text-embedding-3-small@{DIMENSION}"


@dataclass
class Outcome:
    scenario: str
    completed: bool
    reason: str
    embedded: int
    missing: int
    requests: int
    faults: int
    #: Fault kind -> requests (429, 500, ...).
    fault_kinds: dict[str, int]
    retries: int
    sent_again: int
    answered_again: int
    #: The whole run, Dagster's start included.
    wall_seconds: float
    #: The embedding step alone (its metadata): claims, requests, writes, index build.
    seconds: float

    @property
    def kinds(self) -> str:
        listed = ", ".join(f"{n} answered {kind}" for kind, n in self.fault_kinds.items())
        return f" ({listed})" if listed else ""

    @property
    def rows_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0


def load_rows(url: str, settings: Settings, rows: int) -> None:
    """`rows` messages over 24 months, texts of 20 to 60 words."""
    with db.connection(url, vector=False) as conn:
        ensure_schema(conn, settings, DIMENSION, MODEL_ID)
        conn.execute(
            "INSERT INTO messages (chat_id, telegram_message_id, sent_at, content) "
            "SELECT 1, g, timestamptz '2024-01-01' + (g %% 730) * interval '1 day', "
            "'message ' || g || ': ' || repeat('notes on item ' || (g %% 97) || ' and ', "
            "5 + g %% 10) || 'the end' FROM generate_series(1, %s) g",
            (rows,),
        )
        conn.commit()


def clear_vectors(url: str) -> None:
    with db.connection(url, autocommit=True, vector=False) as conn:
        conn.execute(
            "UPDATE messages SET embedding = NULL, embedding_model = NULL, "
            "embedding_hash = NULL, embedded_at = NULL"
        )
        conn.execute("VACUUM ANALYZE messages")


def missing(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM messages WHERE embedding IS NULL").fetchone()
    return int(row[0]) if row else -1


def run(
    scenario: str, settings: Settings, server: FaultServer, instance: dg.DagsterInstance
) -> Outcome:
    url = settings.effective_database_url
    clear_vectors(url)
    server.reset_counts()
    started = time.monotonic()
    completed, reason, metadata = True, "", {}
    try:
        done = materialize_all(settings, only=["messages"], instance=instance)
        metadata = done.figures.get("message_embeddings", {})
    except RunFailed as exc:
        completed, reason = False, str(exc)
    seconds = time.monotonic() - started
    counts = server.snapshot()
    return Outcome(
        scenario=scenario,
        completed=completed,
        reason=reason,
        embedded=int(metadata.get("run_rows_embedded", 0)),
        missing=missing(url),
        requests=counts.requests,
        faults=counts.faults,
        fault_kinds={k: n for k, n in sorted(counts.outcomes.items()) if k != "200"},
        retries=int(metadata.get("run_details", {}).get("retries", 0)),
        sent_again=len(counts.sent_more_than_once()),
        answered_again=len(counts.answered_more_than_once()),
        wall_seconds=seconds,
        seconds=float(metadata.get("run_seconds", 0.0)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rate-429", type=float, default=0.3)
    parser.add_argument("--rate-500", type=float, default=0.1)
    parser.add_argument("--retry-after", type=float, default=1.0, help="seconds, on 429s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    harness.print_load_at_start()
    with (
        tempfile.TemporaryDirectory(prefix="ep-faults-dagster-") as home,
        temporary_server("ep-bench-faults-") as pg,
        FaultServer(Faults(max_input_tokens=8192), dimension=DIMENSION, seed=args.seed) as server,
        harness.dagster_instance(Path(home)) as instance,
    ):
        pg.ensure_database("bench")
        url = pg.url("bench")
        # configured as a user of `embedding-pipeline materialize` configures it
        os.environ.update(
            {
                "DATABASE_URL": url,
                "EP_EMBEDDING_PROVIDER": "openai",
                "EP_EMBEDDING_DIMENSIONS": str(DIMENSION),
                "OPENAI_BASE_URL": server.openai_base_url,
                "OPENAI_API_KEY": "sk-benchmark-not-a-key",
            }
        )
        settings = load_settings()
        load_rows(url, settings, args.rows)
        print(
            f"{args.rows} rows; provider openai at the fault server (batch "
            f"{settings.embedder.effective_batch_size}, 4 requests in flight, retry deadline "
            f"{settings.embedder.retry_deadline_seconds:g}s)"
        )
        outcomes = [run("no faults", settings, server, instance)]
        server.configure(
            rate_429=args.rate_429, rate_500=args.rate_500, retry_after=args.retry_after
        )
        storm = (
            f"storm ({args.rate_429:.0%} 429 Retry-After {args.retry_after:g}s, "
            f"{args.rate_500:.0%} 500)"
        )
        outcomes.append(run(storm, settings, server, instance))
    base = outcomes[0].rows_per_second
    print(
        "\n| scenario | completed in one run | rows embedded | rows missing | requests | "
        "faults | retries | inputs sent more than once | inputs answered more than once | "
        "run seconds | embedding seconds | rows/s | rows/s vs no faults |\n"
        + harness.table_rule("l" * 13)
    )
    for o in outcomes:
        print(
            f"| {o.scenario} | {'yes' if o.completed else 'no'} | {o.embedded:,} | "
            f"{o.missing:,} | {o.requests} | {o.faults}{o.kinds} | {o.retries} | "
            f"{o.sent_again:,} | "
            f"{o.answered_again:,} | {o.wall_seconds:.1f} | {o.seconds:.1f} | "
            f"{o.rows_per_second:,.0f} | "
            f"{o.rows_per_second / base if base else 0:.2f} |"
        )
        if o.reason:
            print(f"  failed: {o.reason}")
    print(f"load average at end: {harness.load_average():.2f}")
    return 0 if all(o.completed and o.missing == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
