"""Every PartitionsDefinition of the pipeline.

Embedding assets are partitioned by calendar month (UTC) of each row's partition column
(a message's send time, a topic's or atom's creation time): about twelve partitions a
year, so years of use stay a short list, and any backlog is a date range an operator can
backfill. The first partition also holds everything older than `partition_start` (and rows
with no timestamp); the last one, the current month, holds anything newer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import dagster as dg

from embedding_pipeline.lib.store.domain import Window

PARTITION_KEY_FORMAT = "%Y-%m-%d"


def monthly_partitions(start: str) -> dg.MonthlyPartitionsDefinition:
    return dg.MonthlyPartitionsDefinition(
        start_date=start, end_offset=1, timezone="UTC", fmt=PARTITION_KEY_FORMAT
    )


def window_for(
    partitions_def: dg.TimeWindowPartitionsDefinition, time_window: dg.TimeWindow
) -> Window:
    """The rows a run over `time_window` owns, with the open ends described above."""
    first = partitions_def.get_first_partition_window()
    last = partitions_def.get_last_partition_window()
    start = None if first is not None and time_window.start <= first.start else time_window.start
    end = None if last is not None and time_window.end >= last.end else time_window.end
    return Window(start=start, end=end)


def partition_key_for(
    partitions_def: dg.TimeWindowPartitionsDefinition, moment: datetime | None
) -> str:
    """The partition that owns a row with partition-column value `moment`."""
    return _clamp(partitions_def.get_partition_keys(), moment)


def _clamp(keys: Sequence[str], moment: datetime | None) -> str:
    """The key of `moment`'s month among `keys`, the first or last one beyond them."""
    if moment is None:
        return keys[0]
    key = moment.astimezone(UTC).strftime("%Y-%m-01")
    if key < keys[0]:
        return keys[0]
    if key > keys[-1]:
        return keys[-1]
    return key


def partition_mapper(
    partitions_def: dg.TimeWindowPartitionsDefinition,
) -> Callable[[datetime | None], str]:
    """`partition_key_for` bound to `partitions_def` (what `lib/quality/backlog.py` asks for), its
    keys listed once (listing them costs milliseconds, a report maps dozens of months)."""
    keys = partitions_def.get_partition_keys()
    return lambda moment: _clamp(keys, moment)
