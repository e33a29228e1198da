"""The fake providers' vectors: a function of the text alone, as a real model's are."""

from __future__ import annotations

import base64
import hashlib

import numpy as np


def fake_vector(text: str, dim: int = 384) -> np.ndarray:
    """A unit vector that depends only on `text` (and `dim`): Gaussian components from a
    generator seeded by the text's SHA-256, normalised. Distinct texts get distinct vectors
    with no neighbourhood structure."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def b64(vector: np.ndarray) -> str:
    """OpenAI's base64 encoding: little-endian float32."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
