"""Where the tests find the checkout, their data and the sample chat."""

from pathlib import Path

#: The checkout: the folder holding `embedding_pipeline/` and `embedding_pipeline_tests/`.
ROOT = Path(__file__).resolve().parents[2]
#: The small test chat and its extraction.
DATA = ROOT / "embedding_pipeline_tests" / "data"
#: The sample chat shipped with the package (what `make demo` loads).
SAMPLE = ROOT / "embedding_pipeline" / "sample_data"
