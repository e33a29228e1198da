"""Search quality, measured: labelled questions, and recall@k, MRR@10 and nDCG@10 of each
search mode on them, per table and overall (`embedding-pipeline eval`, the `search_eval`
asset check, `benchmarks/search_quality.py`; docs/search.md shows the figures and a test
keeps them true).

A questions file is `{"questions": [{"question", "table", "relevant"}, ...]}`: `table` one
of messages, topics, atoms; `relevant` the rows a person would expect, as Telegram message
ids (messages) or keys (topics, atoms).

For one question and one ranked list of ten hits:

- recall@k: the share of its relevant rows among the first k hits, out of at most k (a
  question with seven relevant rows is complete with five of them at k = 5);
- reciprocal rank: 1 / rank of the first relevant hit in the top ten, 0 if none (MRR@10
  is its mean);
- nDCG@10: binary gains, the discounted cumulative gain of the ten hits (1 / log2(rank + 1)
  per relevant hit) over that of an ideal list (every relevant row first).

Figures per table are means over that table's questions; overall figures are means over all
questions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from embedding_pipeline.lib.embedders import Embedder
from embedding_pipeline.lib.engine.run import sync_embeddings
from embedding_pipeline.lib.sources.extraction_file import load_extraction
from embedding_pipeline.lib.sources.ingest import ingest
from embedding_pipeline.lib.sources.telegram import load_export
from embedding_pipeline.lib.sources.values import (
    InputFileError,
    as_id,
    as_list,
    as_object,
    describe,
    read_json,
    required_str,
)
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.domain import Window
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.search.api import Searcher
from embedding_pipeline.search.tables import TABLE_KEYS
from embedding_pipeline.search.types import MODES
from embedding_pipeline.settings import Settings

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
#: The project's labelled questions over the sample chat (messages and atoms).
QUESTIONS = SAMPLE_DIR / "search_questions.json"
#: A second set over the sample chat's atoms and topics, in other words, and its Spanish
#: translation (docs/search.md).
QUESTIONS_ATOMS_TOPICS = SAMPLE_DIR / "search_questions_atoms_topics.json"
QUESTIONS_ATOMS_TOPICS_ES = SAMPLE_DIR / "search_questions_atoms_topics_es.json"
#: recall@k's default k.
RECALL_AT = 5
#: MRR and nDCG look at this many hits (and the searches ask for as many).
RANK_DEPTH = 10
MAX_QUESTION_LENGTH = 1_000


@dataclass(frozen=True)
class Question:
    question: str
    table: str
    #: Telegram message ids (messages) or keys (atoms, topics).
    relevant: tuple[int | str, ...]
    #: Where it stands in its file, for error messages: "questions[3]".
    position: str = ""


@dataclass(frozen=True)
class Figures:
    """recall@k, MRR@10 and nDCG@10 of one question, or their means over several."""

    recall: float
    mrr: float
    ndcg: float

    @classmethod
    def mean(cls, items: Sequence[Figures]) -> Figures:
        n = len(items)
        if not n:
            return cls(0.0, 0.0, 0.0)
        return cls(
            sum(f.recall for f in items) / n,
            sum(f.mrr for f in items) / n,
            sum(f.ndcg for f in items) / n,
        )

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        return {
            "recall": round(self.recall, digits),
            "mrr": round(self.mrr, digits),
            "ndcg": round(self.ndcg, digits),
        }


@dataclass
class Evaluation:
    """Every question's figures in every mode, for one model."""

    k: int
    model: str
    questions: list[Question]
    #: mode -> one `Figures` per question, in the questions' order
    per_question: dict[str, list[Figures]] = field(default_factory=dict)

    @property
    def modes(self) -> list[str]:
        return list(self.per_question)

    @property
    def tables(self) -> list[str]:
        present = {q.table for q in self.questions}
        return [t for t in TABLE_KEYS if t in present]

    def overall(self, mode: str) -> Figures:
        return Figures.mean(self.per_question[mode])

    def table(self, mode: str, table: str) -> Figures:
        return Figures.mean(
            [
                f
                for q, f in zip(self.questions, self.per_question[mode], strict=True)
                if q.table == table
            ]
        )

    def as_dict(self) -> dict[str, Any]:
        """`{"k", "questions", "model", "modes": {mode: figures}, "tables": {table:
        {"questions", "modes"}}}`, as `embedding-pipeline eval --json` prints it."""
        return {
            "k": self.k,
            "questions": len(self.questions),
            "model": self.model,
            "modes": {m: self.overall(m).as_dict() for m in self.modes},
            "tables": {
                t: {
                    "questions": sum(1 for q in self.questions if q.table == t),
                    "modes": {m: self.table(m, t).as_dict() for m in self.modes},
                }
                for t in self.tables
            },
        }


def load_questions(path: Path | str = QUESTIONS) -> list[Question]:
    """The questions of a labelled file; `InputFileError` names the file, the position
    (`questions[3].relevant`) and the reason of the first problem."""
    path = Path(path)
    data, _ = read_json(path)
    root = as_object(data, path, "")
    if "questions" not in root:
        raise InputFileError(path, "questions", "missing: expected a list of questions")
    items = as_list(root["questions"], path, "questions")
    if not items:
        raise InputFileError(path, "questions", "is empty: nothing to evaluate")
    return [_question(item, path, f"questions[{i}]") for i, item in enumerate(items)]


def _question(item: Any, path: Path, where: str) -> Question:
    obj = as_object(item, path, where)
    text = required_str(obj, "question", path, where)
    if len(text) > MAX_QUESTION_LENGTH:
        raise InputFileError(
            path,
            f"{where}.question",
            f"{len(text)} characters long; a question has at most {MAX_QUESTION_LENGTH}",
        )
    table = required_str(obj, "table", path, where)
    if table not in TABLE_KEYS:
        raise InputFileError(
            path, f"{where}.table", f"expected one of {', '.join(TABLE_KEYS)}, got {table!r}"
        )
    relevant = as_list(obj.get("relevant"), path, f"{where}.relevant")
    if not relevant:
        raise InputFileError(path, f"{where}.relevant", "is empty: name at least one row")
    ids: list[int | str] = []
    for i, value in enumerate(relevant):
        at = f"{where}.relevant[{i}]"
        if table == "messages":
            ids.append(as_id(value, path, at))
        elif isinstance(value, str) and value.strip():
            ids.append(value.strip())
        else:
            raise InputFileError(path, at, f"expected a {table[:-1]} key, got {describe(value)}")
        if ids[-1] in ids[:-1]:
            raise InputFileError(path, at, f"{describe(value)} is listed twice")
    unknown = set(obj) - {"question", "table", "relevant", "note"}
    if unknown:
        raise InputFileError(
            path,
            f"{where}.{sorted(unknown)[0]}",
            "unknown field; expected question, table, relevant (and an optional note)",
        )
    return Question(text, table, tuple(ids), where)


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


class MissingRows(ValueError):
    """A question names rows the database does not hold."""


def row_ids(conn: sa.Connection | Session, settings: Settings, question: Question) -> set[int]:
    """The database ids of a question's relevant rows; `MissingRows` names the question's
    position and the ids or keys the database does not hold."""
    name = "telegram_message_id" if question.table == "messages" else "key"
    spec = settings.tables[question.table]
    t = sa.table(spec.table, sa.column(spec.id_column), sa.column(name))
    rows = conn.execute(
        sa.select(t.c[spec.id_column], t.c[name]).where(t.c[name].in_(question.relevant))
    ).all()
    missing = set(question.relevant) - {r[1] for r in rows}
    if missing:
        shown = ", ".join(repr(m) for m in sorted(missing, key=str)[:5])
        raise MissingRows(
            f"{question.position or repr(question.question)}.relevant: not in the "
            f"{spec.table} table: {shown}"
        )
    return {int(r[0]) for r in rows}


def score(hits: Sequence[int], relevant: set[int], k: int = RECALL_AT) -> Figures:
    """recall@k, reciprocal rank and nDCG@10 of one ranked list of ids."""
    found = len(relevant & set(hits[:k])) / min(len(relevant), k)
    top = hits[:RANK_DEPTH]
    first = next((i for i, h in enumerate(top, start=1) if h in relevant), None)
    dcg = sum(1.0 / math.log2(i + 1) for i, h in enumerate(top, start=1) if h in relevant)
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(relevant), RANK_DEPTH) + 1))
    return Figures(found, 1.0 / first if first else 0.0, dcg / ideal)


def evaluate(
    conn: sa.Connection | Session,
    searcher: Searcher,
    questions: Sequence[Question],
    modes: Iterable[str] = MODES,
    *,
    k: int = RECALL_AT,
) -> Evaluation:
    """Ask every question in every mode through `searcher` (the search API itself) and
    score the answers. Each question's query is embedded once for all modes."""
    if not 1 <= k <= RANK_DEPTH:
        raise ValueError(f"k must be from 1 to {RANK_DEPTH}, got {k}")
    modes = list(modes)
    result = Evaluation(k=k, model=searcher.model_id, questions=list(questions))
    result.per_question = {mode: [] for mode in modes}
    for question in questions:
        relevant = row_ids(conn, searcher.settings, question)
        vector = None
        if any(mode != "text" for mode in modes):
            vector = searcher.embed_query(question.question)
        for mode in modes:
            hits = searcher.search(
                conn,
                question.question,
                table=question.table,
                k=RANK_DEPTH,
                mode=mode,
                vector=None if mode == "text" else vector,
            )
            result.per_question[mode].append(score([h.id for h in hits], relevant, k))
    return result


def markdown_table(result: Evaluation) -> str:
    """The overall figures of every mode as the Markdown table docs/search.md shows."""
    lines = [
        f"| mode | recall@{result.k} | MRR@10 | nDCG@10 |",
        "|---|---:|---:|---:|",
        *(
            "| {} | {:.3f} | {:.3f} | {:.3f} |".format(m, *_figures(result.overall(m)))
            for m in result.modes
        ),
    ]
    return "\n".join(lines) + f"\n\n({len(result.questions)} questions, {result.model})"


def _figures(f: Figures) -> tuple[float, float, float]:
    return f.recall, f.mrr, f.ndcg


def text_report(results: Sequence[Evaluation]) -> str:
    """The figures of one evaluation, or of several models side by side (`eval --compare`):
    per mode, each table's and the overall recall@k / MRR@10 / nDCG@10."""
    first = results[0]
    scopes = [*first.tables, "overall"]
    header = f"{'mode':<8} {'table':<9} {'n':>4}"
    for r in results:
        header += f"   {r.model[:33]:<33}"
    sub = " " * 23 + "".join(
        f"   {'recall@' + str(first.k):>9} {'MRR@10':>9} {'nDCG@10':>11}" for _ in results
    )
    lines = [header, sub]
    for mode in first.modes:
        for scope in scopes:
            n = (
                len(first.questions)
                if scope == "overall"
                else sum(1 for q in first.questions if q.table == scope)
            )
            row = f"{mode:<8} {scope:<9} {n:>4}"
            for r in results:
                f = r.overall(mode) if scope == "overall" else r.table(mode, scope)
                row += f"   {f.recall:>9.3f} {f.mrr:>9.3f} {f.ndcg:>11.3f}"
            lines.append(row)
    return "\n".join(lines)
