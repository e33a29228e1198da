"""The code location loads as Dagster tools load it, and the CLI manages the server."""

import os
import pwd
import subprocess
import sys
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.db import redact_url
from embedding_pipeline.lib.store.pgserver import SERVICE_USER, EmbeddedPostgres, free_port
from embedding_pipeline.settings import load_settings
from embedding_pipeline_tests.support.paths import ROOT

VENV_BIN = Path(sys.executable).parent


def test_definitions_module_loads_every_asset_and_resource():
    from embedding_pipeline.definitions import defs

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {
        "messages",
        "topics",
        "atoms",
        "message_embeddings",
        "topic_embeddings",
        "atom_embeddings",
    } <= keys
    embeddings = defs.get_assets_def("message_embeddings")
    assert isinstance(embeddings.partitions_def, dg.MonthlyPartitionsDefinition)
    assert embeddings.group_names_by_key[dg.AssetKey("message_embeddings")] == "embeddings"
    assert set(defs.resources) >= {"postgres", "embedder"}


@pytest.mark.parametrize("provider", ["local", "openai", "ollama"])
def test_embedding_assets_are_in_their_providers_concurrency_pool(provider: str) -> None:
    """The instance's `concurrency: pools:` limit caps the runs calling one provider; the
    checks take no slot (the source tables are external: nothing runs for them)."""
    from embedding_pipeline.definitions import build_definitions

    settings = load_settings({"EP_EMBEDDING_PROVIDER": provider, "EP_EMBEDDING_DIMENSIONS": "384"})
    defs = build_definitions(settings)
    for spec in settings.tables.values():
        assert defs.get_assets_def(spec.asset_name).op.pool == f"embeddings_{provider}"
    assert all(c.node_def.pool is None for c in defs.asset_checks or [])


def test_source_tables_are_external_assets_upstream_of_their_embeddings():
    """The application's tables are `AssetSpec`s (nothing materializes them) with their
    table name and column schema; the lineage still runs table -> embeddings."""
    from embedding_pipeline.definitions import build_definitions

    settings = load_settings({"EP_MESSAGES_TABLE": "chat_messages"})
    graph = build_definitions(settings).resolve_asset_graph()
    for key, spec in settings.tables.items():
        source = graph.get(dg.AssetKey(key))
        assert not source.is_materializable and not source.is_executable
        assert source.kinds == {"postgres"} and source.owners == ["team:embedding-pipeline"]
        assert source.metadata["dagster/table_name"] == spec.table
        schema = source.metadata["dagster/column_schema"]
        assert isinstance(schema, dg.TableSchema)
        columns = {c.name for c in schema.columns}
        assert {spec.id_column, *spec.text_columns, spec.embedding_column} <= columns
        embeddings = graph.get(dg.AssetKey(spec.asset_name))
        assert embeddings.parent_keys == {dg.AssetKey(key)}
        assert embeddings.owners == ["team:embedding-pipeline"]
        assert embeddings.code_version is not None
        assert embeddings.tags["embedding_pipeline/table"] == key
    assert graph.get(dg.AssetKey("messages")).metadata["dagster/table_name"] == "chat_messages"


@pytest.mark.parametrize("per_run", [None, "2"])
def test_loading_the_definitions_warns_of_nothing_beta(per_run):
    """The beta `backfill_policy` warning is silenced for its one call, not process-wide:
    with every warning shown, building the definitions lets no BetaWarning through."""
    import warnings

    from embedding_pipeline.definitions import build_definitions

    env = {"EP_BACKFILL_PARTITIONS_PER_RUN": per_run} if per_run else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_definitions(load_settings(env))
    assert [w for w in caught if issubclass(w.category, dg.BetaWarning)] == []


def test_openai_key_is_wired_as_an_environment_reference():
    from embedding_pipeline.definitions import build_resources

    settings = load_settings(
        {"EP_EMBEDDING_PROVIDER": "openai", "DATABASE_URL": "postgresql://u:pw@db/x"}
    )
    resources = build_resources(settings)
    assert isinstance(resources["embedder"].openai_api_key, dg.EnvVar)
    assert isinstance(resources["postgres"].database_url, dg.EnvVar)


def test_settings_reject_bad_integers():
    with pytest.raises(ValueError, match="EP_PG_PORT must be an integer"):
        load_settings({"EP_PG_PORT": "fifty"})


def test_dg_check_defs_passes_quietly_on_the_projects_instance(tmp_path):
    """As the README runs it: `.venv/bin/dg` without an activated venv, DAGSTER_HOME at the
    project's instance. No telemetry notice, no venv warning, nothing written to ~/.dagster."""
    from embedding_pipeline.cli import write_local_instance_config

    home, user_home = tmp_path / "dagster_home", tmp_path / "home"
    home.mkdir()
    user_home.mkdir()
    write_local_instance_config(home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "HOME": str(user_home)}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        [str(VENV_BIN / "dg"), "check", "defs"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).splitlines() == [
        "All component YAML validated successfully.",
        "All definitions loaded successfully.",
    ]
    assert not (user_home / ".dagster").exists()


def test_cli_db_lifecycle_is_idempotent(tmp_path):
    env = {**os.environ, "EP_PGDATA": str(tmp_path / "pg"), "EP_PG_PORT": str(free_port())}
    env.pop("DATABASE_URL", None)
    cli = str(VENV_BIN / "embedding-pipeline")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [cli, *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    try:
        assert run("db", "status").returncode == 3
        first = run("db", "start")
        assert first.returncode == 0, first.stderr
        assert run("db", "start").returncode == 0
        status = run("db", "status")
        assert status.returncode == 0 and "running" in status.stdout
        url = run("db", "url").stdout.strip()
        assert url == f"postgresql://postgres@127.0.0.1:{env['EP_PG_PORT']}/embedding_pipeline"
        psql = run("db", "psql", "-tAc", "SELECT current_database(), version()")
        assert psql.returncode == 0, psql.stderr
        assert psql.stdout.startswith("embedding_pipeline|PostgreSQL 18.")
        server = EmbeddedPostgres(tmp_path / "pg", int(env["EP_PG_PORT"]))
        pid = server.status().pid
        assert pid is not None
        owner = pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name
        assert owner == (SERVICE_USER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name)
    finally:
        assert run("db", "stop").returncode == 0
    assert run("db", "status").returncode == 3
    assert run("db", "stop").returncode == 0


def test_db_url_redacts_a_password():
    env = {**os.environ, "DATABASE_URL": "postgresql://app:s3cr3t@db.internal:5432/app"}
    out = subprocess.run(
        [str(VENV_BIN / "embedding-pipeline"), "db", "url"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "s3cr3t" not in out
    assert out.strip() == "postgresql://app:***@db.internal:5432/app"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://app:s3cr3t@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("postgresql://u:pa@ss@h/db", "postgresql://u:***@h/db"),
        ("postgres://:pw@h/db", "postgres://:***@h/db"),
        ("postgresql://app:p%40ss@h/db", "postgresql://app:***@h/db"),
        (
            "postgresql://h/db?password=topsecret&sslmode=require",
            "postgresql://h/db?password=***&sslmode=require",
        ),
        ("host=h password=kw-secret dbname=x", "host=h password=*** dbname=x"),
        ("postgresql://postgres@127.0.0.1:55432/x", "postgresql://postgres@127.0.0.1:55432/x"),
        ("postgresql://h:5432/db", "postgresql://h:5432/db"),
    ],
)
def test_redact_url_hides_every_form_of_password(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:p%zzsecret@127.0.0.1:1/x",
        "postgresql://app:pa sssecret@127.0.0.1:1/x",
        f"postgresql://app:hunter2secret@127.0.0.1:{free_port()}/x",
    ],
)
def test_connection_errors_never_quote_the_password(url):
    with pytest.raises(psycopg.Error) as raised:
        db.connect(url)
    assert "secret" not in str(raised.value)


@pytest.mark.parametrize(
    ("env", "per_run", "pool"),
    [
        ({}, None, "embeddings_local"),
        (
            {"EP_BACKFILL_PARTITIONS_PER_RUN": "6", "EP_EMBEDDING_PROVIDER": "ollama"},
            6,
            "embeddings_ollama",
        ),
    ],
)
def test_backfills_fan_out_when_asked_and_runs_share_the_provider_pool(env, per_run, pool):
    from embedding_pipeline.definitions import build_definitions

    embeddings = build_definitions(load_settings(env)).get_assets_def("message_embeddings")
    policy = embeddings.backfill_policy
    assert policy is not None
    assert policy.max_partitions_per_run == per_run
    assert embeddings.node_def.pools == {pool}
