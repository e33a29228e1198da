"""What the test groups share: paths, the small test chat in a database, Dagster runs, the
provider-fault, daemon, incremental and search helpers. The fake provider itself is
`embedding_pipeline.testing`, shipped so that the benchmarks can use it too."""
