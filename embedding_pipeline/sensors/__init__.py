"""Sensors: `extraction_sensor` (new extractions launch runs for the months they touched)
and `backlog_sensor` (any row without a current embedding, whatever the cause)."""

from embedding_pipeline.sensors.backlog import BACKLOG_SENSOR, build_backlog_sensor
from embedding_pipeline.sensors.extraction import (
    EXTRACTIONS_TAG,
    SENSOR_NAME,
    build_extraction_sensor,
    describe_ids,
    run_key_for,
)

__all__ = [
    "BACKLOG_SENSOR",
    "EXTRACTIONS_TAG",
    "SENSOR_NAME",
    "build_backlog_sensor",
    "build_extraction_sensor",
    "describe_ids",
    "run_key_for",
]
