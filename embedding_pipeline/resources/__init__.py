"""Dagster resources: the database and the embedder, configured where definitions are wired."""

from embedding_pipeline.resources.embedder import EmbedderResource
from embedding_pipeline.resources.postgres import PostgresResource

__all__ = ["EmbedderResource", "PostgresResource"]
