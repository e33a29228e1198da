"""Search quality on the sample chat: recall@5, MRR@10 and nDCG@10 of the vector, text and
hybrid modes over labelled questions, for one or more local models, in one invocation.

Starts a throw-away PostgreSQL+pgvector server (the project's embedded one) in a temporary
folder; for each model it loads the sample chat and its extraction into a database of its
own and embeds every row with that model; then it asks every question of every file in
every mode through the search API (`embedding_pipeline.search.evaluation`, what
`embedding-pipeline eval` runs) and prints the table of docs/search.md, and with
`--details` each question's recall@5 / reciprocal rank per mode.

    .venv/bin/python benchmarks/search_quality.py                  # MiniLM, the three sets
    .venv/bin/python benchmarks/search_quality.py --model all-MiniLM-L6-v2 \\
        --model multilingual-e5-small                              # both local models
    .venv/bin/python benchmarks/search_quality.py --questions my.json --details
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from embedding_pipeline.lib.embedders import Embedder, build_embedder
from embedding_pipeline.lib.embedders.catalog import local_model
from embedding_pipeline.lib.store.pgserver import EmbeddedPostgres, temporary_server
from embedding_pipeline.search import Searcher
from embedding_pipeline.search.api import engine_for
from embedding_pipeline.search.evaluation import (
    QUESTIONS,
    QUESTIONS_ATOMS_TOPICS,
    QUESTIONS_ATOMS_TOPICS_ES,
    Evaluation,
    evaluate,
    load_questions,
    load_sample,
)
from embedding_pipeline.settings import EmbedderSettings, Settings

SETS = (QUESTIONS, QUESTIONS_ATOMS_TOPICS, QUESTIONS_ATOMS_TOPICS_ES)


def sample_database(server: EmbeddedPostgres, model: str) -> tuple[Settings, Embedder]:
    """A database of its own on `server` holding the sample chat embedded with the local
    `model`; its settings and the embedder."""
    database = re.sub(r"[^a-z0-9]", "_", model.lower())
    server.ensure_database(database)
    settings = Settings(
        database_url=server.url(database),
        embedder=EmbedderSettings(provider="local", model=model),
    )
    embedder = build_embedder("local", model=model)
    started = time.monotonic()
    load_sample(settings, embedder, dimension=embedder.dimension)
    print(f"{model}: sample chat embedded in {time.monotonic() - started:.0f} s", flush=True)
    return settings, embedder


def table_rows(path: Path, model: str, result: Evaluation) -> list[str]:
    """docs/search.md's rows: questions file (count), model, mode and the three figures."""
    return [
        f"| {path.name} ({len(result.questions)}) | {model} | {mode} | {f.recall:.3f} | "
        f"{f.mrr:.3f} | {f.ndcg:.3f} |"
        for mode in result.modes
        for f in [result.overall(mode)]
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="a local model (repeatable)")
    parser.add_argument("--questions", action="append", type=Path, help="a questions file")
    parser.add_argument("--details", action="store_true", help="every question's figures")
    args = parser.parse_args(argv)
    models = [local_model(m) or m for m in args.model or ["all-MiniLM-L6-v2"]]
    files = args.questions or list(SETS)

    lines = [
        "| questions | model | mode | recall@5 | MRR@10 | nDCG@10 |",
        "|---|---|---|---:|---:|---:|",
    ]
    details: list[str] = []
    with temporary_server("ep-search-quality-") as server:
        for model in models:
            settings, embedder = sample_database(server, model)
            searcher = Searcher(settings, embedder=embedder)
            engine = engine_for(settings.effective_database_url)
            with engine.connect() as conn:
                for path in files:
                    questions = load_questions(path)
                    result = evaluate(conn, searcher, questions)
                    lines += table_rows(path, model, result)
                    details += [
                        f"\n{path.name}, {model}: | question | {' | '.join(result.modes)} |"
                    ]
                    details += [
                        f"| {q.question} ({q.table}) | "
                        + " | ".join(
                            f"{result.per_question[m][i].recall:.2f} / "
                            f"{result.per_question[m][i].mrr:.2f}"
                            for m in result.modes
                        )
                        + " |"
                        for i, q in enumerate(questions)
                    ]
            engine.dispose()
    print("\n".join(lines))
    if args.details:
        print("\n".join(details))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
