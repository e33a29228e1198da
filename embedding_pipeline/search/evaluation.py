"""Search quality, measured: the labelled questions over the sample chat, and recall@5 and
MRR of each mode on them (`benchmarks/search_quality.py` prints the table in
docs/search.md; a test keeps the two equal).

recall@5 of a question: the share of its relevant rows in the first five hits (out of at
most five: a question with seven relevant rows is complete with five of them). MRR: the
mean over questions of 1 / rank of the first relevant hit in the top ten (0 if none).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from embedding_pipeline.lib import db
from embedding_pipeline.lib.embedders import Embedder
from embedding_pipeline.lib.ingest import ingest
from embedding_pipeline.lib.schema import ensure_schema
from embedding_pipeline.lib.sync import Window, sync_embeddings
from embedding_pipeline.lib.telegram import load_export, load_extraction
from embedding_pipeline.search.api import MODES, Searcher
from embedding_pipeline.settings import Settings

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
QUESTIONS = SAMPLE_DIR / "search_questions.json"
RECALL_AT = 5
MRR_AT = 10


@dataclass(frozen=True)
class Question:
    question: str
    table: str
    #: Telegram message ids (messages) or keys (atoms, topics).
    relevant: tuple[int | str, ...]


@dataclass
class ModeScore:
    mode: str
    recall: float = 0.0
    mrr: float = 0.0
    #: question -> (recall@5, reciprocal rank)
    per_question: dict[str, tuple[float, float]] = field(default_factory=dict)


def load_questions(path: Path = QUESTIONS) -> list[Question]:
    data = json.loads(path.read_text())
    return [Question(q["question"], q["table"], tuple(q["relevant"])) for q in data["questions"]]


def load_sample(settings: Settings, embedder: Embedder, *, dimension: int) -> None:
    """The sample chat and its extraction in `settings`' database, every row embedded."""
    url = settings.effective_database_url
    with db.connection(url, vector=False) as conn:
        ensure_schema(conn, settings, dimension)
    with db.connection(url) as conn:
        ingest(
            conn,
            settings,
            load_export(SAMPLE_DIR / "result.json"),
            load_extraction(SAMPLE_DIR / "extraction.json"),
        )
        for spec in settings.tables.values():
            sync_embeddings(conn, spec, embedder, Window(), batch_size=64)


def row_ids(conn: sa.Connection, searcher: Searcher, question: Question) -> set[int]:
    """The database ids of a question's relevant rows."""
    name = "telegram_message_id" if question.table == "messages" else "key"
    spec = searcher.settings.tables[question.table]
    t = sa.table(spec.table, sa.column(spec.id_column), sa.column(name))
    rows = conn.execute(
        sa.select(t.c[spec.id_column]).where(t.c[name].in_(question.relevant))
    ).all()
    if len(rows) != len(question.relevant):
        raise ValueError(f"{question.question!r}: some relevant rows are not in the database")
    return {int(r[0]) for r in rows}


def score(hits: Sequence[int], relevant: set[int]) -> tuple[float, float]:
    """(recall@5, reciprocal rank within the top 10) of one ranked list of ids."""
    found = len(relevant & set(hits[:RECALL_AT])) / min(len(relevant), RECALL_AT)
    first = next((i for i, h in enumerate(hits[:MRR_AT], start=1) if h in relevant), None)
    return found, (1.0 / first if first else 0.0)


def evaluate(
    conn: sa.Connection,
    searcher: Searcher,
    questions: Sequence[Question],
    modes: Sequence[str] = MODES,
) -> list[ModeScore]:
    results = [ModeScore(mode) for mode in modes]
    for question in questions:
        relevant = row_ids(conn, searcher, question)
        for result in results:
            hits = searcher.search(
                conn, question.question, table=question.table, k=MRR_AT, mode=result.mode
            )
            result.per_question[question.question] = score([h.id for h in hits], relevant)
    for result in results:
        values = list(result.per_question.values())
        result.recall = sum(r for r, _ in values) / len(values)
        result.mrr = sum(m for _, m in values) / len(values)
    return results


def markdown_table(results: Sequence[ModeScore], questions: int) -> str:
    lines = [
        f"| mode | recall@{RECALL_AT} | MRR |",
        "|---|---:|---:|",
        *(f"| {r.mode} | {r.recall:.3f} | {r.mrr:.3f} |" for r in results),
    ]
    return "\n".join(lines) + f"\n\n({questions} questions)"
