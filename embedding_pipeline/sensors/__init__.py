"""Sensors: `extraction_sensor` (new extractions launch runs for the months they touched)
and `backlog_sensor` (any row without a current embedding, whatever the cause)."""

from embedding_pipeline.sensors.extraction import (
    EXTRACTIONS_TAG,
    SENSOR_NAME,
    build_extraction_sensor,
    describe_ids,
    run_key_for,
)

__all__ = [
    "EXTRACTIONS_TAG",
    "SENSOR_NAME",
    "build_extraction_sensor",
    "describe_ids",
    "run_key_for",
]
