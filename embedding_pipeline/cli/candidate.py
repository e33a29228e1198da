"""The candidate model a `model switch --no-promote` leaves in the shadow columns: its
settings, loading it, and a searcher over it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedding_pipeline.cli.common import CliError, build_embedder
from embedding_pipeline.lib.store import db
from embedding_pipeline.settings import Settings

if TYPE_CHECKING:
    from embedding_pipeline.lib.engine.model_switch import Candidate
    from embedding_pipeline.search import Searcher


def candidate_settings(settings: Settings, candidate: Candidate) -> Settings:
    """`settings` configured for the candidate model (keys and hosts as configured)."""
    from dataclasses import replace

    return replace(
        settings,
        embedder=replace(
            settings.embedder,
            provider=candidate.provider,
            model=candidate.model,
            dimensions=candidate.dimensions,
            vector_type=candidate.vector_type,
            query_prefix=candidate.query_prefix,
            document_prefix=candidate.document_prefix,
        ),
    )


def staged_candidate(url: str) -> Candidate:
    from embedding_pipeline.lib.engine.model_switch import load_candidate

    with db.connection(url, vector=False) as conn:
        candidate = load_candidate(conn)
    if candidate is None:
        raise CliError(
            "no model switch is waiting in the shadow columns; start one with "
            "`embedding-pipeline model switch --provider ... --no-promote`"
        )
    return candidate


def candidate_searcher(settings: Settings, url: str) -> Searcher:
    """A searcher over the shadow columns with the staged candidate's model: the same
    search code as the live one, on the other columns and index."""
    from dataclasses import replace

    from embedding_pipeline.lib.engine.model_switch import shadow_spec
    from embedding_pipeline.search import Searcher

    candidate = staged_candidate(url)
    target = candidate_settings(settings, candidate)
    embedder = build_embedder(target)
    if embedder.model_id != candidate.model_id:
        raise CliError(
            f"the shadow columns were filled by {candidate.model_id} but this environment "
            f"makes {embedder.model_id} from the same settings; check the provider's host "
            "and EP_* variables"
        )
    shadows = {key: shadow_spec(spec) for key, spec in settings.tables.items()}
    return Searcher(replace(target, tables=shadows), embedder=embedder)
