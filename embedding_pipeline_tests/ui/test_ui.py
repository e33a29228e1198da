"""The Dagster UI as an operator uses it, in headless Chromium (Debian's `/usr/bin/chromium`
driven by Playwright) against a real `dagster dev`: webserver, daemon and run workers on
the session's embedded PostgreSQL, the local model, a temporary DAGSTER_HOME.

One walk-through, in file order (run the module, not one test alone): the lineage graph
shows the six assets; a materialization launched by a click succeeds; the checks tab
shows the checks with their metadata; rows set to NULL in SQL (an hour ago) make a check
run launched from the UI fail with the count and the ids; the backlog sensor (interval
shortened to `SENSOR_SECONDS`) repairs them with no click, and its run evaluates every
check (9 / 9); a row emptied and a row given up lose their vectors and the asset shows
its failed checks on the graph; new text brings them back; a backfill launched from the
asset page's dialog carries the project's tags.

Screenshots go to `EP_UI_SCREENSHOT_DIR` (`make screenshots` sets it to `docs/ui`),
otherwise to a temporary folder.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest

from embedding_pipeline.cli import write_local_instance_config
from embedding_pipeline.lib.embedders import LOCAL_MODEL_ID, LocalEmbedder
from embedding_pipeline.lib.store.pgserver import free_port
from embedding_pipeline.runner import materialize_all, run_embedding_checks
from embedding_pipeline.search import Searcher
from embedding_pipeline.search.api import engine_for
from embedding_pipeline.sensors import BACKLOG_SENSOR
from embedding_pipeline.settings import Settings
from embedding_pipeline_tests.support.database import create_database, ingest_small_chat
from embedding_pipeline_tests.support.paths import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SENSOR_SECONDS = 15
GROUPS = "expanded=global%40global%3Asources%2Cglobal%40global%3Aembeddings"
ASSETS = (
    "messages",
    "topics",
    "atoms",
    "message_embeddings",
    "topic_embeddings",
    "atom_embeddings",
)


def wait_for(what: str, probe: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def new_run(
    instance: dg.DagsterInstance, before: set[str], what: str, timeout: float, every: float = 0.5
) -> dg.DagsterRun:
    """The first run not among the ids `before`, once the UI has created it."""
    return wait_for(
        what,
        lambda: next((r for r in instance.get_runs() if r.run_id not in before), None),
        timeout,
        every,
    )


def finished_run(
    instance: dg.DagsterInstance, run_id: str, what: str, timeout: float
) -> dg.DagsterRun:
    """The run `run_id` once it has finished, whatever its status."""
    return wait_for(
        what,
        lambda: (r := instance.get_run_by_id(run_id)) is not None and r.is_finished and r,
        timeout,
    )


class DagsterDev:
    """`dagster dev` in its own process group on a free port (SIGTERM reaches it there)."""

    def __init__(self, home: Path, database_url: str) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "DATABASE_URL": database_url,
            "EP_BACKLOG_SENSOR_INTERVAL_SECONDS": str(SENSOR_SECONDS),
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.log = (home / "dagster-dev.log").open("w")
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster"),
                "dev",
                "-w",
                str(ROOT / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready(self) -> bool:
        assert self.process.poll() is None, (self.home / "dagster-dev.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(self.url + "/server_info", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("EP_UI_SCREENSHOT_DIR")
    folder = Path(target) if target else tmp_path_factory.mktemp("ui")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def world(pg_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The small chat ingested, embedded by one `materialize_all` run and checked by one
    `run_checks` run (as `make demo` does) on the instance `dagster dev` then serves."""
    url = create_database(pg_server, "ui_walkthrough")
    settings = ingest_small_chat(Settings(database_url=url))
    home = tmp_path_factory.mktemp("dagster_home")
    write_local_instance_config(home / "dagster.yaml")
    old = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "DATABASE_URL")}
    os.environ.update({"DAGSTER_HOME": str(home), "DATABASE_URL": url})
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            materialize_all(settings, instance=instance, trigger="demo")
            run_embedding_checks(settings, instance=instance, trigger="demo")
            dev = DagsterDev(home, url)
            try:
                wait_for("dagster dev to serve", dev.ready, 120)
                yield {"url": url, "dev": dev, "instance": instance, "settings": settings}
            finally:
                dev.stop()
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def page(world: dict[str, Any]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 760})
        context.set_default_timeout(30_000)
        tab = context.new_page()
        yield tab
        browser.close()


def open_page(page: Any, world: dict[str, Any], path: str) -> None:
    page.goto(world["dev"].url + path)
    page.wait_for_load_state("networkidle")


def shoot(page: Any, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"))


def null_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM messages WHERE embedding IS NULL").fetchone()
    assert row is not None
    return int(row[0])


def check_evaluations(instance: dg.DagsterInstance, run_id: str) -> list[Any]:
    """The asset check evaluations the run `run_id` recorded."""
    return [
        event.dagster_event.event_specific_data
        for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        if event.dagster_event is not None
    ]


def sensor_backlog(instance: dg.DagsterInstance) -> int:
    """The largest `backlog_missing` the backlog sensor reported for message embeddings."""
    records = instance.fetch_observations(dg.AssetKey("message_embeddings"), limit=50).records
    values = [
        int(metadata["backlog_missing"].value)
        for record in records
        if record.asset_observation is not None
        and (metadata := record.asset_observation.metadata).get("observed_by")
        == dg.MetadataValue.text(BACKLOG_SENSOR)
    ]
    return max(values, default=0)


def test_the_lineage_graph_shows_the_six_assets(world, page, shots):
    open_page(page, world, f"/asset-groups?{GROUPS}")
    for name in ASSETS:
        page.get_by_text(name, exact=True).first.wait_for()
    wait_for(
        "each embedding asset to show its nine checks passed",
        shows_on_the_graph(page, "9 / 9 Passed", 3),
        60,
        1,
    )
    shoot(page, shots, "lineage")


def test_a_source_table_is_an_external_asset_with_its_columns(world, page, shots):
    """`messages` is the application's table: an external asset (Materialize disabled)
    with its owner, its table name and the columns the pipeline reads and writes."""
    open_page(page, world, "/assets/messages")
    page.get_by_text("External Asset", exact=True).first.wait_for()
    page.get_by_text("embedding_source_hash", exact=True).first.wait_for()
    page.get_by_text("embedding-pipeline", exact=True).first.wait_for()
    shoot(page, shots, "source-table")
    assert page.locator("button", has_text=re.compile(r"^\s*Materialize")).first.is_disabled()


def test_the_checks_tab_shows_the_checks_with_their_metadata(world, page, shots):
    open_page(
        page, world, "/assets/message_embeddings?view=checks&checkDetail=no_missing_embeddings"
    )
    for name in ("no_missing_embeddings", "embedding_lag", "hnsw_index_used", "search_recall"):
        page.get_by_text(name, exact=True).first.wait_for()
    page.get_by_text("missing 0 of 4 rows").first.wait_for()
    page.get_by_text("sample_ids", exact=True).first.wait_for()
    shoot(page, shots, "checks")


def test_nulled_rows_fail_a_check_run_from_the_ui_with_count_and_ids(world, page, shots):
    """The check run is launched from the UI, then two vectors are set to NULL (as an hour
    ago: overdue, with no run at them) while its process starts: the backlog sensor leaves
    a table alone while a run covering it is queued or running, so the check sees the
    NULLs before the sensor repairs them."""
    instance = world["instance"]
    before = {r.run_id for r in instance.get_runs()}
    open_page(
        page, world, "/assets/message_embeddings?view=checks&checkDetail=no_missing_embeddings"
    )
    page.locator("button", has_text=re.compile(r"^\s*Execute\s*$")).first.click()
    run = new_run(instance, before, "the check run", 30, 0.1)
    with psycopg.connect(world["url"]) as conn:
        ids = [
            r[0]
            for r in conn.execute(
                "UPDATE messages SET embedding = NULL WHERE id IN "
                "(SELECT id FROM messages ORDER BY id LIMIT 2) RETURNING id"
            )
        ]
        conn.execute(
            "UPDATE messages SET embedding_pending_since = now() - interval '1 hour' "
            "WHERE id = ANY(%s)",
            (ids,),
        )
    finished_run(instance, run.run_id, "the check run to finish", 90)
    ids_text = ", ".join(str(i) for i in sorted(ids))
    said = (
        "2 rows have waited over 15 min for an embedding and no run is embedding them: "
        f"ids {ids_text}"
    )
    # the run launched from the UI failed the check on them, with the count and the ids ...
    [own] = [
        e
        for e in check_evaluations(instance, run.run_id)
        if e.check_name == "no_missing_embeddings"
    ]
    assert not own.passed and own.severity == dg.AssetCheckSeverity.ERROR
    assert own.description == said
    # ... and the UI shows it: on the run's page, which stays as it is (the asset's page shows
    # the latest evaluation, and the daemon's retry of this failed run or the backlog
    # sensor's repair can replace that at any moment)
    open_page(page, world, f"/runs/{run.run_id}")
    # its event log, filtered to its check results (the list renders only what is in view):
    # the check failed, two rows overdue, and their ids behind "Show JSON"
    page.get_by_placeholder("Filter").first.fill("type:ASSET_CHECK_EVALUATION")
    page.keyboard.press("Enter")
    page.get_by_text("Check no_missing_embeddings failed").first.wait_for()
    page.get_by_text("View full message").first.click()
    message = page.get_by_role("dialog").first
    overdue = message.locator("tr", has_text="missing_overdue").first
    assert overdue.inner_text().split() == ["missing_overdue", "2"]
    message.locator("tr", has_text="sample_ids").first.get_by_text("Show JSON").click()
    listed = page.get_by_role("dialog").last
    listed.get_by_text(str(max(ids))).first.wait_for()
    assert [int(i) for i in re.findall(r"\d+", listed.inner_text())] == sorted(ids)
    page.keyboard.press("Escape")
    shoot(page, shots, "check-failed")
    open_page(page, world, "/assets")
    page.get_by_text("message_embeddings", exact=True).first.wait_for(state="attached")
    shoot(page, shots, "catalog-failed")
    world["nulled"] = ids


def test_the_backlog_sensor_repairs_it_with_no_click(world, page, shots):
    instance = world["instance"]
    started = time.monotonic()
    wait_for("the sensor's report of the months", lambda: sensor_backlog(instance), 60)
    # the month as the sensor reports it, while its repair run starts (best effort)
    open_page(page, world, "/assets/message_embeddings?view=partitions&partition=2025-09-01")
    shoot(page, shots, "partition-backlog")
    wait_for("the NULL vectors to be embedded", lambda: null_count(world["url"]) == 0, 120, 1)
    world["repair_seconds"] = time.monotonic() - started
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"embedding_pipeline/trigger": "backlog"}))
    assert runs, "the repair was not a backlog-sensor run"
    repair = runs[0]
    assert repair.job_name == "embed_messages"
    assert repair.tags["dagster/sensor_name"] == BACKLOG_SENSOR
    world["repair_run_id"] = repair.run_id
    repaired = finished_run(instance, repair.run_id, "the repair run to finish", 60)
    assert repaired.status == dg.DagsterRunStatus.SUCCESS
    open_page(page, world, "/runs")
    page.get_by_text("embed_messages").first.wait_for()
    page.get_by_text("embedding_pipeline/trigger: backlog").first.wait_for()
    shoot(page, shots, "runs")


def shows_on_the_graph(page: Any, text: str, count: int) -> Callable[[], bool]:
    """A probe: the lineage graph shows `text` (a node's check badge) `count` times; the
    page is reloaded until it does."""

    def probe() -> bool:
        if page.get_by_text(text).count() == count:
            return True
        page.reload()
        page.wait_for_load_state("networkidle")
        return False

    return probe


def test_the_ui_shows_it_healthy_again(world, page, shots):
    open_page(
        page, world, "/assets/message_embeddings?view=checks&checkDetail=no_missing_embeddings"
    )
    # the repair run evaluated the check on its own work ...
    [own] = [
        e
        for e in check_evaluations(world["instance"], world["repair_run_id"])
        if e.check_name == "no_missing_embeddings"
    ]
    assert own.passed and own.description.startswith("none missing that this run")
    # ... and the page shows it passing: that evaluation, or a later one of the daemon's
    # retry of the failed check run, which can finish after the repair
    page.get_by_text(
        re.compile(r"none missing that this run|missing 0 of \d+ rows")
    ).first.wait_for()
    shoot(page, shots, "checks-repaired")
    # ... and every other check of the asset: no badge is left "not evaluated"
    open_page(page, world, f"/asset-groups?{GROUPS}")
    wait_for(
        "every check evaluated after the repair", shows_on_the_graph(page, "9 / 9 Passed", 3), 60, 1
    )
    month = "2025-09-01"
    observed = (
        world["instance"]
        .fetch_observations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey("message_embeddings"), asset_partitions=[month]
            ),
            limit=1,
        )
        .records[0]
        .asset_observation
    )
    assert observed is not None and observed.metadata["backlog_missing"].value == 0
    open_page(page, world, f"/assets/message_embeddings?view=partitions&partition={month}")
    page.get_by_text("Latest materialization").first.wait_for()
    shoot(page, shots, "partition")
    open_page(page, world, f"/asset-groups?{GROUPS}")
    page.get_by_text("message_embeddings", exact=True).first.wait_for()
    shoot(page, shots, "lineage-repaired")


def old_vector_found(settings: Settings, text: str, row_id: int) -> bool:
    """Whether vector or hybrid search for `text` returns the row `row_id`."""
    searcher = Searcher(settings, embedder=LocalEmbedder())
    engine = engine_for(settings.effective_database_url)
    with engine.connect() as conn:
        return any(
            int(hit.id) == row_id
            for mode in ("vector", "hybrid")
            for hit in searcher.search(conn, text, table="messages", k=4, mode=mode)
        )


def test_a_row_given_up_or_emptied_loses_its_vector_and_the_asset_looks_unhealthy(
    world, page, shots
):
    """One message's text is emptied by the application, another's was refused by the
    provider for good (its record in the errors table, as a run with a provider leaves
    it): the backlog sensor's run withdraws both old vectors, no search finds their old
    text, and the lineage graph shows the asset failing (no_failed_rows is an ERROR)."""
    settings = world["settings"]
    with psycopg.connect(world["url"]) as conn:
        (emptied, emptied_text), (refused, refused_text) = conn.execute(
            "SELECT id, content FROM messages ORDER BY id DESC LIMIT 2"
        ).fetchall()
        conn.execute("UPDATE messages SET content = '' WHERE id = %s", (emptied,))
        conn.execute("UPDATE messages SET content = 'refused text' WHERE id = %s", (refused,))
        conn.execute(
            "INSERT INTO embedding_errors (table_name, column_name, row_id, source_hash, "
            "model_id, error_class, message, attempts, next_attempt_at) SELECT 'messages', "
            "'embedding', id, embedding_source_hash, %s, 'HTTP 400', 'refused by the provider',"
            " 3, 'infinity' FROM messages WHERE id = %s",
            (LOCAL_MODEL_ID, refused),
        )
    world["changed"] = {emptied: emptied_text, refused: refused_text}
    assert old_vector_found(settings, refused_text, refused)
    wait_for(
        "the old vectors to be withdrawn",
        lambda: (
            not old_vector_found(settings, emptied_text, emptied)
            and not old_vector_found(settings, refused_text, refused)
        ),
        90,
        1,
    )
    open_page(page, world, f"/asset-groups?{GROUPS}")

    wait_for(
        "the asset to show its failed checks", shows_on_the_graph(page, "6 / 9 Passed", 1), 60, 1
    )
    shoot(page, shots, "lineage-given-up")
    open_page(page, world, "/assets/message_embeddings?view=checks&checkDetail=no_failed_rows")
    page.get_by_text("1 given up without a vector").first.wait_for()
    shoot(page, shots, "checks-given-up")


def test_new_text_brings_them_back_and_every_check_passes_again(world, page, shots):
    with psycopg.connect(world["url"]) as conn:
        for row_id, text in world["changed"].items():
            conn.execute("UPDATE messages SET content = %s WHERE id = %s", (text, row_id))
    wait_for("the rows to be embedded again", lambda: null_count(world["url"]) == 0, 90, 1)
    open_page(page, world, f"/asset-groups?{GROUPS}")
    wait_for("every check passed again", shows_on_the_graph(page, "9 / 9 Passed", 3), 60, 1)
    for row_id, text in world["changed"].items():
        assert old_vector_found(world["settings"], text, row_id)


def test_a_backfill_launched_from_the_ui_carries_the_projects_tags(world, page, shots):
    """Asset page -> Materialize -> all partitions -> Launch backfill: Dagster runs it as
    its own `__ASSET_JOB`; the embedding step tags the run as the project's runs are."""
    instance = world["instance"]
    before = {r.run_id for r in instance.get_runs()}
    open_page(page, world, "/assets/message_embeddings")
    page.locator("button", has_text=re.compile(r"^\s*Materialize")).first.click()
    dialog = page.locator("[role=dialog]")
    dialog.get_by_text("Show all partitions").click()
    dialog.get_by_role("button", name="All", exact=True).click()
    shoot(page, shots, "backfill-dialog")
    dialog.get_by_role("button", name="Launch backfill").click()
    run = new_run(instance, before, "the backfill's run", 60)
    done = finished_run(instance, run.run_id, "the backfill's run to finish", 120)
    assert done.status == dg.DagsterRunStatus.SUCCESS
    assert done.tags["dagster/backfill"]
    assert done.tags["embedding_pipeline/trigger"] == "backfill"
    assert done.tags["embedding_pipeline/tables"] == "messages"
    assert done.tags["dagster/retry_strategy"] == "ALL_STEPS"
    open_page(page, world, f"/runs/{done.run_id}")
    page.get_by_role("button", name="View tags and config").click()
    tags = page.locator("[role=dialog]")
    tags.get_by_text("embedding_pipeline/trigger: backfill").first.wait_for()
    tags.get_by_text("embedding_pipeline/tables: messages").first.wait_for()
    shoot(page, shots, "run-backfill-tags")


def test_a_materialization_launched_by_a_click_succeeds(world, page, shots):
    """Last: its run of the latest (empty) month would otherwise be the check results the
    checks tab shows."""
    instance = world["instance"]
    before = {r.run_id for r in instance.get_runs()}
    open_page(page, world, "/assets/message_embeddings")
    # a partitioned asset: the dialog picks the months (here the latest) for one run
    page.locator("button", has_text=re.compile(r"^\s*Materialize")).first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("button", name="Latest", exact=True).click()
    dialog.get_by_role("button", name="Launch 1 run").click()
    run = new_run(instance, before, "the clicked run", 30)
    finished = finished_run(instance, run.run_id, "the clicked run to finish", 90)
    assert finished.status == dg.DagsterRunStatus.SUCCESS
    open_page(page, world, f"/runs/{run.run_id}")
    page.get_by_text("Success").first.wait_for()
