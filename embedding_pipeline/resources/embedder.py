"""The embedding provider, chosen by configuration (local by default)."""

import dagster as dg
from pydantic import Field

from embedding_pipeline.lib.embedders import (
    Embedder,
    build_embedder,
    expected_dimension,
    expected_model_id,
)
from embedding_pipeline.lib.embedders.ratelimit import RateLimits
from embedding_pipeline.lib.embedders.retry import RetryPolicy
from embedding_pipeline.settings import DEFAULT_BATCH_SIZES


class EmbedderResource(dg.ConfigurableResource):
    """Which model embeds: `local` (offline, default), `openai` or `ollama`, and how hard a
    run may push it (requests in flight, retries, rate limits)."""

    provider: str = Field(default="local", description="local, openai or ollama")
    model_name: str | None = Field(default=None, description="provider model; None: default")
    dimensions: int | None = Field(default=None, description="vector size if not the model's")
    batch_size: int | None = Field(
        default=None, description="rows per provider request; None: the provider's default"
    )
    concurrency: int | None = Field(
        default=None, description="provider requests in flight per run; None: provider default"
    )
    openai_api_key: str | None = Field(default=None, description="from OPENAI_API_KEY")
    openai_base_url: str | None = None
    ollama_host: str = "http://127.0.0.1:11434"
    ollama_max_input_tokens: int | None = None
    timeout_seconds: float = Field(default=60.0, description="one request's time limit")
    retry_deadline_seconds: float = Field(
        default=300.0, description="how long one request keeps retrying transient failures"
    )
    requests_per_minute: float | None = Field(default=None, description="client-side limit")
    tokens_per_minute: float | None = Field(default=None, description="client-side limit")
    query_prefix: str | None = Field(
        default=None, description="text before every search query; None: the model's own"
    )
    document_prefix: str | None = Field(
        default=None, description="text before every document; None: the model's own"
    )

    def build(self) -> Embedder:
        """A new embedder (its SDK client is created here, in the run, not at import)."""
        return build_embedder(
            self.provider,
            model=self.model_name,
            dimensions=self.dimensions,
            openai_api_key=self.openai_api_key,
            openai_base_url=self.openai_base_url,
            ollama_host=self.ollama_host,
            ollama_max_input_tokens=self.ollama_max_input_tokens,
            timeout=self.timeout_seconds,
            retry=RetryPolicy(deadline_seconds=self.retry_deadline_seconds),
            rate_limits=RateLimits(
                requests_per_minute=self.requests_per_minute,
                tokens_per_minute=self.tokens_per_minute,
            ),
            query_prefix=self.query_prefix,
            document_prefix=self.document_prefix,
        )

    @property
    def dimension(self) -> int:
        return expected_dimension(self.provider, self.model_name, self.dimensions)

    @property
    def model_id(self) -> str:
        return expected_model_id(
            self.provider, self.model_name, self.dimensions, self.query_prefix, self.document_prefix
        )

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size or DEFAULT_BATCH_SIZES.get(self.provider, 64)
