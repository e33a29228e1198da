"""Search quality on the sample chat: recall@5 and MRR of the vector, text and hybrid modes
over the labelled questions in `embedding_pipeline/sample_data/search_questions.json`.

Starts a throw-away PostgreSQL+pgvector server (the project's embedded one) in a temporary
folder, loads the sample chat and its extraction, embeds every row with the local model,
then asks every question in every mode and prints the table of docs/search.md, and with
`--details` each question's recall@5 / reciprocal rank per mode.

    .venv/bin/python benchmarks/search_quality.py
    .venv/bin/python benchmarks/search_quality.py --details
"""

from __future__ import annotations

import argparse

from embedding_pipeline.lib.embedders import LOCAL_DIMENSION, LocalEmbedder
from embedding_pipeline.lib.pgserver import temporary_server
from embedding_pipeline.search import Searcher
from embedding_pipeline.search.api import engine_for
from embedding_pipeline.search.evaluation import (
    evaluate,
    load_questions,
    load_sample,
    markdown_table,
)
from embedding_pipeline.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--details", action="store_true", help="every question's figures")
    args = parser.parse_args(argv)

    with temporary_server("ep-search-quality-") as server:
        server.ensure_database("quality")
        settings = Settings(database_url=server.url("quality"))
        embedder = LocalEmbedder()
        load_sample(settings, embedder, dimension=LOCAL_DIMENSION)
        searcher = Searcher(settings, embedder=embedder)
        questions = load_questions()
        engine = engine_for(settings.effective_database_url)
        with engine.connect() as conn:
            results = evaluate(conn, searcher, questions)
        engine.dispose()
        print(markdown_table(results, len(questions)))
        if args.details:
            print("\n| question | " + " | ".join(r.mode for r in results) + " |")
            print("|---|" + "---|" * len(results))
            for q in questions:
                cells = " | ".join(
                    "{:.2f} / {:.2f}".format(*r.per_question[q.question]) for r in results
                )
                print(f"| {q.question} ({q.table}) | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
