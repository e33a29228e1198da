"""The argument parser: every command, its options and the function that runs it."""

from __future__ import annotations

import argparse
from pathlib import Path

from embedding_pipeline.cli.bench import cmd_bench
from embedding_pipeline.cli.database import cmd_db, cmd_dev, cmd_schema
from embedding_pipeline.cli.demo import DEMO_QUESTION, cmd_demo
from embedding_pipeline.cli.errors import cmd_errors
from embedding_pipeline.cli.ingest import cmd_ingest
from embedding_pipeline.cli.models import cmd_model_status, cmd_model_switch
from embedding_pipeline.cli.runs import cmd_backlog, cmd_check, cmd_materialize, cmd_status
from embedding_pipeline.cli.search import cmd_eval, cmd_search, cmd_serve

DESCRIPTION = (
    "`embedding-pipeline`: the embedded database, ingest, materialization, search and the demo."
)


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
        description=DESCRIPTION,
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
        "embed the months with work in-process, and run the checks",
        "Materialize every month with rows to embed (or whose HNSW index is missing) in this "
        "process, as one run of the materialize_all job that also runs every table's checks; "
        "the source tables are external assets, which no run materializes.",
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

    p = _command(
        sub,
        "bench",
        "list the benchmarks, or run one: bench NAME [ARGS...]",
        "Without NAME, the scripts of the checkout's benchmarks/ folder with the first line "
        "of each one's description; with NAME, benchmarks/NAME.py run by this Python with "
        "ARGS, and its exit code (docs/benchmarks.md). `bench NAME --help` shows its options.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="the benchmark to run")
    p.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        metavar="ARGS",
        help="everything after NAME goes to the benchmark, e.g. --rows 1000",
    )
    # the benchmarks set up their own databases and providers: a setting the pipeline would
    # refuse does not stop them
    p.set_defaults(func=cmd_bench, reads_settings=False)
    return parser
