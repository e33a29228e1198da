"""Search over the embedded messages, topics and atoms: the Python API the application
imports (`api.py`), its filters (`filters.py`) and the HTTP router (`http.py`).

No Dagster import anywhere in this package: the application, the CLI and `serve` use it
without loading the code location.
"""

from embedding_pipeline.search.api import (
    Searcher,
    atoms_for_message,
    atoms_for_message_async,
    default_searcher,
    engine_for,
    messages_for_topic,
    messages_for_topic_async,
    search,
    search_async,
    similar,
    similar_async,
)
from embedding_pipeline.search.errors import InvalidQuery, ModelMismatch, NotFound, SearchError
from embedding_pipeline.search.filters import Filters
from embedding_pipeline.search.tables import TABLE_KEYS
from embedding_pipeline.search.types import MAX_LIMIT, MODES, Hit, Mode

__all__ = [
    "MAX_LIMIT",
    "MODES",
    "TABLE_KEYS",
    "Filters",
    "Hit",
    "InvalidQuery",
    "Mode",
    "ModelMismatch",
    "NotFound",
    "SearchError",
    "Searcher",
    "atoms_for_message",
    "atoms_for_message_async",
    "default_searcher",
    "engine_for",
    "messages_for_topic",
    "messages_for_topic_async",
    "search",
    "search_async",
    "similar",
    "similar_async",
]
