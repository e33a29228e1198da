"""`model status` and `model switch`: the embedding model, and re-embedding with another."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING

from embedding_pipeline.cli.candidate import candidate_settings, staged_candidate
from embedding_pipeline.cli.common import CliError, build_embedder, require_schema
from embedding_pipeline.cli.search import evaluations
from embedding_pipeline.lib.store import db
from embedding_pipeline.settings import Settings

if TYPE_CHECKING:
    from embedding_pipeline.lib.engine.model_switch import Candidate
    from embedding_pipeline.search.evaluation import Evaluation


def cmd_model_status(args: argparse.Namespace, settings: Settings) -> int:
    """Each table's embedding column: size, registered model, models present, switch state."""
    from embedding_pipeline.lib.engine.model_switch import model_status

    url = require_schema(settings)
    with db.connection(url, vector=False) as conn:
        for spec in settings.tables.values():
            print(model_status(conn, spec).describe())
    return 0


def _worse(current: Evaluation, candidate: Evaluation, tolerance: float) -> list[str]:
    """Each figure of a mode that depends on the model (vector, hybrid) where the candidate
    scores below the current model by more than `tolerance`."""
    drops = []
    for mode in ("vector", "hybrid"):
        now, then = current.overall(mode), candidate.overall(mode)
        for name, label in (("recall", f"recall@{current.k}"), ("mrr", "MRR@10")):
            before, after = getattr(now, name), getattr(then, name)
            if after < before - tolerance:
                drops.append(f"{mode} {label} {before:.3f} -> {after:.3f}")
    return drops


def _require_not_worse(args: argparse.Namespace, settings: Settings, url: str) -> None:
    """Score the current and the candidate model on the labelled questions; refuse (one
    line, nothing swapped) when the candidate is worse."""
    from embedding_pipeline.search.evaluation import load_questions, text_report

    path = args.questions or settings.checks.eval_questions
    if path is None:
        raise CliError(
            "--require-not-worse needs labelled questions: --questions FILE or EP_EVAL_QUESTIONS"
        )
    questions = load_questions(path)
    args.questions, args.k = path, 5
    current, candidate = evaluations(settings, url, questions, args, compare=True)
    print(text_report([current, candidate]))
    drops = _worse(current, candidate, args.tolerance)
    if drops:
        raise CliError(
            f"{candidate.model} is worse than {current.model} on {path} "
            f"({len(questions)} questions): {'; '.join(drops)}. Nothing was swapped; the "
            "candidate stays in the shadow columns (`model switch --abort` discards it)"
        )
    print(f"{candidate.model} is not worse than {current.model} on {path}")


def cmd_model_switch(args: argparse.Namespace, settings: Settings) -> int:
    """Re-embed every table with another model in shadow columns, then swap them in;
    `--no-promote` stops before the swap (the candidate can be evaluated), `--promote`
    swaps a staged candidate in, `--require-not-worse` refuses a worse one."""
    from embedding_pipeline.lib.engine.model_switch import (
        abort_switch,
        clear_candidate,
        promote_switch,
        save_candidate,
        stage_switch,
    )
    from embedding_pipeline.lib.engine.options import Progress

    url = require_schema(settings)
    specs = list(settings.tables.values())
    if args.abort:
        with db.connection(url, vector=False) as conn:
            for spec in specs:
                found = abort_switch(conn, spec)
                print(f"{spec.table}: " + ("switch discarded" if found else "no switch found"))
            clear_candidate(conn)
        return 0
    if args.promote and args.no_promote:
        raise CliError("model switch: --promote and --no-promote exclude each other")
    if args.promote:
        candidate = staged_candidate(url)
        named = _candidate_from_args(settings, args) if args.provider else candidate
        if (named.model_id, named.vector_type) != (candidate.model_id, candidate.vector_type):
            raise CliError(
                f"--promote: the shadow columns hold {candidate.model_id} "
                f"({candidate.vector_type}), not {named.model_id} ({named.vector_type}) "
                "named on the command line (leave --provider out to promote the staged one)"
            )
    elif not args.provider:
        raise CliError("model switch needs --provider (or --promote, or --abort)")
    else:
        candidate = _candidate_from_args(settings, args)
    target = candidate_settings(settings, candidate)
    embedder = build_embedder(target)
    batch_size = args.batch_size or target.embedder.effective_batch_size
    if embedder.model_id != candidate.model_id:
        raise CliError(f"{embedder.model_id} is not the staged {candidate.model_id}")

    def progress(table: str, p: Progress) -> None:
        print(f"  {table}: {p.describe()}", file=sys.stderr)

    reports = None
    if not args.promote:
        print(
            f"switching {', '.join(s.table for s in specs)} to {embedder.describe()} stored as "
            f"{candidate.vector_type}; search keeps the current vectors until the swap"
        )
        with db.connection(url, vector=False) as conn:
            save_candidate(conn, candidate)
        reports = stage_switch(
            url,
            specs,
            embedder,
            settings.hnsw,
            batch_size=batch_size,
            vector_type=candidate.vector_type,
            on_progress=progress,
        )
        if args.no_promote:
            for r in reports:
                print(
                    f"  {r.table:<9} {r.model_id}: embedded {r.embedded} in {r.passes} "
                    f"pass(es), index {r.index_seconds:.1f}s"
                )
            print(
                "\nthe candidate waits in the shadow columns; compare it with `embedding-"
                "pipeline eval QUESTIONS.json --compare`, then `embedding-pipeline model switch "
                "--promote [--require-not-worse]` or `--abort`"
            )
            return 0
    if args.require_not_worse:
        _require_not_worse(args, settings, url)
    reports = promote_switch(
        url, specs, embedder, batch_size=batch_size, reports=reports, on_progress=progress
    )
    for r in reports:
        previous = f"{r.previous_model or 'nothing'} ({r.previous_dimension} dimensions)"
        print(
            f"  {r.table:<9} {previous} -> {r.model_id} ({candidate.vector_type}"
            f"({r.dimension})): embedded {r.embedded} in {r.passes} pass(es), index "
            f"{r.index_seconds:.1f}s, swap {r.swap_seconds * 1000:.0f} ms, "
            f"{r.left_for_next_run} left for the next run"
        )
    print(
        "\nswitched. Now set " + " ".join(_switch_env(candidate)) + " for every Dagster "
        "process (and reload the code location); until then runs refuse to write with the "
        "old model."
    )
    return 0


def _candidate_from_args(settings: Settings, args: argparse.Namespace) -> Candidate:
    """The model the command line names (prompts: the model's own unless given; storage
    type: the current one unless given)."""
    from embedding_pipeline.lib.embedders import expected_model_id
    from embedding_pipeline.lib.engine.model_switch import Candidate

    return Candidate(
        provider=args.provider,
        model=args.model,
        dimensions=args.dimensions,
        vector_type=args.vector_type or settings.embedder.vector_type,
        query_prefix=args.query_prefix,
        document_prefix=args.document_prefix,
        model_id=expected_model_id(
            args.provider, args.model, args.dimensions, args.query_prefix, args.document_prefix
        ),
    )


def _switch_env(candidate: Candidate) -> list[str]:
    """The EP_* assignments that configure the switched-to model."""
    env = [f"EP_EMBEDDING_PROVIDER={candidate.provider}"]
    for name, value in (
        ("EP_EMBEDDING_MODEL", candidate.model),
        ("EP_EMBEDDING_DIMENSIONS", candidate.dimensions),
        ("EP_QUERY_PREFIX", candidate.query_prefix),
        ("EP_DOCUMENT_PREFIX", candidate.document_prefix),
    ):
        if value is not None:
            env.append(f"{name}={shlex.quote(str(value))}")
    env.append(f"EP_VECTOR_TYPE={candidate.vector_type}")
    return env
