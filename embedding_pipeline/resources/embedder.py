"""The embedding provider, chosen by configuration (local by default)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

import dagster as dg
import pydantic
from pydantic import Field

from embedding_pipeline.lib.embedders import (
    Embedder,
    build_embedder,
    expected_dimension,
    expected_model_id,
)
from embedding_pipeline.lib.embedders.ratelimit import RateLimits
from embedding_pipeline.lib.embedders.retry import RetryPolicy
from embedding_pipeline.settings import EmbedderSettings

#: Config fields named otherwise than their `EmbedderSettings` field (pydantic keeps the
#: `model_` prefix for itself).
_CONFIG_NAMES = {"model": "model_name"}

R = TypeVar("R", bound=type)


def _config_name(field_name: str) -> str:
    return _CONFIG_NAMES.get(field_name, field_name)


def _with_settings_fields(cls: R) -> R:
    """`cls` with one config field per `EmbedderSettings` field (its type, default and
    description), so that the embedder's fields are defined once, in the settings."""
    hints = typing.get_type_hints(EmbedderSettings)
    fields: dict[str, Any] = {
        _config_name(f.name): (
            hints[f.name],
            Field(default=f.default, description=f.metadata.get("description")),
        )
        for f in dataclasses.fields(EmbedderSettings)
    }
    built: type = pydantic.create_model(
        cls.__name__, __base__=cls, __module__=cls.__module__, __doc__=cls.__doc__, **fields
    )
    return typing.cast(R, built)


@_with_settings_fields
class EmbedderResource(dg.ConfigurableResource):
    """Which model embeds: `local` (offline, default), `openai` or `ollama`, and how hard a
    run may push it (requests in flight, retries, rate limits). Its fields are those of
    `EmbedderSettings` (`model` is `model_name` here), plus the API key."""

    openai_api_key: str | None = Field(default=None, description="from OPENAI_API_KEY")

    @classmethod
    def from_settings(
        cls, settings: EmbedderSettings, *, openai_api_key: str | dg.EnvVar | None = None
    ) -> EmbedderResource:
        """The resource configured as `settings` say; the key stays an `EnvVar` reference."""
        values = {
            _config_name(f.name): getattr(settings, f.name) for f in dataclasses.fields(settings)
        }
        return cls(openai_api_key=openai_api_key, **values)

    @property
    def settings(self) -> EmbedderSettings:
        """This configuration as `EmbedderSettings`."""
        return EmbedderSettings(
            **{
                f.name: getattr(self, _config_name(f.name))
                for f in dataclasses.fields(EmbedderSettings)
            }
        )

    def build(self) -> Embedder:
        """A new embedder (its SDK client is created here, in the run, not at import)."""
        s = self.settings
        return build_embedder(
            s.provider,
            model=s.model,
            dimensions=s.dimensions,
            openai_api_key=self.openai_api_key,
            openai_base_url=s.openai_base_url,
            ollama_host=s.ollama_host,
            ollama_max_input_tokens=s.ollama_max_input_tokens,
            timeout=s.timeout_seconds,
            retry=RetryPolicy(deadline_seconds=s.retry_deadline_seconds),
            rate_limits=RateLimits(
                requests_per_minute=s.requests_per_minute,
                tokens_per_minute=s.tokens_per_minute,
            ),
            query_prefix=s.query_prefix,
            document_prefix=s.document_prefix,
        )

    @property
    def dimension(self) -> int:
        s = self.settings
        return expected_dimension(s.provider, s.model, s.dimensions)

    @property
    def model_id(self) -> str:
        s = self.settings
        return expected_model_id(
            s.provider, s.model, s.dimensions, s.query_prefix, s.document_prefix
        )

    @property
    def effective_batch_size(self) -> int:
        return self.settings.effective_batch_size
