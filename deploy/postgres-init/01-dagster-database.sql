-- Runs once, when the postgres volume is empty (docker-entrypoint-initdb.d).
-- The application database (POSTGRES_DB, embedding_pipeline) is created by the image;
-- Dagster's own storage gets a database of its own beside it.
CREATE DATABASE dagster;

-- pgvector in the application database (the pipeline also creates it if it is missing).
\connect embedding_pipeline
CREATE EXTENSION IF NOT EXISTS vector;
