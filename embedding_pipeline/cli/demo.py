"""`demo`: the sample chat in, embeddings out, the status, a search and the checks."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from psycopg import sql

from embedding_pipeline.cli.common import CliError, require_database, shown
from embedding_pipeline.cli.ingest import cmd_ingest
from embedding_pipeline.cli.runs import materialize, print_checks, print_status
from embedding_pipeline.cli.search import print_search, search_tables
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.catalog import relation_exists
from embedding_pipeline.settings import Settings

SAMPLE_DIR = Path(__file__).parent.parent / "sample_data"
DEMO_QUESTION = "Why did the deployment fail on Friday?"


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    started = time.monotonic()
    args.export, args.extraction = SAMPLE_DIR / "result.json", SAMPLE_DIR / "extraction.json"
    args.table = None
    require_database(settings)
    print(f"database: {db.redact_url(settings.effective_database_url)}")
    _load_sample(args, settings)
    materialize(args, settings, trigger="demo")
    print()
    remaining = print_status(settings)
    print()
    print_search(args.question, "hybrid", search_tables(settings, args.question, 3, None))
    print()
    failed_checks = print_checks(settings, None, trigger="demo")
    print(f"\ndemo finished in {time.monotonic() - started:.1f}s")
    if remaining:
        raise CliError(f"{remaining} rows still need embedding")
    if failed_checks:
        raise CliError(f"asset checks failed with ERROR: {failed_checks}")
    return 0


def _load_sample(args: argparse.Namespace, settings: Settings) -> None:
    """Ingest the sample chat, unless the database already holds it: loading it again would
    put its original text back over what was ingested since (`update_result.json`)."""
    from embedding_pipeline.lib.sources.telegram import load_export

    chat = load_export(args.export).chat_id
    messages = settings.tables["messages"].table
    with db.connection(settings.effective_database_url, vector=False) as conn:
        held = 0
        if relation_exists(conn, messages):
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE chat_id = %s").format(
                    sql.Identifier(messages)
                ),
                (chat,),
            ).fetchone()
            held = int(row[0]) if row else 0
    if not held:
        cmd_ingest(args, settings)
        return
    again = f"embedding-pipeline ingest {shown(args.export)} --extraction {shown(args.extraction)}"
    print(
        f"the sample chat is already loaded ({held} messages): not loading it again, so "
        f"nothing ingested since is undone (`{again}` loads it again)"
    )
