"""The batch engine's parts with no Dagster import: retries, rate limits, the errors table."""
