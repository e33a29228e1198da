"""The embedding provider, chosen by configuration (local by default)."""

import dagster as dg
from pydantic import Field

from embedding_pipeline.lib.embedders import Embedder, build_embedder, expected_dimension


class EmbedderResource(dg.ConfigurableResource):
    """Which model embeds: `local` (offline, default), `openai` or `ollama`."""

    provider: str = Field(default="local", description="local, openai or ollama")
    model_name: str | None = Field(default=None, description="provider model; None: default")
    dimensions: int | None = Field(default=None, description="vector size if not the model's")
    batch_size: int = Field(default=64, description="rows per database batch")
    openai_api_key: str | None = Field(default=None, description="from OPENAI_API_KEY")
    openai_base_url: str | None = None
    ollama_host: str = "http://127.0.0.1:11434"
    timeout_seconds: float = 60.0

    def build(self) -> Embedder:
        """A new embedder (its SDK client is created here, in the run, not at import)."""
        return build_embedder(
            self.provider,
            model=self.model_name,
            dimensions=self.dimensions,
            openai_api_key=self.openai_api_key,
            openai_base_url=self.openai_base_url,
            ollama_host=self.ollama_host,
            timeout=self.timeout_seconds,
        )

    @property
    def dimension(self) -> int:
        return expected_dimension(self.provider, self.model_name, self.dimensions)
