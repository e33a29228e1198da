"""The named jobs: every run of this code location is one of them, so the runs list says
what a run does, and its tags say who started it, for which tables and months.

- `embed_messages`, `embed_topics`, `embed_atoms`: one table's embeddings for the chosen
  month partitions (the backlog sensor, the extraction sensor, a person);
- `embed_tables`: several tables' embeddings in one run (a person, from the UI or
  `dg launch`; the sensors launch one run per table);
- `materialize_all`: the embedding partitions in one run, with the embedding assets'
  per-run checks (`embedding-pipeline materialize` and the demo run it over the months with
  rows to embed, `runner.months_to_run`; the source tables are external assets, which no
  run materializes);
- `run_checks`: every check of the embedding assets (the checks schedule,
  `embedding-pipeline check`).

Runs launched from the asset graph's *Materialize* button or a backfill run Dagster's
own `__ASSET_JOB`; the embedding step adds the missing tags to such a run when it starts
(`missing_run_tags`), so the runs list shows them as embedding work too.

Every run carries `dagster/retry_strategy: ALL_STEPS`: when the daemon retries a failed
run (`run_retries` in the instance config), the retry embeds again and runs every check,
instead of re-running only the failed step (Dagster's default, `FROM_FAILURE`), which
would re-run a check over rows nothing embeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import dagster as dg

from embedding_pipeline.settings import Settings

TRIGGER_TAG = "embedding_pipeline/trigger"
TABLES_TAG = "embedding_pipeline/tables"
PARTITIONS_TAG = "embedding_pipeline/partitions"
#: Dagster's tag for what a retry of a failed run re-executes.
RETRY_STRATEGY_TAG = "dagster/retry_strategy"
#: Dagster's tag on the runs of a backfill.
BACKFILL_ID_TAG = "dagster/backfill"
#: Who starts runs: the extraction sensor, the backlog sensor, a backfill, the demo, the
#: CLI, the checks schedule, or a person (the default of every job, for runs launched
#: from the UI or with `dg launch --job`).
TRIGGERS = ("sensor", "backlog", "backfill", "demo", "cli", "schedule", "manual")

EMBED_TABLES = "embed_tables"
MATERIALIZE_ALL = "materialize_all"
RUN_CHECKS = "run_checks"
#: Dagster refuses tag values longer than this; a long list of months is summarised.
_MAX_TAG_CHARS = 200


def embed_job_name(table_key: str) -> str:
    return f"embed_{table_key}"


def describe_partitions(keys: Sequence[str]) -> str:
    """The months of a run as a tag value: every key, or the first..last and a count."""
    ordered = sorted(set(keys))
    joined = ",".join(ordered)
    if len(joined) <= _MAX_TAG_CHARS:
        return joined
    return f"{ordered[0]}..{ordered[-1]} ({len(ordered)} partitions)"


def run_tags(
    trigger: str, table_keys: Iterable[str], partitions: Sequence[str] = ()
) -> dict[str, str]:
    """The tags every run of this code location carries."""
    if trigger not in TRIGGERS:
        raise ValueError(f"unknown trigger {trigger!r}")
    tags = {
        TRIGGER_TAG: trigger,
        TABLES_TAG: ",".join(sorted(set(table_keys))),
        RETRY_STRATEGY_TAG: "ALL_STEPS",
    }
    if partitions:
        tags[PARTITIONS_TAG] = describe_partitions(partitions)
    return tags


def missing_run_tags(
    existing: Mapping[str, str], table_keys: Iterable[str], partitions: Sequence[str]
) -> dict[str, str]:
    """The project's tags that a run launched outside its sensors and CLI lacks (a UI
    materialization or backfill, which Dagster runs as `__ASSET_JOB` or as the job's
    run with the job's `manual` trigger): its trigger (`backfill` for a run of a backfill,
    else `manual`), tables, months and retry strategy. Tags a sensor, the CLI or a person
    set are kept; a second embedding step of the same run adds its table to the list."""
    backfill = BACKFILL_ID_TAG in existing and existing.get(TRIGGER_TAG, "manual") == "manual"
    wanted = run_tags("backfill" if backfill else "manual", table_keys, partitions)
    tables = {t for t in existing.get(TABLES_TAG, "").split(",") if t} | set(table_keys)
    wanted[TABLES_TAG] = ",".join(sorted(tables))
    return {
        key: value
        for key, value in wanted.items()
        if existing.get(key) != value
        and (key not in existing or key == TABLES_TAG or (key == TRIGGER_TAG and backfill))
    }


def range_tags(start: str, end: str) -> Mapping[str, str]:
    """Dagster's own tags for a run over the partitions `start` to `end`."""
    return {
        "dagster/asset_partition_range_start": start,
        "dagster/asset_partition_range_end": end,
    }


def build_jobs(
    settings: Settings, per_run_checks: Iterable[dg.AssetCheckKey]
) -> list[dg.UnresolvedAssetJobDefinition]:
    """The jobs of the table above for `settings.tables`; `per_run_checks` are the checks
    `materialize_all` carries (`checks.per_run_check_keys`)."""
    tables = list(settings.tables)
    embeddings = {key: dg.AssetKey(spec.asset_name) for key, spec in settings.tables.items()}
    jobs = [
        dg.define_asset_job(
            embed_job_name(key),
            selection=dg.AssetSelection.assets(asset),
            tags=run_tags("manual", [key]),
            description=f"Embed the `{settings.tables[key].table}` rows of the chosen month "
            "partitions that need it, with the asset's checks.",
        )
        for key, asset in embeddings.items()
    ]
    jobs += [
        dg.define_asset_job(
            EMBED_TABLES,
            selection=dg.AssetSelection.assets(*embeddings.values()),
            tags=run_tags("manual", tables),
            description="Embed several tables' rows of the chosen month partitions in one run "
            "(sensor runs select the tables they need).",
        ),
        dg.define_asset_job(
            MATERIALIZE_ALL,
            # the checks every embedding run carries (recall and latency on small samples)
            selection=dg.AssetSelection.assets(*embeddings.values()).without_checks()
            | dg.AssetSelection.checks(*per_run_checks),
            tags=run_tags("manual", tables),
            description="Every embedding partition of every table in one run, with the "
            "embedding assets' per-run checks.",
        ),
        dg.define_asset_job(
            RUN_CHECKS,
            selection=dg.AssetSelection.checks_for_assets(*embeddings.values()),
            tags=run_tags("manual", tables),
            description="Every asset check of the embedding assets, recall and latency included.",
        ),
    ]
    return jobs
