"""The database: domain types, connections, the embedded server, schema, the tracking
trigger and the HNSW index."""
