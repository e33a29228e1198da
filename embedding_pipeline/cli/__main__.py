"""`python -m embedding_pipeline.cli`: the `embedding-pipeline` command."""

import sys

from embedding_pipeline.cli import main

sys.exit(main())
