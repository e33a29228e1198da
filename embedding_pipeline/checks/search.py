"""Search: recall against an exact scan, latency, and (with EP_EVAL_QUESTIONS) quality on
labelled questions."""

from typing import Any

import dagster as dg

from embedding_pipeline.checks.base import (
    ERROR,
    WARN,
    CheckScope,
    CheckTarget,
    EmbeddingCheck,
    declare_check,
    id_list,
)
from embedding_pipeline.lib import quality

RECALL = "search_recall"
LATENCY = "search_latency"


def recall_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    cfg = t.cfg
    ef_search = t.ef_search

    @declare_check(
        t,
        RECALL,
        description=f"recall@{cfg.k} of the HNSW search against an exact scan in the same "
        f"snapshot, over up to {cfg.recall_sample_size} stored vectors (in an embedding "
        f"run, {cfg.run_recall_sample_size}); WARN below {cfg.recall_threshold}.",
    )
    def recall(s: CheckScope) -> dg.AssetCheckResult:
        report = quality.measure_recall(
            s.conn,
            spec,
            t.usable_index(s.conn),
            k=cfg.k,
            sample_size=cfg.run_recall_sample_size if s.run_samples else cfg.recall_sample_size,
            ef_search=ef_search,
        )
        metadata: dict[str, Any] = {
            "threshold": cfg.recall_threshold,
            "k": cfg.k,
            "ef_search": ef_search,
            "queries": report.queries,
            "worst_query_ids": id_list(report.worst_query_ids),
            "sampled": report.sample_method,
            "hnsw_plan": report.hnsw_plan,
            "exact_plan": report.exact_plan,
        }
        if report.recall is None:
            return dg.AssetCheckResult(
                passed=True,
                severity=WARN,
                metadata=metadata,
                description="no stored vectors to measure recall with",
            )
        metadata["recall"] = round(report.recall, 4)
        if report.min_query_recall is not None:
            metadata["min_query_recall"] = round(report.min_query_recall, 4)
        if not report.index_used or not report.exact_is_sequential:
            return dg.AssetCheckResult(
                passed=False,
                severity=WARN,
                metadata=metadata,
                description=(
                    f"recall not measurable: HNSW plan {report.hnsw_plan!r}, exact plan "
                    f"{report.exact_plan!r}"
                ),
            )
        description = (
            f"recall@{cfg.k} {report.recall:.3f} over {report.queries} queries "
            f"(ef_search {ef_search}, threshold {cfg.recall_threshold})"
        )
        return dg.AssetCheckResult(
            passed=report.recall >= cfg.recall_threshold,
            severity=WARN,
            metadata=metadata,
            description=description,
        )

    return recall


def latency_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    cfg = t.cfg
    ef_search = t.ef_search

    @declare_check(
        t,
        LATENCY,
        description=f"p50/p95 of the search statement over up to {cfg.latency_sample_size} "
        f"queries (in an embedding run, {cfg.run_latency_sample_size}); WARN when p95 "
        f"exceeds {cfg.latency_warn_ms} ms.",
    )
    def latency(s: CheckScope) -> dg.AssetCheckResult:
        sample = cfg.run_latency_sample_size if s.run_samples else cfg.latency_sample_size
        report = quality.measure_latency(
            s.conn, spec, k=cfg.k, sample_size=sample, ef_search=ef_search
        )
        if report.p95_ms is None or report.p50_ms is None or report.max_ms is None:
            return dg.AssetCheckResult(
                passed=True,
                severity=WARN,
                description="no stored vectors to query with",
                metadata={"queries": 0, "sampled": report.sample_method},
            )
        return dg.AssetCheckResult(
            passed=report.p95_ms <= cfg.latency_warn_ms,
            severity=WARN,
            description=f"p95 {report.p95_ms:.1f} ms, p50 {report.p50_ms:.1f} ms over "
            f"{report.queries} queries (warn above {cfg.latency_warn_ms} ms)",
            metadata={
                "p50_ms": round(report.p50_ms, 3),
                "p95_ms": round(report.p95_ms, 3),
                "max_ms": round(report.max_ms, 3),
                "queries": report.queries,
                "warn_ms": cfg.latency_warn_ms,
                "k": cfg.k,
                "ef_search": ef_search,
                "plan": report.plan,
                "sampled": report.sample_method,
            },
        )

    return latency


EVAL = "search_eval"
#: The figures `search_eval` compares with the floors: the modes that depend on the model.
EVAL_FLOOR_MODES = ("vector", "hybrid")


def search_eval_check(t: CheckTarget) -> EmbeddingCheck:
    """Search quality on the labelled questions of EP_EVAL_QUESTIONS for this table, through
    the search API: defined only when that file is configured, and run by the checks
    schedule and `embedding-pipeline check`, never by sensor runs."""
    path = t.cfg.eval_questions
    assert path is not None
    key = next(k for k, s in t.settings.tables.items() if s == t.spec)
    floors = f"recall@5 {t.cfg.eval_min_recall:g}, MRR {t.cfg.eval_min_mrr:g}"

    @declare_check(
        t,
        EVAL,
        description=f"recall@5, MRR@10 and nDCG@10 of the vector, text and hybrid search "
        f"modes on the {key} questions of {path.name} (EP_EVAL_QUESTIONS). WARN: the vector "
        f"or hybrid mode below {floors} (EP_EVAL_MIN_RECALL, EP_EVAL_MIN_MRR); ERROR: the "
        "questions cannot be scored.",
    )
    def search_eval(s: CheckScope) -> dg.AssetCheckResult:
        import sqlalchemy as sa

        from embedding_pipeline.lib.embedders import EmbeddingError
        from embedding_pipeline.lib.sources.values import InputFileError
        from embedding_pipeline.search import Searcher, SearchError, engine_for
        from embedding_pipeline.search.evaluation import MissingRows, evaluate, load_questions

        engine = engine_for(s.postgres.database_url)
        try:
            questions = [q for q in load_questions(path) if q.table == key]
            if not questions:
                return dg.AssetCheckResult(
                    passed=True, description=f"no {key} questions in {path}", metadata={}
                )
            with engine.connect() as conn:
                searcher = Searcher(t.settings, embedder=s.embedder.build())
                result = evaluate(conn, searcher, questions)
        except (InputFileError, MissingRows, SearchError, EmbeddingError, sa.exc.DBAPIError) as exc:
            reason = " ".join(str(exc).split())
            return dg.AssetCheckResult(
                passed=False, severity=ERROR, description=f"cannot score {path}: {reason}"
            )
        finally:
            engine.dispose()
        figures = {mode: result.overall(mode) for mode in result.modes}
        below = [
            f"{mode} {label} {value:.3f} < {floor:g}"
            for mode in EVAL_FLOOR_MODES
            for label, value, floor in (
                ("recall@5", figures[mode].recall, t.cfg.eval_min_recall),
                ("MRR", figures[mode].mrr, t.cfg.eval_min_mrr),
            )
            if value < floor
        ]
        summary = "; ".join(
            f"{m} recall@5 {f.recall:.3f} MRR {f.mrr:.3f} nDCG {f.ndcg:.3f}"
            for m, f in figures.items()
        )
        metadata: dict[str, Any] = {
            "questions": len(questions),
            "questions_file": str(path),
            "model": result.model,
            **{
                f"{mode}_{name}": round(value, 4)
                for mode, f in figures.items()
                for name, value in f.as_dict().items()
            },
        }
        return dg.AssetCheckResult(
            passed=not below,
            severity=WARN,
            description=("below the floor: " + ", ".join(below) + "; " if below else "")
            + f"{summary} ({len(questions)} questions)",
            metadata=metadata,
        )

    return search_eval
