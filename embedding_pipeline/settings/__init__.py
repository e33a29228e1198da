"""Every setting of the pipeline, read from the environment in exactly one place.

`load_settings()` is called by the composition root (`definitions.py`) and by the CLI;
nothing else reads environment variables. Tests build `Settings` directly.

`model.py` holds the dataclasses, `environment.py` reads them from the environment,
`validation.py` says whether they can work. The domain types `lib/` shares are defined in
`lib/store/domain.py` and re-exported here.
"""

from embedding_pipeline.lib.embedders import PROVIDERS
from embedding_pipeline.lib.store.domain import HnswSettings, TableSpec, default_tables
from embedding_pipeline.settings.environment import api_keys, load_settings, openai_api_key
from embedding_pipeline.settings.model import (
    PROJECT_ROOT,
    ApiSettings,
    CheckSettings,
    EmbeddedDatabaseSettings,
    EmbedderSettings,
    EngineSettings,
    SearchSettings,
    SensorSettings,
    Settings,
    SettingsError,
)
from embedding_pipeline.settings.validation import PostgresName, postgres_names, validate_settings

__all__ = [
    "PROJECT_ROOT",
    "PROVIDERS",
    "ApiSettings",
    "CheckSettings",
    "EmbeddedDatabaseSettings",
    "EmbedderSettings",
    "EngineSettings",
    "HnswSettings",
    "PostgresName",
    "SearchSettings",
    "SensorSettings",
    "Settings",
    "SettingsError",
    "TableSpec",
    "api_keys",
    "default_tables",
    "load_settings",
    "openai_api_key",
    "postgres_names",
    "validate_settings",
]
