"""The production deployment (docker-compose.yml, Dockerfile, deploy/) checked without Docker.

The files parse; compose names only settings the code really reads (found in the source,
not in a list kept here); no secret is written down; the code-location command loads the
definitions; webserver and daemon find that server; and the Dagster instance of
`deploy/dagster.yaml` stores a real run in a real PostgreSQL through dagster-postgres with
the SQLAlchemy this project pins.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import dagster as dg
import pytest
import yaml
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.instance.config import PoolGranularity, dagster_instance_config
from dagster._core.launcher import DefaultRunLauncher
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.scheduler.instigation import TickStatus
from dagster._core.workspace.config_schema import ensure_workspace_config
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from embedding_pipeline import cli, definitions, settings
from embedding_pipeline.cli import LOCAL_INSTANCE_CONFIG, write_local_instance_config
from embedding_pipeline.definitions import build_definitions
from embedding_pipeline.lib.embedders import PROVIDERS
from embedding_pipeline.lib.store.pgserver import EmbeddedPostgres
from embedding_pipeline.settings import api_keys, load_settings
from embedding_pipeline_tests.support.database import create_database
from embedding_pipeline_tests.support.paths import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
DOC = ROOT / "docs" / "deployment.md"
DAGSTER_SERVICES = ("code-location", "webserver", "daemon")
PIPELINE_VARIABLE = re.compile(r"^(EP_\w+|DATABASE_URL|OLLAMA_\w+|OPENAI_\w+)$")
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^${}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _environment(service: Mapping[str, Any]) -> dict[str, str | None]:
    """A service's `environment`, in either compose syntax (a list or a mapping)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return {k: v for k, _, v in (item.partition("=") for item in env)}
    return {k: None if v is None else str(v) for k, v in env.items()}


def _interpolate(value: str, host_env: Mapping[str, str] | None = None) -> str:
    """What compose makes of `${VAR}` / `${VAR:-default}` (nested too) given `host_env`."""
    host_env = host_env or {}
    previous = None
    while previous != value:
        previous = value
        value = _INTERPOLATION.sub(lambda m: host_env.get(m[1]) or m[2] or "", value)
    return value


def _container_env(service: Mapping[str, Any]) -> dict[str, str]:
    """The environment a container gets when the host exports none of the variables."""
    return {k: _interpolate(v) for k, v in _environment(service).items() if v is not None}


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


class _RecordingEnv(Mapping[str, str]):
    """An empty environment that remembers every name it is asked for."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.names.add(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.names.add(key)
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _variables_the_code_reads() -> set[str]:
    """Names `load_settings()` asks for, plus every upper-case string literal of the
    settings package and definitions.py (env reads outside the mapping, `dg.EnvVar("...")`)."""
    recorder = _RecordingEnv()
    load_settings(recorder)
    names = set(recorder.names)
    sources = [*Path(settings.__file__ or "").parent.glob("*.py"), Path(definitions.__file__ or "")]
    for source in sources:
        tree = ast.parse(source.read_text())
        names |= {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+", node.value)
        }
    return names


def _env_sources(config: Any) -> set[str]:
    """Every `env: NAME` in a Dagster config document."""
    if isinstance(config, dict):
        found = {config["env"]} if set(config) == {"env"} else set()
        for value in config.values():
            found |= _env_sources(value)
        return found
    if isinstance(config, list):
        return set().union(*map(_env_sources, config))
    return set()


def test_compose_defines_the_six_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {
        "postgres",
        "ollama",
        "code-location",
        "webserver",
        "daemon",
        "search",
    }
    assert services["postgres"]["image"].startswith("pgvector/pgvector:pg")
    assert services["ollama"]["image"].split(":")[0] == "ollama/ollama"
    for name in DAGSTER_SERVICES:
        assert services[name]["build"] == "."
        assert services[name]["image"] == services["code-location"]["image"]
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["webserver"]["command"][0] == "dagster-webserver"
    assert services["webserver"]["command"][-2:] == ["-w", "/opt/dagster/workspace.yaml"]
    assert _option(services["webserver"]["command"], "-p") == "3000"
    assert any(str(port).endswith(":3000") for port in services["webserver"]["ports"])
    assert services["daemon"]["command"][:2] == ["dagster-daemon", "run"]
    assert set(compose["volumes"]) >= {"pgdata", "ollama", "dagster-storage"}


def test_compose_names_only_variables_the_code_reads(compose: dict[str, Any]) -> None:
    named = {name for service in compose["services"].values() for name in _environment(service)}
    named |= {m[1] for m in _INTERPOLATION.finditer(COMPOSE_FILE.read_text())}
    pipeline_variables = {name for name in named if PIPELINE_VARIABLE.match(name)}
    read = _variables_the_code_reads()

    assert pipeline_variables >= {
        "DATABASE_URL",
        "EP_EMBEDDING_PROVIDER",
        "OLLAMA_HOST",
        "OPENAI_API_KEY",
    }
    assert pipeline_variables - read == set(), "named in compose, read nowhere in the code"


def test_deployment_doc_matches_compose_and_code(compose: dict[str, Any]) -> None:
    """docs/deployment.md documents every variable compose passes, and no variable that
    neither the code nor deploy/dagster.yaml reads."""
    doc = DOC.read_text()
    documented = set(
        re.findall(r"\b(?:EP|OPENAI|OLLAMA|DATABASE|DAGSTER_PG)_[A-Z0-9_]*[A-Z0-9]", doc)
    )
    instance_variables = _env_sources(yaml.safe_load((DEPLOY / "dagster.yaml").read_text()))
    unknown = documented - _variables_the_code_reads() - instance_variables
    assert unknown == set(), "documented, but read nowhere"
    passed = set(_environment(compose["services"]["code-location"]))
    passed |= set(_environment(compose["services"]["search"]))
    assert passed - documented == set(), "passed by compose, but not documented"


def test_code_location_environment_is_valid_for_the_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = _container_env(services["code-location"])
    assert env["EP_EMBEDDING_PROVIDER"] == "local"
    assert env["OLLAMA_HOST"] == "http://ollama:11434"

    configured = load_settings(env)
    assert configured.embedder.provider in PROVIDERS
    assert configured.embedder.ollama_host == "http://ollama:11434"
    url = urlsplit(configured.database_url or "")
    postgres_env = _container_env(services["postgres"])
    assert url.hostname == "postgres"
    assert url.path.lstrip("/") == postgres_env["POSTGRES_DB"]
    assert (url.username, url.password) == (
        postgres_env["POSTGRES_USER"],
        postgres_env["POSTGRES_PASSWORD"],
    )
    build_definitions(configured)


def test_the_search_service_serves_the_code_locations_model_with_keys(
    compose: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """`embedding-pipeline serve --host 0.0.0.0` from the same image, on the database and
    with the model settings of the code location (queries and rows embedded by one model),
    its keys passed through from the host, its port published and health-checked; without
    keys it refuses to start."""
    services = compose["services"]
    search, code = services["search"], services["code-location"]
    assert search["build"] == "." and search["image"] == code["image"]
    command = search["command"]
    assert command[:2] == ["embedding-pipeline", "serve"]
    assert _option(command, "--host") == "0.0.0.0"
    port = _option(command, "--port")
    assert f"127.0.0.1:{port}:{port}" in search["ports"]
    assert search["depends_on"]["postgres"]["condition"] == "service_healthy"
    health = " ".join(search["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/healthz" in health

    shared = (
        "DATABASE_URL",
        "EP_EMBEDDING_PROVIDER",
        "EP_EMBEDDING_MODEL",
        "EP_EMBEDDING_DIMENSIONS",
        "OLLAMA_HOST",
        "OPENAI_BASE_URL",
        "OPENAI_API_KEY",
        "EP_SEARCH_TEXT_LANGUAGE",
    )
    for name in shared:
        assert _environment(search).get(name, "missing") == _environment(code).get(name), name
    assert _environment(search)["EP_API_KEYS"] is None, "keys pass through, never written"

    env = _container_env(search)
    configured = load_settings(env)
    assert configured.embedder == load_settings(_container_env(code)).embedder
    assert api_keys({**env, "EP_API_KEYS": "k1,k2"}) == ("k1", "k2")
    for name in list(os.environ):
        if PIPELINE_VARIABLE.match(name):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert cli.main(command[1:]) == 2
    assert "EP_API_KEYS is not set" in capsys.readouterr().err


def test_secrets_are_not_written_in_compose(compose: dict[str, Any]) -> None:
    text = COMPOSE_FILE.read_text()
    for name, service in compose["services"].items():
        env = _environment(service)
        if "OPENAI_API_KEY" in env:
            assert env["OPENAI_API_KEY"] is None, f"{name}: OPENAI_API_KEY must pass through"
    assert "OPENAI_API_KEY" in _environment(compose["services"]["code-location"])
    assert not re.search(r"\$\{OPENAI_API_KEY:?-", text)
    assert not re.search(r"\bsk-[A-Za-z0-9_-]{8,}", text)

    defaults = {m[2] for m in _INTERPOLATION.finditer(text) if m[1] == "POSTGRES_PASSWORD"}
    assert len(defaults) == 1 and "dev" in defaults.pop(), "one marked dev-only default"
    for service in compose["services"].values():
        for name, value in _environment(service).items():
            if "PASSWORD" in name:
                assert value is not None and value.startswith("${POSTGRES_PASSWORD"), name


def test_code_location_command_loads_the_definitions(
    compose: dict[str, Any], pyproject: dict[str, Any]
) -> None:
    command = compose["services"]["code-location"]["command"]
    assert command[:3] == ["dagster", "code-server", "start"]
    assert _option(command, "-h") == "0.0.0.0"
    module_name = _option(command, "-m")
    assert module_name == pyproject["tool"]["dagster"]["module_name"]

    module = importlib.import_module(module_name)
    assert isinstance(module.defs, dg.Definitions)
    dg.Definitions.validate_loadable(module.defs)


def test_workspace_loads_the_code_location_over_grpc(
    compose: dict[str, Any], pyproject: dict[str, Any]
) -> None:
    path = DEPLOY / "workspace.yaml"
    workspace = ensure_workspace_config(yaml.safe_load(path.read_text()), str(path))
    (entry,) = cast("list[dict[str, Any]]", workspace["load_from"])
    server = entry["grpc_server"]

    code_location = compose["services"]["code-location"]
    assert server["host"] == "code-location" and server["host"] in compose["services"]
    assert str(server["port"]) == _option(code_location["command"], "-p")
    assert server["location_name"] == pyproject["tool"]["dagster"]["code_location_name"]
    for name in ("webserver", "daemon"):
        assert _option(compose["services"][name]["command"], "-w") == "/opt/dagster/workspace.yaml"


def test_every_dagster_service_gets_the_instance_settings(compose: dict[str, Any]) -> None:
    instance_config = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    needed = _env_sources(instance_config)
    assert needed >= {"DAGSTER_PG_HOST", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"}
    postgres_db = instance_config["storage"]["postgres"]["postgres_db"]
    assert postgres_db["scheme"] == "postgresql+psycopg2"

    services = compose["services"]
    postgres_env = _container_env(services["postgres"])
    created = set(
        re.findall(
            r"CREATE DATABASE (\w+)",
            "".join(p.read_text() for p in DEPLOY.glob("postgres-init/*.sql")),
        )
    )
    assert (
        "./deploy/postgres-init:/docker-entrypoint-initdb.d:ro" in services["postgres"]["volumes"]
    )
    for name in DAGSTER_SERVICES:
        env = _container_env(services[name])
        assert needed <= set(env), f"{name} lacks {needed - set(env)}"
        assert env["DAGSTER_PG_HOST"] == "postgres"
        assert env["DAGSTER_PG_DB"] in created
        assert env["DAGSTER_PG_PASSWORD"] == postgres_env["POSTGRES_PASSWORD"]
        assert "dagster-storage:/opt/dagster/dagster_home/storage" in services[name]["volumes"]


def test_dockerfile_installs_the_project_and_the_instance() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    # the instance in deploy/dagster.yaml needs dagster-postgres: the production extra
    assert re.search(r'^\s*&& pip install "\.\[production,openai\]"', text, re.M)
    assert re.search(r"pip install --no-deps --force-reinstall \.$", text, re.M)
    assert re.search(r"DAGSTER_HOME=/opt/dagster/dagster_home\b", text)
    assert re.search(
        r"^COPY (--\S+ )*deploy/dagster\.yaml \$DAGSTER_HOME/dagster\.yaml$", text, re.M
    )
    assert re.search(
        r"^COPY (--\S+ )*deploy/workspace\.yaml /opt/dagster/workspace\.yaml$", text, re.M
    )

    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for source in re.findall(r"^COPY (?:--\S+ )*(\S+) \S+$", text, re.M):
        assert source.split("/")[0] in allowed, f"{source} is outside the build context"
        assert (ROOT / source).exists(), source


def test_dagster_yaml_runs_on_real_postgres(
    pg_server: EmbeddedPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DagsterInstance from deploy/dagster.yaml against a real server: migrations, a stored
    run and its events (NOTIFY included) through psycopg2, the queue and launcher."""
    url = urlsplit(create_database(pg_server, "dagster_deployment"))
    monkeypatch.setenv("DAGSTER_PG_HOST", url.hostname or "")
    monkeypatch.setenv("DAGSTER_PG_PORT", str(url.port))
    monkeypatch.setenv("DAGSTER_PG_USER", url.username or "")
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")
    monkeypatch.setenv("DAGSTER_PG_DB", url.path.lstrip("/"))
    shutil.copy(DEPLOY / "dagster.yaml", tmp_path / "dagster.yaml")
    dagster_instance_config(str(tmp_path))

    @dg.asset
    def deployment_probe() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"ok": True})

    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert isinstance(instance.run_launcher, DefaultRunLauncher)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        queue = instance.get_concurrency_config().run_queue_config
        assert queue is not None and queue.max_concurrent_runs > 0
        assert any(limit["key"] == "dagster/backfill" for limit in queue.tag_concurrency_limits)
        assert_retries_and_pools(instance, default_limit=3)

        result = dg.materialize([deployment_probe], instance=instance)
        assert result.success
        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        event = instance.get_latest_materialization_event(dg.AssetKey("deployment_probe"))
        assert event is not None and event.run_id == result.run_id


def assert_retries_and_pools(instance: dg.DagsterInstance, *, default_limit: int) -> None:
    """Failed runs are retried by the daemon, and the provider pools hold `default_limit`
    runs at once each, counted per run (a run of three embedding assets is one); the
    queue looks every second; sensors' skipped ticks are kept one day, the others as
    Dagster keeps them."""
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 3
    assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
    assert instance.run_coordinator.dequeue_interval_seconds == 1
    retention = instance.get_tick_retention_settings(InstigatorType.SENSOR)
    assert retention[TickStatus.SKIPPED] == 1 and retention[TickStatus.SUCCESS] == -1
    assert instance.run_retries_retry_on_asset_or_op_failure  # a provider outage is a step failure
    pools = instance.get_concurrency_config().pool_config
    assert pools.default_pool_limit == default_limit
    assert pools.pool_granularity == PoolGranularity.RUN


def test_the_local_instance_config_retries_runs_and_limits_pools(tmp_path: Path) -> None:
    """What `embedding-pipeline` and `make dev` write into .dagster_home/dagster.yaml."""
    (tmp_path / "dagster.yaml").write_text(LOCAL_INSTANCE_CONFIG)
    dagster_instance_config(str(tmp_path))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert_retries_and_pools(instance, default_limit=2)


def test_an_older_local_instance_config_gets_what_it_lacks_and_keeps_the_rest(
    tmp_path: Path,
) -> None:
    """A dagster.yaml an older checkout wrote (telemetry only) gets the pop-up, run queue
    and tick retention settings; one that sets its own run coordinator keeps it."""
    old = tmp_path / "old" / "dagster.yaml"
    old.parent.mkdir()
    old.write_text("telemetry:\n  enabled: false\n")
    write_local_instance_config(old)
    with dg.DagsterInstance.from_config(str(old.parent)) as instance:
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert instance.run_coordinator.dequeue_interval_seconds == 1
    written = yaml.safe_load(old.read_text())
    assert written["nux"] == {"enabled": False}
    assert written["retention"] == {"sensor": {"purge_after_days": {"skipped": 1}}}
    own = tmp_path / "own" / "dagster.yaml"
    own.parent.mkdir()
    mine = (
        "run_coordinator:\n  module: dagster._core.run_coordinator\n"
        "  class: DefaultRunCoordinator\n"
    )
    own.write_text(mine)
    write_local_instance_config(own)
    assert own.read_text().startswith(mine)
    assert own.read_text().count("run_coordinator:") == 1
