"""`search`, `eval` and `serve`: the search API from the command line and over HTTP."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING

from embedding_pipeline.cli.candidate import candidate_searcher
from embedding_pipeline.cli.common import (
    CliError,
    require_api_key,
    require_database,
    require_schema,
)
from embedding_pipeline.search.filters import FILTER_NAMES
from embedding_pipeline.settings import Settings, api_keys

if TYPE_CHECKING:
    from embedding_pipeline.search import Hit
    from embedding_pipeline.search.evaluation import Evaluation, Question


def search_tables(
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
    from embedding_pipeline.search.execution import engine_for
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


def print_search(question: str, mode: str, results: dict[str, list[Hit]]) -> None:
    print(f'search ({mode}): "{question}"')
    for key, hits in results.items():
        print(f"  {key}:")
        for hit in hits:
            text = " ".join(hit.text.split())
            print(f"    {hit.score or 0.0:.3f}  #{hit.id}  {text[:110]}")


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    import json

    require_api_key(settings)
    require_schema(settings)
    filters = {name: getattr(args, name) for name in FILTER_NAMES}
    results = search_tables(
        settings, args.question, args.k, args.table, mode=args.mode, filters=filters
    )
    if args.json:
        payload = {
            "query": args.question,
            "mode": args.mode,
            "results": {key: [h.as_dict() for h in hits] for key, hits in results.items()},
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        print_search(args.question, args.mode, results)
    return 0


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    """Search quality on a labelled questions file: recall@k, MRR@10 and nDCG@10 of every
    mode, per table and overall; with `--compare`, the current model and the candidate a
    `model switch --no-promote` left in the shadow columns, side by side."""
    import json

    from embedding_pipeline.search.evaluation import load_questions, text_report

    questions = load_questions(args.questions)
    require_api_key(settings)
    url = require_schema(settings)
    results = evaluations(settings, url, questions, args, compare=args.compare)
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


def evaluations(
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
    from embedding_pipeline.search.evaluation import MissingRows, evaluate
    from embedding_pipeline.search.execution import engine_for

    searchers = [Searcher(settings)]
    if compare:
        searchers.append(candidate_searcher(settings, url))
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
    require_database(settings, probe=False)  # it answers 503 until the database is back
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
