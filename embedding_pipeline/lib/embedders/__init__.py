"""Embedding providers behind one interface, chosen by configuration."""

from __future__ import annotations

from embedding_pipeline.lib.embedders.base import (
    Embedder,
    EmbeddingError,
    InputRejectedError,
    TransientEmbeddingError,
    check_vectors,
)
from embedding_pipeline.lib.embedders.local import LOCAL_DIMENSION, LOCAL_MODEL_ID, LocalEmbedder
from embedding_pipeline.lib.embedders.remote import (
    DEFAULT_MODELS,
    OllamaEmbedder,
    OpenAIEmbedder,
    model_id_for,
    resolve_dimension,
)
from embedding_pipeline.lib.engine.ratelimit import RateLimits, limiter_for
from embedding_pipeline.lib.engine.retry import RetryPolicy

PROVIDERS = ("local", "openai", "ollama")


def build_embedder(
    provider: str,
    *,
    model: str | None = None,
    dimensions: int | None = None,
    openai_api_key: str | None = None,
    openai_base_url: str | None = None,
    ollama_host: str = "http://127.0.0.1:11434",
    ollama_max_input_tokens: int | None = None,
    timeout: float = 60.0,
    retry: RetryPolicy | None = None,
    rate_limits: RateLimits | None = None,
) -> Embedder:
    """The embedder for `provider` (local, openai or ollama). Remote ones retry transient
    failures under `retry` and share one rate limiter per endpoint and `rate_limits`."""
    if provider == "local":
        if dimensions not in (None, LOCAL_DIMENSION):
            raise ValueError(f"the local model has {LOCAL_DIMENSION} dimensions, not {dimensions}")
        return LocalEmbedder()
    limits = rate_limits or RateLimits()
    if provider == "openai":
        return OpenAIEmbedder(
            model=model or DEFAULT_MODELS["openai"],
            api_key=openai_api_key,
            dimensions=dimensions,
            base_url=openai_base_url,
            timeout=timeout,
            retry=retry,
            limiter=limiter_for(f"openai:{openai_base_url or 'api.openai.com'}", limits),
        )
    if provider == "ollama":
        return OllamaEmbedder(
            model=model or DEFAULT_MODELS["ollama"],
            host=ollama_host,
            dimensions=dimensions,
            timeout=timeout,
            max_input_tokens=ollama_max_input_tokens,
            retry=retry,
            limiter=limiter_for(f"ollama:{ollama_host}", limits),
        )
    raise ValueError(f"unknown embedding provider {provider!r}; choose one of {PROVIDERS}")


def expected_model_id(provider: str, model: str | None, dimensions: int | None) -> str:
    """The model id a provider configuration stores next to its vectors, without building
    a client (equal to the embedder's `model_id`)."""
    if provider == "local":
        return LOCAL_MODEL_ID
    if provider not in DEFAULT_MODELS:
        raise ValueError(f"unknown embedding provider {provider!r}; choose one of {PROVIDERS}")
    name = model or DEFAULT_MODELS[provider]
    return model_id_for(provider, name, resolve_dimension(provider, name, dimensions))


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
    "InputRejectedError",
    "LocalEmbedder",
    "OllamaEmbedder",
    "OpenAIEmbedder",
    "TransientEmbeddingError",
    "build_embedder",
    "check_vectors",
    "expected_dimension",
    "expected_model_id",
]
