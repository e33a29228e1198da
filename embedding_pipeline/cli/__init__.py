"""`embedding-pipeline`: the embedded database, ingest, materialization, search and the demo."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import select
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import psycopg
import sqlalchemy.exc
from psycopg import sql

from embedding_pipeline.lib.embedders import Embedder, EmbeddingError
from embedding_pipeline.lib.sources.telegram import InputFileError
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.catalog import relation_exists
from embedding_pipeline.lib.store.conninfo import redact
from embedding_pipeline.lib.store.pgserver import (
    EmbeddedPostgres,
    EmbeddedServerError,
    postgres_bin_dir,
)
from embedding_pipeline.lib.store.schema import ERRORS_TABLE, SchemaError
from embedding_pipeline.search.errors import SearchError
from embedding_pipeline.search.filters import FILTER_NAMES
from embedding_pipeline.settings import (
    PROJECT_ROOT,
    Settings,
    TableSpec,
    api_keys,
    load_settings,
)

if TYPE_CHECKING:
    from embedding_pipeline.lib.engine.model_switch import Candidate
    from embedding_pipeline.lib.engine.row_errors import ErrorRecord
    from embedding_pipeline.search import Hit, Searcher
    from embedding_pipeline.search.evaluation import Evaluation, Question

SAMPLE_DIR = Path(__file__).parent.parent / "sample_data"
DEMO_QUESTION = "Why did the deployment fail on Friday?"
#: The project-local Dagster instance (SQLite in DAGSTER_HOME); production uses deploy/.
#: No telemetry, and no first-visit "Join the community" pop-up (`nux`) in the UI.
LOCAL_INSTANCE_CONFIG = "telemetry:\n  enabled: false\nnux:\n  enabled: false\n"
#: Runs launched by the daemon (sensor, schedule, backfill, UI) that fail, say while the
#: provider is down past EP_RETRY_DEADLINE_SECONDS, are launched again (their committed
#: batches stay); at most two runs at once per provider pool (`embeddings_<provider>`).
#: docs/operations.md, "Provider faults".
LOCAL_INSTANCE_CONFIG += """\
run_retries:
  enabled: true
  max_retries: 3
concurrency:
  pools:
    granularity: run
    default_limit: 2
"""
#: The queue starts a queued run within a second (Dagster's default waits up to five): a
#: sensor's run of a few new rows is part of how soon they are searchable.
_RUN_QUEUE = """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
"""
#: The sensors tick every 5 and 10 s: their skipped ticks (about 13,000 a day, 1 kB each)
#: are kept one day instead of Dagster's seven; ticks that launched runs are kept.
_TICK_RETENTION = """\
retention:
  sensor:
    purge_after_days:
      skipped: 1
"""
LOCAL_INSTANCE_CONFIG += _RUN_QUEUE + _TICK_RETENTION
#: Settings a dagster.yaml written by an older checkout may lack; added when absent.
_ADDED_WHEN_ABSENT = {
    "telemetry": "telemetry:\n  enabled: false\n",
    "nux": "nux:\n  enabled: false\n",
    "run_coordinator": _RUN_QUEUE,
    "retention": _TICK_RETENTION,
}


class CliError(RuntimeError):
    """An error to print without a traceback."""


def _server(settings: Settings) -> EmbeddedPostgres:
    e = settings.embedded
    return EmbeddedPostgres(e.data_dir, e.port, host=e.host)


def _require_database(settings: Settings, *, probe: bool = True) -> str:
    """The database URL, starting the embedded server first when it is the default; with
    `probe`, another database that cannot be reached fails here, before any work starts."""
    if settings.uses_embedded_database:
        server = _server(settings)
        if not server.status().running:
            print(
                f"starting the embedded database ({settings.embedded.host}:"
                f"{settings.embedded.port})",
                file=sys.stderr,
            )
            server.start()
        server.ensure_database(settings.embedded.database)
    elif probe:
        db.connect(settings.effective_database_url, vector=False).close()
    return settings.effective_database_url


def _require_schema(settings: Settings) -> str:
    """`_require_database`, and the pipeline's tables and the vector extension in it."""
    url = _require_database(settings)
    tables = [settings.extraction_table, *(spec.table for spec in settings.tables.values())]
    with db.connection(url, vector=False) as conn:
        missing = [table for table in tables if not relation_exists(conn, table)]
        vector = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
    if missing or vector is None:
        what = f"no table(s) {', '.join(missing)}" if missing else "no vector extension"
        raise CliError(
            f"the database has {what} yet; run `embedding-pipeline schema` (or `ingest`) first"
        )
    return url


def _require_api_key(settings: Settings) -> None:
    """Runs read OPENAI_API_KEY when they start; say so before, not in a Dagster stack."""
    if settings.embedder.provider == "openai" and not os.environ.get("OPENAI_API_KEY"):
        raise CliError(
            "EP_EMBEDDING_PROVIDER is openai but OPENAI_API_KEY is not set (for an "
            "OpenAI-compatible server that wants no key, any value will do)"
        )


def _embedder(settings: Settings) -> Embedder:
    from embedding_pipeline.definitions import build_resources
    from embedding_pipeline.resources import EmbedderResource

    _require_api_key(settings)
    resource = build_resources(settings)["embedder"]
    assert isinstance(resource, EmbedderResource)
    # resolves dg.EnvVar fields (OPENAI_API_KEY) as a run would
    return resource.process_config_and_initialize().build()


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "url":
        print(db.redact_url(settings.effective_database_url))
        return 0
    if args.action == "psql":
        return _exec_psql(settings, args.psql_args)
    if not settings.uses_embedded_database:
        raise CliError("DATABASE_URL is set: the embedded database is not in use")
    server = _server(settings)
    if args.action == "start":
        server.start()
        server.ensure_database(settings.embedded.database)
        print(f"running: {settings.embedded.url}")
    elif args.action == "stop":
        server.stop()
        print("stopped")
    else:
        status = server.status()
        print(status.describe())
        return 0 if status.running else 3
    return 0


def _exec_psql(settings: Settings, psql_args: Sequence[str]) -> int:
    """Replace this process with the `psql` of the server wheel, connected to the
    pipeline's database (the embedded one is started first). The password, if any,
    travels in PGPASSWORD, never on the command line other users' `ps` shows."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    psql = postgres_bin_dir() / "psql"
    if not os.access(psql, os.X_OK):
        raise CliError(f"no psql in {psql.parent}; use any PostgreSQL client with `db url`")
    params = conninfo_to_dict(_require_database(settings))
    env = dict(os.environ)
    password = params.pop("password", None)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(psql, [str(psql), make_conninfo("", **params), *psql_args], env)


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    """`dagster dev` (the UI, the daemon and its sensors) on this project's Dagster
    instance and database, in this process, so that SIGTERM stops it however it was
    started."""
    _require_database(settings)
    dagster = Path(sys.executable).parent / "dagster"
    # Started in the background by a shell without job control (`make dev &` in a script,
    # `setsid ... &`), this process ignores SIGINT, and `dagster dev` maps SIGTERM onto
    # SIGINT's handler: it would ignore SIGTERM as well. exec keeps ignored signals and
    # resets handled ones, so both get their default back first.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    command = [str(dagster), "dev", "-m", "embedding_pipeline.definitions"]
    os.execv(dagster, [*command, "-h", args.host, "-p", str(args.port)])


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from embedding_pipeline.lib.embedders import expected_dimension, expected_model_id
    from embedding_pipeline.lib.store.schema import ensure_schema

    url = _require_database(settings)
    e = settings.embedder
    dimension = expected_dimension(e.provider, e.model, e.dimensions)
    model_id = expected_model_id(
        e.provider, e.model, e.dimensions, e.query_prefix, e.document_prefix
    )
    with db.connection(url, vector=False) as conn:
        report = ensure_schema(conn, settings, dimension, model_id)
    changes = report.changes
    print("schema up to date" if not changes else "schema changes: " + ", ".join(changes))
    return 0


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from embedding_pipeline.lib.sources.ingest import ingest
    from embedding_pipeline.lib.sources.telegram import load_export, load_extraction

    export = load_export(args.export)
    extraction = load_extraction(args.extraction) if args.extraction else None
    cmd_schema(args, settings)
    with db.connection(settings.effective_database_url) as conn:
        report = ingest(conn, settings, export, extraction)
    if report.extraction_id is None:
        print("nothing new: every message, topic and atom is already in the database")
        return 0
    print(f"extraction {report.extraction_id}:")
    for name in ("messages", "topics", "atoms"):
        counts = getattr(report, name)
        print(
            f"  {name:<9} {counts.created:>5} created {counts.updated:>5} updated "
            f"{counts.unchanged:>5} unchanged"
        )
    print(
        f"  skipped {report.service_messages_skipped} service and "
        f"{report.empty_messages_skipped} empty messages"
    )
    return 0


def cmd_materialize(args: argparse.Namespace, settings: Settings) -> int:
    return _materialize(args, settings, trigger="cli")


def _imports_done() -> None:
    """Keep what the imports built (modules, classes, the definitions) out of the cyclic
    garbage collector's scans for the rest of this short-lived process: a Dagster run
    allocates enough to start full collections, and each one walked every imported object
    again (about 0.2 s of a run with nothing to do, measured)."""
    gc.freeze()


def _materialize(args: argparse.Namespace, settings: Settings, *, trigger: str) -> int:
    """One run of the `materialize_all` job (every month with work, and the checks)."""
    from embedding_pipeline.runner import RunFailed, materialize_all

    _imports_done()
    _require_api_key(settings)
    _require_database(settings)
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


def _print_status(settings: Settings) -> int:
    from embedding_pipeline.lib.quality.status import table_status

    model_id = _embedder(settings).model_id
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
    _require_schema(settings)
    _print_status(settings)
    return 0


def _search(
    settings: Settings,
    question: str,
    k: int,
    tables: Sequence[str] | None,
    *,
    mode: str = "hybrid",
    filters: dict[str, object] | None = None,
) -> dict[str, list[Hit]]:
    """Hits per table through the search API (`embedding_pipeline.search`). Without
    `tables`, every table the filters apply to."""
    from embedding_pipeline.search import Searcher
    from embedding_pipeline.search.api import engine_for
    from embedding_pipeline.search.filters import APPLICABLE

    searcher = Searcher(settings)
    used = [name for name, value in (filters or {}).items() if value is not None]
    keys = tables or [key for key, names in APPLICABLE.items() if set(used) <= names]
    engine = engine_for(settings.effective_database_url)
    try:
        with engine.connect() as conn:
            return {
                key: searcher.search(conn, question, table=key, k=k, filters=filters, mode=mode)
                for key in keys
            }
    finally:
        engine.dispose()


def _print_search(question: str, mode: str, results: dict[str, list[Hit]]) -> None:
    print(f'search ({mode}): "{question}"')
    for key, hits in results.items():
        print(f"  {key}:")
        for hit in hits:
            text = " ".join(hit.text.split())
            print(f"    {hit.score or 0.0:.3f}  #{hit.id}  {text[:110]}")


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    import json

    _require_api_key(settings)
    _require_schema(settings)
    filters = {name: getattr(args, name) for name in FILTER_NAMES}
    results = _search(settings, args.question, args.k, args.table, mode=args.mode, filters=filters)
    if args.json:
        payload = {
            "query": args.question,
            "mode": args.mode,
            "results": {key: [h.as_dict() for h in hits] for key, hits in results.items()},
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        _print_search(args.question, args.mode, results)
    return 0


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    """Search quality on a labelled questions file: recall@k, MRR@10 and nDCG@10 of every
    mode, per table and overall; with `--compare`, the current model and the candidate a
    `model switch --no-promote` left in the shadow columns, side by side."""
    import json

    from embedding_pipeline.search.evaluation import load_questions, text_report

    questions = load_questions(args.questions)
    _require_api_key(settings)
    url = _require_schema(settings)
    results = _evaluations(settings, url, questions, args, compare=args.compare)
    if args.json:
        payload = results[0].as_dict()
        if args.compare:
            payload = {
                "k": args.k,
                "questions": len(questions),
                "current": results[0].as_dict(),
                "candidate": results[1].as_dict(),
            }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        print(f"{args.questions}: {len(questions)} questions")
        print(text_report(results))
    return 0


def _evaluations(
    settings: Settings,
    url: str,
    questions: Sequence[Question],
    args: argparse.Namespace,
    *,
    compare: bool,
) -> list[Evaluation]:
    """The evaluation of the configured model (and with `compare`, of the candidate in the
    shadow columns) on `questions`, through the search API."""
    from embedding_pipeline.search import Searcher
    from embedding_pipeline.search.api import engine_for
    from embedding_pipeline.search.evaluation import MissingRows, evaluate

    searchers = [Searcher(settings)]
    if compare:
        searchers.append(_candidate_searcher(settings, url))
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            return [evaluate(conn, s, questions, k=args.k) for s in searchers]
    except MissingRows as exc:
        raise CliError(f"{args.questions}: {exc}") from None
    finally:
        engine.dispose()


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """The search API over HTTP (FastAPI on uvicorn); docs at /docs. Prints a line starting
    `search API ready` once it listens."""
    import logging

    from embedding_pipeline.search.http import create_app, run_server

    keys = api_keys()
    if not keys and not _is_loopback(args.host) and not args.allow_unauthenticated:
        raise CliError(
            f"--host {args.host} is reachable from other machines and EP_API_KEYS is not set: "
            "anyone reaching the port could search every message. Set EP_API_KEYS (or pass "
            "--allow-unauthenticated on a trusted network)"
        )
    logging.basicConfig(level=logging.INFO, format="%(levelname)-9s %(name)s: %(message)s")
    _require_database(settings, probe=False)  # it answers 503 until the database is back
    access = "an API key required" if keys else "no API key required"
    ready = f"search API ready on http://{args.host}:{args.port} ({access}; docs at /docs)"
    started = run_server(create_app(settings, api_keys=keys), args.host, args.port, ready)
    return 0 if started else 1


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    started = time.monotonic()
    args.export, args.extraction = SAMPLE_DIR / "result.json", SAMPLE_DIR / "extraction.json"
    args.table = None
    _require_database(settings)
    print(f"database: {db.redact_url(settings.effective_database_url)}")
    _load_sample(args, settings)
    _materialize(args, settings, trigger="demo")
    print()
    remaining = _print_status(settings)
    print()
    _print_search(args.question, "hybrid", _search(settings, args.question, 3, None))
    print()
    failed_checks = _print_checks(settings, None, trigger="demo")
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
    again = (
        f"embedding-pipeline ingest {_shown(args.export)} --extraction {_shown(args.extraction)}"
    )
    print(
        f"the sample chat is already loaded ({held} messages): not loading it again, so "
        f"nothing ingested since is undone (`{again}` loads it again)"
    )


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _print_checks(settings: Settings, tables: Sequence[str] | None, trigger: str = "cli") -> str:
    """Run the embedding assets' checks through Dagster (recorded on DAGSTER_HOME's
    instance, so the UI shows them), print one line each; the ERROR failures with their
    reasons, if any."""
    from embedding_pipeline.runner import run_embedding_checks, summary_lines

    _imports_done()
    run = run_embedding_checks(settings, tables=tables, trigger=trigger)
    print("\n".join(summary_lines(run)))
    return "; ".join(f"{o.asset}.{o.check} ({o.description})" for o in run.errors)


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    _require_api_key(settings)
    _require_schema(settings)
    failed = _print_checks(settings, args.table or None)
    if failed:
        raise CliError(f"asset checks failed with ERROR: {failed}")
    return 0


def cmd_backlog(args: argparse.Namespace, settings: Settings) -> int:
    """Per table and month partition, the rows a backfill would embed (nothing is written)."""
    import json

    from embedding_pipeline.lib.quality.backlog import backlog, partition_range, pending
    from embedding_pipeline.partitions import monthly_partitions, partition_key_for

    url = _require_schema(settings)
    partitions_def = monthly_partitions(settings.partition_start)
    keys = args.table or list(settings.tables)
    specs = [settings.tables[k] for k in keys]
    model_id = _embedder(settings).model_id
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
        print(f"  {_backfill_command(assets, *span)}")
    return 0


def _backfill_command(assets: str, first: str, last: str) -> str:
    """The command that materializes `assets` over the months `first` to `last` as one run
    in the calling process, recorded on DAGSTER_HOME's instance: `dg launch` where it is
    installed (the dev extra), else `dagster asset materialize`, which does the same."""
    home = f"DAGSTER_HOME={shlex.quote(os.environ.get('DAGSTER_HOME', ''))}"
    tools = Path(sys.executable).parent
    span = f"--partition-range {first}...{last}"
    if (tools / "dg").exists():
        return f"{home} {_shown(tools / 'dg')} launch --assets {assets} {span}"
    return (
        f"{home} {_shown(tools / 'dagster')} asset materialize -m embedding_pipeline.definitions "
        f"--select {assets} {span}"
    )


def cmd_model_status(args: argparse.Namespace, settings: Settings) -> int:
    """Each table's embedding column: size, registered model, models present, switch state."""
    from embedding_pipeline.lib.engine.model_switch import model_status

    url = _require_schema(settings)
    with db.connection(url, vector=False) as conn:
        for spec in settings.tables.values():
            print(model_status(conn, spec).describe())
    return 0


def _candidate_settings(settings: Settings, candidate: Candidate) -> Settings:
    """`settings` configured for the candidate model (keys and hosts as configured)."""
    from dataclasses import replace

    return replace(
        settings,
        embedder=replace(
            settings.embedder,
            provider=candidate.provider,
            model=candidate.model,
            dimensions=candidate.dimensions,
            vector_type=candidate.vector_type,
            query_prefix=candidate.query_prefix,
            document_prefix=candidate.document_prefix,
        ),
    )


def _staged_candidate(url: str) -> Candidate:
    from embedding_pipeline.lib.engine.model_switch import load_candidate

    with db.connection(url, vector=False) as conn:
        candidate = load_candidate(conn)
    if candidate is None:
        raise CliError(
            "no model switch is waiting in the shadow columns; start one with "
            "`embedding-pipeline model switch --provider ... --no-promote`"
        )
    return candidate


def _candidate_searcher(settings: Settings, url: str) -> Searcher:
    """A searcher over the shadow columns with the staged candidate's model: the same
    search code as the live one, on the other columns and index."""
    from dataclasses import replace

    from embedding_pipeline.lib.engine.model_switch import shadow_spec
    from embedding_pipeline.search import Searcher

    candidate = _staged_candidate(url)
    target = _candidate_settings(settings, candidate)
    embedder = _embedder(target)
    if embedder.model_id != candidate.model_id:
        raise CliError(
            f"the shadow columns were filled by {candidate.model_id} but this environment "
            f"makes {embedder.model_id} from the same settings; check the provider's host "
            "and EP_* variables"
        )
    shadows = {key: shadow_spec(spec) for key, spec in settings.tables.items()}
    return Searcher(replace(target, tables=shadows), embedder=embedder)


def _worse(current: Evaluation, candidate: Evaluation, tolerance: float) -> list[str]:
    """Each figure of a mode that depends on the model (vector, hybrid) where the candidate
    scores below the current model by more than `tolerance`."""
    drops = []
    for mode in ("vector", "hybrid"):
        now, then = current.overall(mode), candidate.overall(mode)
        for name, label in (("recall", f"recall@{current.k}"), ("mrr", "MRR@10")):
            before, after = getattr(now, name), getattr(then, name)
            if after < before - tolerance:
                drops.append(f"{mode} {label} {before:.3f} -> {after:.3f}")
    return drops


def _require_not_worse(args: argparse.Namespace, settings: Settings, url: str) -> None:
    """Score the current and the candidate model on the labelled questions; refuse (one
    line, nothing swapped) when the candidate is worse."""
    from embedding_pipeline.search.evaluation import load_questions, text_report

    path = args.questions or settings.checks.eval_questions
    if path is None:
        raise CliError(
            "--require-not-worse needs labelled questions: --questions FILE or EP_EVAL_QUESTIONS"
        )
    questions = load_questions(path)
    args.questions, args.k = path, 5
    current, candidate = _evaluations(settings, url, questions, args, compare=True)
    print(text_report([current, candidate]))
    drops = _worse(current, candidate, args.tolerance)
    if drops:
        raise CliError(
            f"{candidate.model} is worse than {current.model} on {path} "
            f"({len(questions)} questions): {'; '.join(drops)}. Nothing was swapped; the "
            "candidate stays in the shadow columns (`model switch --abort` discards it)"
        )
    print(f"{candidate.model} is not worse than {current.model} on {path}")


def cmd_model_switch(args: argparse.Namespace, settings: Settings) -> int:
    """Re-embed every table with another model in shadow columns, then swap them in;
    `--no-promote` stops before the swap (the candidate can be evaluated), `--promote`
    swaps a staged candidate in, `--require-not-worse` refuses a worse one."""
    from embedding_pipeline.lib.engine.model_switch import (
        abort_switch,
        clear_candidate,
        promote_switch,
        save_candidate,
        stage_switch,
    )
    from embedding_pipeline.lib.engine.options import Progress

    url = _require_schema(settings)
    specs = list(settings.tables.values())
    if args.abort:
        with db.connection(url, vector=False) as conn:
            for spec in specs:
                found = abort_switch(conn, spec)
                print(f"{spec.table}: " + ("switch discarded" if found else "no switch found"))
            clear_candidate(conn)
        return 0
    if args.promote and args.no_promote:
        raise CliError("model switch: --promote and --no-promote exclude each other")
    if args.promote:
        candidate = _staged_candidate(url)
        named = _candidate_from_args(settings, args) if args.provider else candidate
        if (named.model_id, named.vector_type) != (candidate.model_id, candidate.vector_type):
            raise CliError(
                f"--promote: the shadow columns hold {candidate.model_id} "
                f"({candidate.vector_type}), not {named.model_id} ({named.vector_type}) "
                "named on the command line (leave --provider out to promote the staged one)"
            )
    elif not args.provider:
        raise CliError("model switch needs --provider (or --promote, or --abort)")
    else:
        candidate = _candidate_from_args(settings, args)
    target = _candidate_settings(settings, candidate)
    embedder = _embedder(target)
    batch_size = args.batch_size or target.embedder.effective_batch_size
    if embedder.model_id != candidate.model_id:
        raise CliError(f"{embedder.model_id} is not the staged {candidate.model_id}")

    def progress(table: str, p: Progress) -> None:
        print(f"  {table}: {p.describe()}", file=sys.stderr)

    reports = None
    if not args.promote:
        print(
            f"switching {', '.join(s.table for s in specs)} to {embedder.describe()} stored as "
            f"{candidate.vector_type}; search keeps the current vectors until the swap"
        )
        with db.connection(url, vector=False) as conn:
            save_candidate(conn, candidate)
        reports = stage_switch(
            url,
            specs,
            embedder,
            settings.hnsw,
            batch_size=batch_size,
            vector_type=candidate.vector_type,
            on_progress=progress,
        )
        if args.no_promote:
            for r in reports:
                print(
                    f"  {r.table:<9} {r.model_id}: embedded {r.embedded} in {r.passes} "
                    f"pass(es), index {r.index_seconds:.1f}s"
                )
            print(
                "\nthe candidate waits in the shadow columns; compare it with `embedding-"
                "pipeline eval QUESTIONS.json --compare`, then `embedding-pipeline model switch "
                "--promote [--require-not-worse]` or `--abort`"
            )
            return 0
    if args.require_not_worse:
        _require_not_worse(args, settings, url)
    reports = promote_switch(
        url, specs, embedder, batch_size=batch_size, reports=reports, on_progress=progress
    )
    for r in reports:
        previous = f"{r.previous_model or 'nothing'} ({r.previous_dimension} dimensions)"
        print(
            f"  {r.table:<9} {previous} -> {r.model_id} ({candidate.vector_type}"
            f"({r.dimension})): embedded {r.embedded} in {r.passes} pass(es), index "
            f"{r.index_seconds:.1f}s, swap {r.swap_seconds * 1000:.0f} ms, "
            f"{r.left_for_next_run} left for the next run"
        )
    print(
        "\nswitched. Now set " + " ".join(_switch_env(candidate)) + " for every Dagster "
        "process (and reload the code location); until then runs refuse to write with the "
        "old model."
    )
    return 0


def _candidate_from_args(settings: Settings, args: argparse.Namespace) -> Candidate:
    """The model the command line names (prompts: the model's own unless given; storage
    type: the current one unless given)."""
    from embedding_pipeline.lib.embedders import expected_model_id
    from embedding_pipeline.lib.engine.model_switch import Candidate

    return Candidate(
        provider=args.provider,
        model=args.model,
        dimensions=args.dimensions,
        vector_type=args.vector_type or settings.embedder.vector_type,
        query_prefix=args.query_prefix,
        document_prefix=args.document_prefix,
        model_id=expected_model_id(
            args.provider, args.model, args.dimensions, args.query_prefix, args.document_prefix
        ),
    )


def _switch_env(candidate: Candidate) -> list[str]:
    """The EP_* assignments that configure the switched-to model."""
    env = [f"EP_EMBEDDING_PROVIDER={candidate.provider}"]
    for name, value in (
        ("EP_EMBEDDING_MODEL", candidate.model),
        ("EP_EMBEDDING_DIMENSIONS", candidate.dimensions),
        ("EP_QUERY_PREFIX", candidate.query_prefix),
        ("EP_DOCUMENT_PREFIX", candidate.document_prefix),
    ):
        if value is not None:
            env.append(f"{name}={shlex.quote(str(value))}")
    env.append(f"EP_VECTOR_TYPE={candidate.vector_type}")
    return env


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

    url = _require_schema(settings)
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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except the ones that mean "not given"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand: `summary` in its parent's list, `description` (or the summary) atop
    its own --help."""
    return sub.add_parser(
        name, help=summary, description=description or summary, formatter_class=_HelpFormatter
    )


def _table_option(parser: argparse.ArgumentParser, what: str = "only this table") -> None:
    parser.add_argument(
        "--table",
        action="append",
        choices=["messages", "topics", "atoms"],
        help=f"{what}; repeat it for several (default: every table)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedding-pipeline",
        description=__doc__,
        epilog="`embedding-pipeline COMMAND --help` describes a command and its options.",
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(
        sub, "db", "the embedded PostgreSQL+pgvector server: start, stop, status, url, psql"
    )
    db_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, what in (
        ("start", "start the embedded server (and create its database); does nothing if running"),
        ("stop", "stop the embedded server; does nothing if stopped"),
        ("status", "running or stopped, its port and data folder; exit code 3 when stopped"),
        ("url", "the database URL the commands use, its password hidden"),
    ):
        _command(db_sub, action, what).set_defaults(func=cmd_db)
    d = _command(
        db_sub,
        "psql",
        "psql (from the server wheel) on the pipeline's database",
        "Run the psql that ships with the embedded server, connected to the pipeline's "
        "database (DATABASE_URL, or the embedded server, started first if needed). No "
        "PostgreSQL client needs to be installed.",
    )
    d.add_argument(
        "psql_args",
        nargs=argparse.REMAINDER,
        metavar="PSQL_ARGS",
        help="everything after `db psql` goes to psql, e.g. -c 'SELECT count(*) FROM messages'",
    )
    d.set_defaults(func=cmd_db)

    p = _command(
        sub,
        "schema",
        "create or upgrade the tables, columns and indexes",
        "Create or upgrade the pipeline's tables, bookkeeping columns, triggers and indexes "
        "(never drops data).",
    )
    p.set_defaults(func=cmd_schema)

    p = _command(sub, "ingest", "load a Telegram export (and extraction) as one extraction")
    p.add_argument("export", type=Path, help="Telegram Desktop result.json")
    p.add_argument("--extraction", type=Path, help="extraction file with topics and atoms")
    p.set_defaults(func=cmd_ingest)

    p = _command(
        sub,
        "materialize",
        "materialize every asset and partition in-process",
        "Materialize the sources and every embedding partition in this process, as one run "
        "of the materialize_all job.",
    )
    _table_option(p)
    p.set_defaults(func=cmd_materialize)

    p = _command(sub, "status", "rows, missing and stale embeddings per table")
    p.set_defaults(func=cmd_status)

    p = _command(
        sub,
        "check",
        "run the embedding assets' checks through Dagster",
        "Run the asset checks through Dagster, as one run of the run_checks job (results land "
        "on the instance and in the UI).",
    )
    _table_option(p, "only this table's checks")
    p.set_defaults(func=cmd_check)

    p = _command(sub, "search", "semantic search over messages, topics and atoms")
    p.add_argument("question", help="what to look for, in plain words")
    p.add_argument("-k", type=_positive, default=5, help="results per table (1 to 100)")
    _table_option(p, "search this table")
    p.add_argument(
        "--mode",
        choices=["vector", "text", "hybrid"],
        default="vector",
        help="vector similarity, full-text, or both fused",
    )
    p.add_argument("--since", help="rows at or after this ISO date/time")
    p.add_argument("--until", help="rows before this ISO date/time")
    p.add_argument("--author", help="author (Telegram from_id)")
    p.add_argument("--topic", help="topic id or key")
    p.add_argument("--extraction", type=int, help="extraction id")
    p.add_argument("--kind", help="atom kind (atoms only)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.set_defaults(func=cmd_search)

    p = _command(sub, "eval", "search quality on labelled questions: recall@k, MRR, nDCG per mode")
    p.add_argument("questions", type=Path, help="labelled questions (search_questions.json)")
    p.add_argument(
        "-k",
        type=int,
        choices=range(1, 11),
        default=5,
        metavar="K",
        help="recall@K, K from 1 to 10",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="also score the candidate model a `model switch --no-promote` left in the "
        "shadow columns, side by side",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_eval)

    p = _command(
        sub,
        "serve",
        "the search API over HTTP (docs at /docs)",
        "The search API over HTTP (keys from EP_API_KEYS). Prints a line starting `search "
        "API ready on` once it listens; OpenAPI docs at /docs, GET /healthz, GET /metrics.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve on a non-loopback --host without EP_API_KEYS (trusted networks only)",
    )
    p.set_defaults(func=cmd_serve)

    p = _command(
        sub,
        "dev",
        "the Dagster UI and daemon (dagster dev) on this project's instance and database",
        "Run `dagster dev` (webserver, daemon, sensors) with DAGSTER_HOME's instance (the "
        "project's .dagster_home by default) on the pipeline's database, starting the "
        "embedded server first. Ctrl-C or SIGTERM stops it, however it was started. "
        "`make dev` runs this.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address the UI listens on")
    p.add_argument("--port", type=int, default=3000, help="port the UI listens on")
    p.set_defaults(func=cmd_dev)

    p = _command(
        sub,
        "backlog",
        "dry run of a backfill: rows needing embedding per table and month partition",
    )
    _table_option(p, "only this table")
    p.add_argument("--all", action="store_true", help="list up-to-date partitions too")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_backlog)

    p = _command(sub, "model", "the embedding model: status, or switch to another")
    model_sub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    m = _command(model_sub, "status", "column sizes, registered and present models")
    m.set_defaults(func=cmd_model_status)
    m = _command(
        model_sub,
        "switch",
        "re-embed everything with another model in shadow columns, then swap them in "
        "(search stays up)",
    )
    m.add_argument("--provider", choices=["local", "openai", "ollama"], help="the new provider")
    m.add_argument("--model", help="provider model name (default: the provider's default)")
    m.add_argument("--dimensions", type=_positive, help="vector size, if not the model's own")
    m.add_argument(
        "--vector-type",
        choices=["vector", "halfvec"],
        help="how the new vectors are stored (default: the current EP_VECTOR_TYPE)",
    )
    m.add_argument("--query-prefix", help="text before queries (default: the model's own)")
    m.add_argument("--document-prefix", help="text before documents (default: the model's own)")
    m.add_argument(
        "--batch-size", type=_positive, help="rows per provider request (default: EP_BATCH_SIZE)"
    )
    m.add_argument(
        "--no-promote",
        action="store_true",
        help="fill and index the shadow columns, then stop: compare with `eval --compare`",
    )
    m.add_argument(
        "--promote", action="store_true", help="swap in the candidate a --no-promote left"
    )
    m.add_argument(
        "--require-not-worse",
        action="store_true",
        help="before the swap, score both models on labelled questions; refuse a candidate "
        "whose vector or hybrid recall@5 or MRR is lower",
    )
    m.add_argument("--questions", type=Path, help="labelled questions (default: EP_EVAL_QUESTIONS)")
    m.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="how much lower a figure may be and still count as not worse",
    )
    m.add_argument("--abort", action="store_true", help="discard a switch in progress")
    m.set_defaults(func=cmd_model_switch)

    p = _command(sub, "errors", "rows the provider refused: list, retry or clear them")
    errors_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    e = _command(errors_sub, "list", "each failed row: table, id, attempts, next try, reason")
    _table_option(e)
    e.add_argument("--json", action="store_true", help="print the rows as JSON")
    e.set_defaults(func=cmd_errors)
    for action, what in (
        ("retry", "make failed rows due at the next run, with a fresh attempt count"),
        ("clear", "forget failed rows: the next run embeds them like new rows"),
    ):
        e = _command(errors_sub, action, what)
        e.add_argument("ids", nargs="*", metavar="ID", help="row ids (see `errors list`)")
        e.add_argument("--all", action="store_true", help="every failed row of the tables")
        _table_option(e)
        e.set_defaults(func=cmd_errors)

    p = _command(
        sub,
        "demo",
        "sample data in, embeddings out, a search printed",
        "What `make demo` runs: the embedded server, the sample chat ingested (unless the "
        "database already holds it), every asset materialized, the status, a hybrid search "
        "and every asset check.",
    )
    p.add_argument("--question", default=DEMO_QUESTION, help="the question searched for")
    p.set_defaults(func=cmd_demo)
    return parser


def write_local_instance_config(path: Path) -> None:
    """Create the local instance's dagster.yaml, or add the settings it lacks (an older
    checkout wrote telemetry only, or no run queue setting) without touching what a
    person configured."""
    if not path.exists():
        path.write_text(LOCAL_INSTANCE_CONFIG)
        return
    text = path.read_text()
    keys = {line.split(":", 1)[0] for line in text.splitlines() if not line.startswith(" ")}
    added = "".join(block for key, block in _ADDED_WHEN_ABSENT.items() if key not in keys)
    if added:
        path.write_text(text.rstrip("\n") + "\n" + added if text.strip() else added)


def main(argv: Sequence[str] | None = None) -> int:
    """The command; its output may be cut short by its reader (`| head`) without a word."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError as exc:
        if not _reader_left(sys.stdout):
            return _error(f"a pipe closed: {exc}")
        # stop as a tool killed by SIGPIPE does, and send what is still buffered nowhere
        # (the interpreter's last flush would print a traceback)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _reader_left(stream: TextIO) -> bool:
    """Whether `stream` is a pipe (or socket) whose reading end has been closed."""
    poller = select.poll()
    poller.register(stream.fileno(), select.POLLOUT)
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))


def _run(argv: Sequence[str] | None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # everything after `db psql` is psql's own (its options too: `db psql -c 'SELECT 1'`)
    passed = words[2:] if words[:2] == ["db", "psql"] else []
    args = build_parser().parse_args(words[: len(words) - len(passed)])
    if words[:2] == ["db", "psql"]:
        args.psql_args = passed[1:] if passed[:1] == ["--"] else passed
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home"))
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    write_local_instance_config(home / "dagster.yaml")
    try:
        return int(args.func(args, load_settings()))
    except (
        CliError,
        InputFileError,
        EmbeddedServerError,
        SchemaError,
        EmbeddingError,
        SearchError,
        ValueError,
    ) as exc:
        return _error(str(exc))
    except psycopg.errors.LockNotAvailable as exc:
        return _error(
            f"a table stayed locked by other sessions ({exc}); nothing was swapped. "
            "Run the same command again: finished work is kept and it resumes"
        )
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        return _error(
            f"{exc.diag.message_primary}; run `embedding-pipeline schema` first, or check the "
            "EP_*_TABLE and EP_*_COLUMN settings"
        )
    except (psycopg.OperationalError, sqlalchemy.exc.OperationalError) as exc:
        reason = exc.orig if isinstance(exc, sqlalchemy.exc.DBAPIError) else exc
        return _error(f"the database is unreachable: {reason}")
    except psycopg.Error as exc:
        return _error(f"the database refused: {type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        return _error("interrupted", 130)


def _error(message: str, code: int = 2) -> int:
    """Print `message` as one line, without the database password or the OpenAI key."""
    url, key = os.environ.get("DATABASE_URL"), os.environ.get("OPENAI_API_KEY")
    if url:
        message = redact(message, url)
    if key:
        message = message.replace(key, "***")
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return code
