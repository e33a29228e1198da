"""Ways to fuse the vector and the text ranking, scored side by side on every labelled set
and local model in one invocation: the measurements behind the hybrid ranking of
docs/search.md ("Hybrid ranking").

Starts a throw-away PostgreSQL+pgvector server, loads the sample chat and embeds it with
each model (as `search_quality.py` does), then for every question fetches what any fusion
needs: the 50 nearest rows by cosine distance (exact), the 50 best text matches by
`ts_rank` (the search API's text query: any of the query's words), and for each of those
rows its cosine similarity and its coverage (the share of the query's lexemes its text
holds). The fusions are then computed here, so every variant sees the same candidates:

- `rrf`: reciprocal rank fusion, 1/(k + vector rank) + 1/(k + text rank) (the old hybrid);
- `rrf coverage^p`: the text term times coverage^p (p = 2 is the search API's hybrid);
- `rrf coverage>=g`: the text term only for rows holding at least a share g of the words;
- `cosine + b*coverage`: score fusion, the similarity plus a bonus for the words held.

A variant "holds" on a set when its recall@5 and MRR@10 are at least the better single
mode's, within 0.01.

    .venv/bin/python benchmarks/hybrid_fusion.py
    .venv/bin/python benchmarks/hybrid_fusion.py --model all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from search_quality import sample_database

from embedding_pipeline.lib.store.pgserver import temporary_server
from embedding_pipeline.search.evaluation import (
    QUESTIONS,
    QUESTIONS_ATOMS_TOPICS,
    QUESTIONS_ATOMS_TOPICS_ES,
    load_questions,
    score,
)

CANDIDATES = 50
SETS = (QUESTIONS, QUESTIONS_ATOMS_TOPICS, QUESTIONS_ATOMS_TOPICS_ES)
TEXT_QUERY = "replace(plainto_tsquery('english', %(q)s)::text, ' & ', ' | ')::tsquery"


@dataclass
class Candidates:
    """One question's rankings and each candidate's cosine similarity and coverage."""

    relevant: set[int]
    vector: list[int]
    text: list[int]
    cosine: dict[int, float]
    coverage: dict[int, float]


def candidates(conn: psycopg.Connection, table: str, question: str, vector, relevant) -> Candidates:
    t = sql.Identifier(table)
    nearest = conn.execute(
        sql.SQL("SELECT id FROM {} ORDER BY embedding <=> %(v)s LIMIT %(n)s").format(t),
        {"v": vector, "n": CANDIDATES},
    ).fetchall()
    matches = conn.execute(
        sql.SQL(
            "SELECT id FROM {t} WHERE search_tsv @@ {q} "
            "ORDER BY ts_rank(search_tsv, {q}) DESC, id LIMIT %(n)s"
        ).format(t=t, q=sql.SQL(TEXT_QUERY)),
        {"q": question, "n": CANDIDATES},
    ).fetchall()
    ids = list({r[0] for r in nearest} | {r[0] for r in matches})
    features = conn.execute(
        sql.SQL(
            "SELECT id, 1 - (embedding <=> %(v)s), (length(search_tsv) + length(w) - "
            "length(search_tsv || w))::float8 / greatest(length(w), 1) "
            "FROM {}, to_tsvector('english', %(q)s) w WHERE id = ANY(%(ids)s)"
        ).format(t),
        {"v": vector, "q": question, "ids": ids},
    ).fetchall()
    return Candidates(
        relevant=relevant,
        vector=[r[0] for r in nearest],
        text=[r[0] for r in matches],
        cosine={r[0]: float(r[1]) for r in features},
        coverage={r[0]: float(r[2]) for r in features},
    )


Fusion = Callable[[Candidates], list[int]]


def rrf(k: int = 60, power: float = 0.0, gate: float = 0.0) -> Fusion:
    def fuse(c: Candidates) -> list[int]:
        vr = {i: r for r, i in enumerate(c.vector, 1)}
        tr = {i: r for r, i in enumerate(c.text, 1)}
        scores = {}
        for i in set(vr) | set(tr):
            s = 1 / (k + vr[i]) if i in vr else 0.0
            if i in tr and c.coverage[i] >= gate:
                s += c.coverage[i] ** power / (k + tr[i])
            scores[i] = s
        best = {i: min(vr.get(i, 10**6), tr.get(i, 10**6)) for i in scores}
        return sorted(scores, key=lambda i: (-scores[i], best[i], i))[:10]

    return fuse


def linear(bonus: float) -> Fusion:
    def fuse(c: Candidates) -> list[int]:
        scores = {i: c.cosine[i] + bonus * c.coverage[i] for i in set(c.vector) | set(c.text)}
        return sorted(scores, key=lambda i: (-scores[i], i))[:10]

    return fuse


VARIANTS: dict[str, Fusion] = {
    "vector": lambda c: c.vector[:10],
    "text": lambda c: c.text[:10],
    "rrf (the old hybrid)": rrf(),
    "rrf coverage^1": rrf(power=1),
    "rrf coverage^2 (hybrid)": rrf(power=2),
    "rrf coverage^3": rrf(power=3),
    "rrf coverage^2, k=20": rrf(k=20, power=2),
    "rrf coverage>=0.5": rrf(power=0, gate=0.5),
    "cosine + 0.3*coverage": linear(0.3),
    "cosine + 0.5*coverage": linear(0.5),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="a local model (repeatable)")
    args = parser.parse_args(argv)
    models = args.model or ["all-MiniLM-L6-v2", "multilingual-e5-small"]
    names = [
        p.name.removeprefix("search_questions").removesuffix(".json") or "(project)" for p in SETS
    ]
    print(f"recall@5 / MRR@10 per set ({', '.join(names)})")
    print("* = at least the better single mode's recall@5 and MRR, within 0.01")
    with temporary_server("ep-fusion-") as server:
        for model in models:
            settings, embedder = sample_database(server, model)
            per_set: list[list[Candidates]] = []
            with psycopg.connect(settings.effective_database_url) as conn:
                register_vector(conn)
                for path in SETS:
                    rows = []
                    for q in load_questions(path):
                        column = "telegram_message_id" if q.table == "messages" else "key"
                        relevant = {
                            r[0]
                            for r in conn.execute(
                                sql.SQL("SELECT id FROM {} WHERE {} = ANY(%s)").format(
                                    sql.Identifier(q.table), sql.Identifier(column)
                                ),
                                (list(q.relevant),),
                            )
                        }
                        vector = embedder.embed([q.question], query=True)[0]
                        rows.append(candidates(conn, q.table, q.question, vector, relevant))
                    per_set.append(rows)
            print(f"\n| {model} | " + " | ".join(names) + " |")
            print("|---|" + "---:|" * len(names))
            figures = {
                name: [
                    tuple(
                        sum(getattr(score(fuse(c), c.relevant), f) for c in rows) / len(rows)
                        for f in ("recall", "mrr")
                    )
                    for rows in per_set
                ]
                for name, fuse in VARIANTS.items()
            }
            best = [
                tuple(max(figures[m][i][j] for m in ("vector", "text")) for j in (0, 1))
                for i in range(len(SETS))
            ]
            for name, values in figures.items():
                cells = [
                    f"{r:.3f} / {m:.3f}"
                    + (
                        "*"
                        if r >= b[0] - 0.01 and m >= b[1] - 0.01 and name not in ("vector", "text")
                        else ""
                    )
                    for (r, m), b in zip(values, best, strict=True)
                ]
                print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
