"""`materialize`, `check`, `status` and `backlog`: runs of the named jobs, and what is
left to embed."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from embedding_pipeline.cli.common import (
    CliError,
    build_embedder,
    imports_done,
    require_api_key,
    require_database,
    require_schema,
    shown,
)
from embedding_pipeline.lib.store import db
from embedding_pipeline.settings import Settings


def cmd_materialize(args: argparse.Namespace, settings: Settings) -> int:
    return materialize(args, settings, trigger="cli")


def materialize(args: argparse.Namespace, settings: Settings, *, trigger: str) -> int:
    """One run of the `materialize_all` job (every month with work, and the checks)."""
    from embedding_pipeline.runner import RunFailed, materialize_all

    imports_done()
    require_api_key(settings)
    require_database(settings)
    started = time.monotonic()
    try:
        done = materialize_all(settings, only=args.table or None, trigger=trigger)
    except RunFailed as exc:
        raise CliError(str(exc)) from None
    failed = 0
    for name in done.current:
        print(f"  {name:<20} nothing due: every row has a current embedding")
    for name, metadata in done.figures.items():
        run_failed = metadata["run_rows_failed"]
        failed += run_failed
        print(
            f"  {name:<20} embedded {metadata['run_rows_embedded']:>6}, up to date "
            f"{metadata['run_details']['up_to_date']:>6}, {metadata['run_seconds']:.2f}s"
            + (f", failed {run_failed}" if run_failed else "")
        )
    print(f"materialized in {time.monotonic() - started:.1f}s (one run of materialize_all)")
    if failed:
        print(
            f"{failed} row(s) refused by the provider are recorded in the errors table: "
            "`embedding-pipeline errors list`"
        )
    return 0


def print_status(settings: Settings) -> int:
    from embedding_pipeline.lib.quality.status import table_status

    model_id = build_embedder(settings).model_id
    missing_total = failed_total = 0
    print(
        f"{'table':<10} {'rows':>7} {'missing':>8} {'stale':>6} {'failed':>7} {'empty':>6}"
        f"   model {model_id}"
    )
    with db.connection(settings.effective_database_url) as conn:
        for spec in settings.tables.values():
            s = table_status(conn, spec, model_id)
            missing_total += s.needs_embedding
            failed_total += s.failed
            print(
                f"{spec.table:<10} {s.rows:>7} {s.missing:>8} {s.stale:>6} {s.failed:>7} "
                f"{s.empty:>6}"
            )
    if failed_total:
        print(
            f"{failed_total} row(s) the provider refused have no current vector: "
            "`embedding-pipeline errors list`"
        )
    return missing_total


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    require_schema(settings)
    print_status(settings)
    return 0


def print_checks(settings: Settings, tables: Sequence[str] | None, trigger: str = "cli") -> str:
    """Run the embedding assets' checks through Dagster (recorded on DAGSTER_HOME's
    instance, so the UI shows them), print one line each; the ERROR failures with their
    reasons, if any."""
    from embedding_pipeline.runner import run_embedding_checks, summary_lines

    imports_done()
    run = run_embedding_checks(settings, tables=tables, trigger=trigger)
    print("\n".join(summary_lines(run)))
    return "; ".join(f"{o.asset}.{o.check} ({o.description})" for o in run.errors)


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    require_api_key(settings)
    require_schema(settings)
    failed = print_checks(settings, args.table or None)
    if failed:
        raise CliError(f"asset checks failed with ERROR: {failed}")
    return 0


def cmd_backlog(args: argparse.Namespace, settings: Settings) -> int:
    """Per table and month partition, the rows a backfill would embed (nothing is written)."""
    import json

    from embedding_pipeline.lib.quality.backlog import backlog, partition_range, pending
    from embedding_pipeline.partitions import monthly_partitions, partition_key_for

    url = require_schema(settings)
    partitions_def = monthly_partitions(settings.partition_start)
    keys = args.table or list(settings.tables)
    specs = [settings.tables[k] for k in keys]
    model_id = build_embedder(settings).model_id
    with db.connection(url, vector=False) as conn:
        rows = backlog(
            conn, specs, model_id, lambda month: partition_key_for(partitions_def, month)
        )
    if args.json:
        print(json.dumps([r.as_dict() for r in (rows if args.all else pending(rows))], indent=2))
        return 0
    shown = rows if args.all else pending(rows)
    print(
        f"{'table':<10} {'partition':<11} {'rows':>7} {'missing':>8} {'stale':>6}"
        f"   model {model_id}"
    )
    for r in shown:
        print(f"{r.table:<10} {r.partition:<11} {r.rows:>7} {r.missing:>8} {r.stale:>6}")
    work = pending(rows)
    print(
        f"{sum(r.needs_embedding for r in work)} rows need embedding in "
        f"{len({r.partition for r in work})} partition(s)"
    )
    span = partition_range(rows)
    if span:
        assets = ",".join(
            sorted(
                {
                    settings.tables[k].asset_name
                    for k in keys
                    if any(r.table == settings.tables[k].table for r in work)
                }
            )
        )
        print(
            "\nclear it with a backfill, from the UI (Materialize, choose the partitions) "
            "or the CLI:"
        )
        print(f"  {backfill_command(assets, *span)}")
    return 0


def backfill_command(assets: str, first: str, last: str) -> str:
    """The command that materializes `assets` over the months `first` to `last` as one run
    in the calling process, recorded on DAGSTER_HOME's instance: `dg launch` where it is
    installed (the dev extra), else `dagster asset materialize`, which does the same."""
    home = f"DAGSTER_HOME={shlex.quote(os.environ.get('DAGSTER_HOME', ''))}"
    tools = Path(sys.executable).parent
    span = f"--partition-range {first}...{last}"
    if (tools / "dg").exists():
        return f"{home} {shown(tools / 'dg')} launch --assets {assets} {span}"
    return (
        f"{home} {shown(tools / 'dagster')} asset materialize -m embedding_pipeline.definitions "
        f"--select {assets} {span}"
    )
