"""Assets: the application's tables (external) and the embeddings derived from them."""

from embedding_pipeline.assets.embeddings import build_embedding_asset
from embedding_pipeline.assets.sources import build_source_spec

__all__ = ["build_embedding_asset", "build_source_spec"]
