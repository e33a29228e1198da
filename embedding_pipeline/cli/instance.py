"""The project-local Dagster instance's dagster.yaml: written, or completed, before every
command."""

from __future__ import annotations

from pathlib import Path

#: The project-local Dagster instance (SQLite in DAGSTER_HOME); production uses deploy/.
#: No telemetry, and no first-visit "Join the community" pop-up (`nux`) in the UI.
LOCAL_INSTANCE_CONFIG = "telemetry:\n  enabled: false\nnux:\n  enabled: false\n"
#: Runs launched by the daemon (sensor, schedule, backfill, UI) that fail, say while the
#: provider is down past EP_RETRY_DEADLINE_SECONDS, are launched again (their committed
#: batches stay); at most two runs at once per provider pool (`embeddings_<provider>`).
#: docs/operations.md, "Provider faults".
LOCAL_INSTANCE_CONFIG += """\
run_retries:
  enabled: true
  max_retries: 3
concurrency:
  pools:
    granularity: run
    default_limit: 2
"""
#: The queue starts a queued run within a second (Dagster's default waits up to five): a
#: sensor's run of a few new rows is part of how soon they are searchable.
_RUN_QUEUE = """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
"""
#: The sensors tick every 5 and 10 s: their skipped ticks (about 13,000 a day, 1 kB each)
#: are kept one day instead of Dagster's seven; ticks that launched runs are kept.
_TICK_RETENTION = """\
retention:
  sensor:
    purge_after_days:
      skipped: 1
"""
LOCAL_INSTANCE_CONFIG += _RUN_QUEUE + _TICK_RETENTION
#: Settings a dagster.yaml written by an older checkout may lack; added when absent.
_ADDED_WHEN_ABSENT = {
    "telemetry": "telemetry:\n  enabled: false\n",
    "nux": "nux:\n  enabled: false\n",
    "run_coordinator": _RUN_QUEUE,
    "retention": _TICK_RETENTION,
}


def write_local_instance_config(path: Path) -> None:
    """Create the local instance's dagster.yaml, or add the settings it lacks (an older
    checkout wrote telemetry only, or no run queue setting) without touching what a
    person configured."""
    if not path.exists():
        path.write_text(LOCAL_INSTANCE_CONFIG)
        return
    text = path.read_text()
    keys = {line.split(":", 1)[0] for line in text.splitlines() if not line.startswith(" ")}
    added = "".join(block for key, block in _ADDED_WHEN_ABSENT.items() if key not in keys)
    if added:
        path.write_text(text.rstrip("\n") + "\n" + added if text.strip() else added)
