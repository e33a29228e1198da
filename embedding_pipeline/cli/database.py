"""`db` (the embedded server, its URL, psql), `dev` (dagster dev) and `schema`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from embedding_pipeline.cli.common import CliError, embedded_server, require_database
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.pgserver import postgres_bin_dir
from embedding_pipeline.settings import Settings


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "url":
        print(db.redact_url(settings.effective_database_url))
        return 0
    if args.action == "psql":
        return _exec_psql(settings, args.psql_args)
    if not settings.uses_embedded_database:
        raise CliError("DATABASE_URL is set: the embedded database is not in use")
    server = embedded_server(settings)
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
    params = conninfo_to_dict(require_database(settings))
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
    require_database(settings)
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

    url = require_database(settings)
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
