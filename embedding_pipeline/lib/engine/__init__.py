"""The batch engine: a run's claims, its sessions and writers, the claim -> embed -> write
loop, the run entry point (`run.sync_embeddings`), the HNSW index around a load, the errors
table and the model switch. No Dagster import."""
