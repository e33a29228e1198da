"""`ingest`: a Telegram export (and an extraction) loaded as one extraction."""

from __future__ import annotations

import argparse

from embedding_pipeline.cli.database import cmd_schema
from embedding_pipeline.lib.store import db
from embedding_pipeline.settings import Settings


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from embedding_pipeline.lib.sources.extraction_file import load_extraction
    from embedding_pipeline.lib.sources.ingest import ingest
    from embedding_pipeline.lib.sources.telegram import load_export

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
