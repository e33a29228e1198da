"""Embedders that call a service: OpenAI (or any server speaking its API) and Ollama.

Each request carries one batch; the caller (the sync loop) keeps batches within
`max_batch_size`. Errors are turned into `EmbeddingError`s that name the service and the
reason but never the API key. Retries and rate limits are the provider-hardening issue's.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from embedding_pipeline.lib.embedders.base import Embedder, EmbeddingError

#: Native output dimension of well-known models; anything else needs explicit dimensions.
KNOWN_DIMENSIONS: dict[str, dict[str, int]] = {
    "openai": {
        "text-embedding-3-small": 1536,
        "text-embedding-3-large": 3072,
        "text-embedding-ada-002": 1536,
    },
    "ollama": {
        "nomic-embed-text": 768,
        "mxbai-embed-large": 1024,
        "all-minilm": 384,
        "snowflake-arctic-embed": 1024,
        "bge-m3": 1024,
    },
}
DEFAULT_MODELS = {"openai": "text-embedding-3-small", "ollama": "nomic-embed-text"}


def resolve_dimension(provider: str, model: str, dimensions: int | None) -> int:
    if dimensions is not None:
        return dimensions
    known = KNOWN_DIMENSIONS.get(provider, {}).get(model.split(":")[0])
    if known is None:
        raise ValueError(
            f"the dimension of {provider} model {model!r} is not known; "
            "set EP_EMBEDDING_DIMENSIONS"
        )
    return known


def _model_id(provider: str, model: str, dimensions: int, native: int | None) -> str:
    suffix = "" if native == dimensions else f"@{dimensions}"
    return f"{provider}:{model}{suffix}"


class OpenAIEmbedder(Embedder):
    """OpenAI's /v1/embeddings through the `openai` client (base URL configurable)."""

    max_batch_size = 2048
    max_batch_tokens = 300_000

    def __init__(self, *, model: str, api_key: str | None, dimensions: int | None = None,
                 base_url: str | None = None, timeout: float = 60.0) -> None:
        super().__init__()
        import openai

        native = KNOWN_DIMENSIONS["openai"].get(model)
        self.dimension = resolve_dimension("openai", model, dimensions)
        self.model_id = _model_id("openai", model, self.dimension, native)
        self._model = model
        # ask for a reduced size only where the caller chose one the model can shorten to
        self._request_dimensions = dimensions if dimensions not in (None, native) else None
        self._client = openai.OpenAI(
            api_key=api_key or "unset", base_url=base_url, timeout=timeout, max_retries=0
        )
        self._where = base_url or "api.openai.com"

    def _embed(self, texts: list[str]) -> np.ndarray:
        import openai

        kwargs: dict[str, Any] = {"model": self._model, "input": texts,
                                  "encoding_format": "base64"}
        if self._request_dimensions is not None:
            kwargs["dimensions"] = self._request_dimensions
        try:
            response = self._client.embeddings.create(**kwargs)
        except openai.APIConnectionError as exc:
            raise EmbeddingError(f"OpenAI at {self._where} is unreachable: {exc}") from None
        except openai.APIStatusError as exc:
            raise EmbeddingError(
                f"OpenAI at {self._where} answered HTTP {exc.status_code}: "
                f"{_short(exc.message)}"
            ) from None
        rows = sorted(response.data, key=lambda item: item.index)
        return np.stack([_decode(item.embedding) for item in rows]) if rows else np.zeros((0, 0))


def _decode(embedding: Any) -> np.ndarray:
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


class OllamaEmbedder(Embedder):
    """Ollama's /api/embed through the `ollama` client."""

    max_batch_size = 512

    def __init__(self, *, model: str, host: str, dimensions: int | None = None,
                 timeout: float = 60.0) -> None:
        super().__init__()
        import ollama

        self.dimension = resolve_dimension("ollama", model, dimensions)
        self.model_id = f"ollama:{model}"
        self._model = model
        self._host = host
        self._client = ollama.Client(host=host, timeout=timeout)

    def _embed(self, texts: list[str]) -> np.ndarray:
        import httpx
        import ollama

        try:
            response = self._client.embed(model=self._model, input=texts)
        except ollama.ResponseError as exc:
            raise EmbeddingError(
                f"Ollama at {self._host} answered HTTP {exc.status_code}: {_short(exc.error)}"
            ) from None
        except (httpx.HTTPError, ConnectionError) as exc:
            raise EmbeddingError(f"Ollama at {self._host} is unreachable: {exc}") from None
        vectors = response.embeddings
        if not vectors:
            return np.zeros((0, self.dimension), dtype=np.float32)
        try:
            return np.asarray(vectors, dtype=np.float32)
        except ValueError:
            raise EmbeddingError(f"Ollama at {self._host} returned ragged vectors") from None


def _short(message: object, limit: int = 300) -> str:
    text = str(message)
    return text if len(text) <= limit else text[:limit] + "…"
