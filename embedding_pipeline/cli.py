"""`embedding-pipeline`: the embedded database, ingest, materialization, search and the demo."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from embedding_pipeline.lib import db
from embedding_pipeline.lib.embedders import Embedder, EmbeddingError
from embedding_pipeline.lib.pgserver import EmbeddedPostgres, EmbeddedServerError
from embedding_pipeline.lib.schema import SchemaError
from embedding_pipeline.lib.telegram import InputFileError
from embedding_pipeline.settings import PROJECT_ROOT, Settings, load_settings

SAMPLE_DIR = Path(__file__).parent / "sample_data"
DEMO_QUESTION = "Why did the deployment fail on Friday?"
#: The project-local Dagster instance (SQLite in DAGSTER_HOME); production uses deploy/.
LOCAL_INSTANCE_CONFIG = "telemetry:\n  enabled: false\n"


class CliError(RuntimeError):
    """An error to print without a traceback."""


def _server(settings: Settings) -> EmbeddedPostgres:
    e = settings.embedded
    return EmbeddedPostgres(e.data_dir, e.port, host=e.host)


def _require_database(settings: Settings) -> str:
    """The database URL, starting the embedded server first when it is the default."""
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
    return settings.effective_database_url


def _embedder(settings: Settings) -> Embedder:
    from embedding_pipeline.definitions import build_resources
    from embedding_pipeline.resources import EmbedderResource

    resource = build_resources(settings)["embedder"]
    assert isinstance(resource, EmbedderResource)
    return resource.build()


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "url":
        print(db.redact_url(settings.effective_database_url))
        return 0
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


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from embedding_pipeline.lib.embedders import expected_dimension
    from embedding_pipeline.lib.schema import ensure_schema

    url = _require_database(settings)
    e = settings.embedder
    dimension = expected_dimension(e.provider, e.model, e.dimensions)
    with db.connection(url, vector=False) as conn:
        report = ensure_schema(conn, settings, dimension)
    changes = report.created_tables + report.added_columns + report.created_indexes
    print("schema up to date" if not changes else "schema changes: " + ", ".join(changes))
    return 0


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from embedding_pipeline.lib.ingest import ingest
    from embedding_pipeline.lib.telegram import load_export, load_extraction

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
    from embedding_pipeline.runner import materialize_all

    _require_database(settings)
    started = time.monotonic()
    results = materialize_all(settings, only=args.table or None)
    for name, metadata in results.items():
        print(
            f"  {name:<20} embedded {metadata['rows_embedded']:>6}, up to date "
            f"{metadata['rows_skipped_up_to_date']:>6}, {metadata['seconds']:.2f}s"
        )
    print(f"materialized in {time.monotonic() - started:.1f}s")
    return 0


def _print_status(settings: Settings) -> int:
    from embedding_pipeline.lib.status import table_status

    model_id = _embedder(settings).model_id
    missing_total = 0
    print(f"{'table':<10} {'rows':>7} {'missing':>8} {'stale':>6}   model {model_id}")
    with db.connection(settings.effective_database_url) as conn:
        for spec in settings.tables.values():
            status = table_status(conn, spec, model_id)
            missing_total += status.needs_embedding
            print(f"{spec.table:<10} {status.rows:>7} {status.missing:>8} {status.stale:>6}")
    return missing_total


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    _require_database(settings)
    _print_status(settings)
    return 0


def _print_search(settings: Settings, question: str, k: int, tables: Sequence[str]) -> None:
    from embedding_pipeline.lib.search import search_table

    embedder = _embedder(settings)
    query = embedder.embed([question])[0]
    print(f'search: "{question}"')
    with db.connection(settings.effective_database_url) as conn:
        for key in tables:
            spec = settings.tables[key]
            hits = search_table(conn, spec, query, k=k, ef_search=settings.hnsw.ef_search)
            print(f"  {spec.table}:")
            for hit in hits:
                text = " ".join(hit.text.split())
                print(f"    {hit.similarity:.3f}  #{hit.id}  {text[:110]}")


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    _require_database(settings)
    _print_search(settings, args.question, args.k, args.table or list(settings.tables))
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    started = time.monotonic()
    args.export, args.extraction = SAMPLE_DIR / "result.json", SAMPLE_DIR / "extraction.json"
    args.table = None
    _require_database(settings)
    print(f"database: {db.redact_url(settings.effective_database_url)}")
    cmd_ingest(args, settings)
    cmd_materialize(args, settings)
    print()
    remaining = _print_status(settings)
    print()
    _print_search(settings, args.question, 3, list(settings.tables))
    print(f"\ndemo finished in {time.monotonic() - started:.1f}s")
    if remaining:
        raise CliError(f"{remaining} rows still need embedding")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedding-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("db", help="the embedded PostgreSQL+pgvector server")
    p.add_argument("action", choices=["start", "stop", "status", "url"])
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("schema", help="create or upgrade the tables, columns and indexes")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("ingest", help="load a Telegram export (and extraction) as one extraction")
    p.add_argument("export", type=Path, help="Telegram Desktop result.json")
    p.add_argument("--extraction", type=Path, help="extraction file with topics and atoms")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("materialize", help="materialize every asset and partition in-process")
    p.add_argument("--table", action="append", choices=["messages", "topics", "atoms"])
    p.set_defaults(func=cmd_materialize)

    p = sub.add_parser("status", help="rows, missing and stale embeddings per table")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("search", help="semantic search over messages, topics and atoms")
    p.add_argument("question")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--table", action="append", choices=["messages", "topics", "atoms"])
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("demo", help="sample data in, embeddings out, a search printed")
    p.add_argument("--question", default=DEMO_QUESTION)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home"))
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    instance_config = home / "dagster.yaml"
    if not instance_config.exists():
        instance_config.write_text(LOCAL_INSTANCE_CONFIG)
    try:
        return int(args.func(args, load_settings()))
    except (
        CliError,
        InputFileError,
        EmbeddedServerError,
        SchemaError,
        EmbeddingError,
        ValueError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
