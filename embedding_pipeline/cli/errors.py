"""`errors list|retry|clear`: the rows the provider refused (the errors table)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import psycopg

from embedding_pipeline.cli.common import CliError, require_schema
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.catalog import relation_exists
from embedding_pipeline.lib.store.schema import ERRORS_TABLE
from embedding_pipeline.settings import Settings, TableSpec

if TYPE_CHECKING:
    from embedding_pipeline.lib.engine.row_errors import ErrorRecord


def _row_ids(args: argparse.Namespace) -> list[int] | None:
    """The row ids named on the command line, or None for `--all`; exactly one of them."""
    if args.all and args.ids:
        raise CliError(f"errors {args.action}: name row ids or --all, not both")
    if args.all:
        return None
    if not args.ids:
        raise CliError(f"errors {args.action}: name the row ids (see `errors list`) or --all")
    ids = []
    for text in args.ids:
        try:
            ids.append(int(text))
        except ValueError:
            raise CliError(f"errors {args.action}: {text!r} is not a row id") from None
    return ids


def _next_try(record: ErrorRecord, now: datetime) -> str:
    if record.next_attempt_at is None:
        return "given up"
    if record.next_attempt_at <= now:
        return "due now"
    return record.next_attempt_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _print_errors(records: Sequence[ErrorRecord], now: datetime) -> None:
    if not records:
        print("no failed rows")
        return
    print(f"{'table':<10} {'id':>10} {'attempts':>8}  {'next try':<23}  reason")
    for r in records:
        print(
            f"{r.table:<10} {r.row_id:>10} {r.attempts:>8}  {_next_try(r, now):<23}  "
            f"{' '.join(r.message.split())}"
        )
    print(
        f"{len(records)} failed row(s); `embedding-pipeline errors retry --all` has the next "
        "run try them again, `errors clear --all` forgets them"
    )


def _error_targets(
    conn: psycopg.Connection, specs: Sequence[TableSpec], ids: list[int] | None, action: str
) -> list[tuple[TableSpec, list[int] | None]]:
    """(table, its row ids or None for all) to act on; every id must be recorded for
    exactly one of `specs`' tables."""
    from embedding_pipeline.lib.engine.row_errors import list_errors

    if ids is None:
        return [(spec, None) for spec in specs]
    found: dict[str, list[int]] = {}
    for record in list_errors(conn, specs, ids=ids):
        found.setdefault(record.table, []).append(record.row_id)
    tables_of = {i: [t for t, rows in found.items() if i in rows] for i in ids}
    missing = [str(i) for i, tables in tables_of.items() if not tables]
    if missing:
        raise CliError(
            f"errors {action}: no failed row with id {', '.join(missing)} in "
            f"{', '.join(s.table for s in specs)} (see `errors list`)"
        )
    shared = [f"{i} ({', '.join(t)})" for i, t in tables_of.items() if len(t) > 1]
    if shared:
        raise CliError(
            f"errors {action}: id {'; '.join(shared)} is recorded for more than one table; "
            "name one with --table"
        )
    return [(spec, found[spec.table]) for spec in specs if spec.table in found]


def cmd_errors(args: argparse.Namespace, settings: Settings) -> int:
    """Rows the provider refused (the errors table): list them, make them due again, or
    forget them."""
    import json

    from embedding_pipeline.lib.engine import row_errors

    url = require_schema(settings)
    specs = [settings.tables[key] for key in (args.table or settings.tables)]
    with db.connection(url, vector=False) as conn:
        if not relation_exists(conn, ERRORS_TABLE):
            raise CliError(
                f"the database has no table {ERRORS_TABLE} yet; run `embedding-pipeline schema`"
            )
        if args.action == "list":
            records = row_errors.list_errors(conn, specs)
            if args.json:
                print(json.dumps([r.as_dict() for r in records], indent=2, ensure_ascii=False))
            else:
                _print_errors(records, datetime.now(UTC))
            return 0
        targets = _error_targets(conn, specs, _row_ids(args), args.action)
        for spec, ids in targets:
            if args.action == "retry":
                count = row_errors.retry_now(conn, [spec], ids)
                print(f"{spec.table}: {count} row(s) due again, attempts reset")
            else:
                count = row_errors.clear_errors(conn, [spec], ids)
                print(f"{spec.table}: {count} record(s) removed; the rows are pending again")
        conn.commit()  # the look-up above opened a transaction: the changes were nested in it
    if args.action == "retry":
        print(
            "the next run tries them: `embedding-pipeline materialize`, or launch their "
            "partitions in the Dagster UI"
        )
    return 0
