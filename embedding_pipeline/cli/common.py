"""What the commands share: the error they print without a traceback, and the database,
schema, API key and embedder a command requires before it starts."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

from embedding_pipeline.lib.embedders import Embedder
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.catalog import relation_exists
from embedding_pipeline.lib.store.pgserver import EmbeddedPostgres
from embedding_pipeline.settings import Settings


class CliError(RuntimeError):
    """An error to print without a traceback."""


def embedded_server(settings: Settings) -> EmbeddedPostgres:
    e = settings.embedded
    return EmbeddedPostgres(e.data_dir, e.port, host=e.host)


def require_database(settings: Settings, *, probe: bool = True) -> str:
    """The database URL, starting the embedded server first when it is the default; with
    `probe`, another database that cannot be reached fails here, before any work starts."""
    if settings.uses_embedded_database:
        server = embedded_server(settings)
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


def require_schema(settings: Settings) -> str:
    """`require_database`, and the pipeline's tables and the vector extension in it."""
    url = require_database(settings)
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


def require_api_key(settings: Settings) -> None:
    """Runs read OPENAI_API_KEY when they start; say so before, not in a Dagster stack."""
    if settings.embedder.provider == "openai" and not os.environ.get("OPENAI_API_KEY"):
        raise CliError(
            "EP_EMBEDDING_PROVIDER is openai but OPENAI_API_KEY is not set (for an "
            "OpenAI-compatible server that wants no key, any value will do)"
        )


def build_embedder(settings: Settings) -> Embedder:
    from embedding_pipeline.definitions import build_resources
    from embedding_pipeline.resources import EmbedderResource

    require_api_key(settings)
    resource = build_resources(settings)["embedder"]
    assert isinstance(resource, EmbedderResource)
    # resolves dg.EnvVar fields (OPENAI_API_KEY) as a run would
    return resource.process_config_and_initialize().build()


def imports_done() -> None:
    """Keep what the imports built (modules, classes, the definitions) out of the cyclic
    garbage collector's scans for the rest of this short-lived process: a Dagster run
    allocates enough to start full collections, and each one walked every imported object
    again (about 0.2 s of a run with nothing to do, measured)."""
    gc.freeze()


def shown(path: Path) -> str:
    """`path` relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
