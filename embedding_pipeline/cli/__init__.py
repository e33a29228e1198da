"""`embedding-pipeline`: the embedded database, ingest, materialization, search and the demo.

One module a family of commands: `database.py` (db, dev, schema), `ingest.py`, `runs.py`
(materialize, check, status, backlog), `search.py` (search, eval, serve), `models.py`
(model status, model switch, with `candidate.py`), `errors.py`, `demo.py`, `bench.py`;
`common.py` holds what they share, `parser.py` the argument parser, `instance.py` the
local Dagster instance's settings. This module runs the command and turns its errors into
one line.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import psycopg
import sqlalchemy.exc

from embedding_pipeline.cli.common import CliError
from embedding_pipeline.cli.demo import SAMPLE_DIR
from embedding_pipeline.cli.instance import LOCAL_INSTANCE_CONFIG, write_local_instance_config
from embedding_pipeline.cli.parser import build_parser
from embedding_pipeline.lib.embedders import EmbeddingError
from embedding_pipeline.lib.sources.values import InputFileError
from embedding_pipeline.lib.store.conninfo import redact
from embedding_pipeline.lib.store.pgserver import EmbeddedServerError
from embedding_pipeline.lib.store.schema import SchemaError
from embedding_pipeline.search.errors import SearchError
from embedding_pipeline.settings import PROJECT_ROOT, load_settings

__all__ = [
    "LOCAL_INSTANCE_CONFIG",
    "SAMPLE_DIR",
    "CliError",
    "build_parser",
    "main",
    "write_local_instance_config",
]


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
        settings = load_settings() if getattr(args, "reads_settings", True) else None
        return int(args.func(args, settings))
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
