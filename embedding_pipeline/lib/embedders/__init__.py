"""Embedding providers behind one interface, chosen by configuration."""

from __future__ import annotations

from embedding_pipeline.lib.embedders.base import Embedder, EmbeddingError, check_vectors
from embedding_pipeline.lib.embedders.local import LOCAL_DIMENSION, LOCAL_MODEL_ID, LocalEmbedder
from embedding_pipeline.lib.embedders.remote import (
    DEFAULT_MODELS,
    OllamaEmbedder,
    OpenAIEmbedder,
    resolve_dimension,
)

PROVIDERS = ("local", "openai", "ollama")


def build_embedder(
    provider: str,
    *,
    model: str | None = None,
    dimensions: int | None = None,
    openai_api_key: str | None = None,
    openai_base_url: str | None = None,
    ollama_host: str = "http://127.0.0.1:11434",
    timeout: float = 60.0,
) -> Embedder:
    """The embedder for `provider` (local, openai or ollama)."""
    if provider == "local":
        if dimensions not in (None, LOCAL_DIMENSION):
            raise ValueError(f"the local model has {LOCAL_DIMENSION} dimensions, not {dimensions}")
        return LocalEmbedder()
    if provider == "openai":
        return OpenAIEmbedder(
            model=model or DEFAULT_MODELS["openai"],
            api_key=openai_api_key,
            dimensions=dimensions,
            base_url=openai_base_url,
            timeout=timeout,
        )
    if provider == "ollama":
        return OllamaEmbedder(
            model=model or DEFAULT_MODELS["ollama"],
            host=ollama_host,
            dimensions=dimensions,
            timeout=timeout,
        )
    raise ValueError(f"unknown embedding provider {provider!r}; choose one of {PROVIDERS}")


def expected_dimension(provider: str, model: str | None, dimensions: int | None) -> int:
    """The vector size a provider configuration produces, without building a client."""
    if provider == "local":
        return LOCAL_DIMENSION
    if provider not in DEFAULT_MODELS:
        raise ValueError(f"unknown embedding provider {provider!r}; choose one of {PROVIDERS}")
    return resolve_dimension(provider, model or DEFAULT_MODELS[provider], dimensions)


__all__ = [
    "LOCAL_MODEL_ID",
    "PROVIDERS",
    "Embedder",
    "EmbeddingError",
    "LocalEmbedder",
    "OllamaEmbedder",
    "OpenAIEmbedder",
    "build_embedder",
    "check_vectors",
    "expected_dimension",
]
