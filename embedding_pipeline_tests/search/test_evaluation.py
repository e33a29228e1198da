"""Search quality measured: `embedding-pipeline eval` on a tiny labelled set with known
answers, malformed question files, the JSON shape, the metrics themselves; an A/B of two
models before a switch (`eval --compare`, `model switch --promote --require-not-worse`)
through the CLI against a real server speaking Ollama's protocol; the `search_eval` check."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pytest

from embedding_pipeline import cli
from embedding_pipeline.checks import EVAL, PER_RUN_CHECKS
from embedding_pipeline.definitions import build_definitions
from embedding_pipeline.lib.engine.model_switch import load_candidate, shadow_spec
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.catalog import vector_column_dimension
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.search.evaluation import Figures, score
from embedding_pipeline.settings import CheckSettings, Settings
from embedding_pipeline.testing.fault_server import FaultServer
from embedding_pipeline_tests.support.database import embed_small_chat

LOCAL = "local:all-MiniLM-L6-v2-int8"
FAKE = "ollama:all-minilm"
#: Over the small test chat: three atoms (a-1 backup disk full, a-2 backup volume
#: enlarged, a-3 Friday lunch), two topics, four messages with text.
TINY = {
    "questions": [
        {"question": "backup disk full", "table": "atoms", "relevant": ["a-1"]},
        {"question": "what do we eat on Friday", "table": "atoms", "relevant": ["a-3"]},
        {"question": "how was the backup fixed", "table": "atoms", "relevant": ["a-2", "a-1"]},
        {"question": "pizza", "table": "topics", "relevant": ["social"]},
        {"question": "disk full error", "table": "messages", "relevant": [2]},
    ]
}


@pytest.fixture(scope="module")
def small_embedded(database_url: str) -> Settings:
    """The small chat embedded with the local model."""
    return embed_small_chat(Settings(database_url=database_url))


def write(tmp_path: Path, data: object, name: str = "questions.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def use(monkeypatch: pytest.MonkeyPatch, settings: Settings, tmp_path: Path, **env: str) -> None:
    monkeypatch.setenv("DATABASE_URL", settings.effective_database_url)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    ("hits", "relevant", "k", "expected"),
    [
        ([1, 2, 3], {1}, 5, (1.0, 1.0, 1.0)),
        ([9, 1, 2], {1, 2}, 5, (1.0, 0.5, (1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3)))),
        ([9, 1, 2], {1, 2}, 1, (0.0, 0.5, (1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3)))),
        ([9, 8, 7], {1}, 5, (0.0, 0.0, 0.0)),
        # seven relevant rows: recall@5 is complete with five of them
        ([1, 2, 3, 4, 5], {1, 2, 3, 4, 5, 6, 7}, 5, (1.0, 1.0, None)),
        ([5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 1], {1}, 5, (0.0, 0.0, 0.0)),  # rank 11: too far
    ],
)
def test_the_figures_of_one_ranked_list(hits, relevant, k, expected):
    figures = score(hits, relevant, k)
    assert figures.recall == pytest.approx(expected[0])
    assert figures.mrr == pytest.approx(expected[1])
    if expected[2] is not None:
        assert figures.ndcg == pytest.approx(expected[2])
    assert Figures.mean([Figures(1, 0.5, 0), Figures(0, 0, 1)]) == Figures(0.5, 0.25, 0.5)


def test_eval_on_a_tiny_labelled_set(small_embedded, tmp_path, monkeypatch, capsys):
    use(monkeypatch, small_embedded, tmp_path)
    path = write(tmp_path, TINY)

    assert cli.main(["eval", str(path), "-k", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"k", "questions", "model", "modes", "tables"}
    assert (result["k"], result["questions"], result["model"]) == (1, 5, LOCAL)
    assert set(result["modes"]) == {"vector", "text", "hybrid"}
    assert all(set(f) == {"recall", "mrr", "ndcg"} for f in result["modes"].values())
    assert list(result["tables"]) == ["messages", "topics", "atoms"]
    assert [t["questions"] for t in result["tables"].values()] == [1, 1, 3]
    # every answer is known: the vector ranking puts the relevant message of "disk full
    # error" second (recall@1 0, reciprocal rank 1/2, nDCG 1/log2(3)); the text ranking
    # finds it first but nothing for "pizza" (no topic holds the word); hybrid has both
    assert result["modes"] == {
        "vector": {"recall": 0.8, "mrr": 0.9, "ndcg": round((4 + 1 / math.log2(3)) / 5, 4)},
        "text": {"recall": 0.8, "mrr": 0.8, "ndcg": 0.8},
        "hybrid": {"recall": 1.0, "mrr": 1.0, "ndcg": 1.0},
    }
    assert result["tables"]["messages"]["modes"]["vector"] == {
        "recall": 0.0,
        "mrr": 0.5,
        "ndcg": round(1 / math.log2(3), 4),
    }
    assert result["tables"]["topics"]["modes"]["text"] == {"recall": 0.0, "mrr": 0.0, "ndcg": 0.0}
    assert result["tables"]["atoms"]["modes"]["vector"] == {"recall": 1.0, "mrr": 1.0, "ndcg": 1.0}

    assert cli.main(["eval", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: 5 questions\n")
    assert LOCAL in out
    assert [line.split()[:3] for line in out.splitlines() if "overall" in line] == [
        ["vector", "overall", "5"],
        ["text", "overall", "5"],
        ["hybrid", "overall", "5"],
    ]


@pytest.mark.parametrize(
    ("content", "position", "reason"),
    [
        ("{", "line 1 column 2", "invalid JSON"),
        ("[]", "", "expected an object, got a list"),
        ({"questions": []}, "questions", "is empty"),
        ({"qs": []}, "questions", "missing"),
        ({"questions": [{"question": "x", "table": "atoms"}]}, "questions[0].relevant", "list"),
        (
            {
                "questions": [
                    TINY["questions"][0],
                    {"question": "x", "table": "rows", "relevant": [1]},
                ]
            },
            "questions[1].table",
            "expected one of messages, topics, atoms, got 'rows'",
        ),
        (
            {"questions": [{"question": " ", "table": "atoms", "relevant": ["a-1"]}]},
            "questions[0].question",
            "non-empty",
        ),
        (
            {"questions": [{"question": "x", "table": "messages", "relevant": ["2"]}]},
            "questions[0].relevant[0]",
            "integer id",
        ),
        (
            {"questions": [{"question": "x", "table": "atoms", "relevant": [3]}]},
            "questions[0].relevant[0]",
            "atom key",
        ),
        (
            {"questions": [{"question": "x", "table": "atoms", "relevant": ["a-1", "a-1"]}]},
            "questions[0].relevant[1]",
            "listed twice",
        ),
        (
            {"questions": [{"question": "x", "table": "atoms", "relevant": ["a-1"], "k": 3}]},
            "questions[0].k",
            "unknown field",
        ),
        # well-formed, but the database holds no such rows
        (
            {
                "questions": [
                    TINY["questions"][0],
                    {"question": "x", "table": "atoms", "relevant": ["a-1", "nope"]},
                ]
            },
            "questions[1].relevant",
            "not in the atoms table: 'nope'",
        ),
    ],
)
def test_a_malformed_questions_file_is_one_line(
    small_embedded, tmp_path, monkeypatch, capsys, content, position, reason
):
    use(monkeypatch, small_embedded, tmp_path)
    path = write(tmp_path, content)
    assert cli.main(["eval", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {path}: {position}")
    assert reason in captured.err and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err


def test_eval_of_a_missing_file(small_embedded, tmp_path, monkeypatch, capsys):
    use(monkeypatch, small_embedded, tmp_path)
    assert cli.main(["eval", str(tmp_path / "nothing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'nothing.json'}: file: cannot be read")


def test_a_b_before_a_switch(
    fresh_database_url, fault_server: FaultServer, tmp_path, monkeypatch, capsys
):
    """Live: the local model. Candidate: a model over Ollama's protocol whose vectors are
    hashes of the text (no meaning): `eval --compare` scores both through the same search
    code, `--require-not-worse` refuses it and swaps nothing; the reverse switch passes."""
    settings = embed_small_chat(Settings(database_url=fresh_database_url))
    use(monkeypatch, settings, tmp_path, OLLAMA_HOST=fault_server.url)
    questions = write(tmp_path, TINY)
    switch = ["model", "switch", "--provider", "ollama", "--model", "all-minilm"]

    assert cli.main(["eval", str(questions), "--compare"]) == 2
    assert "no model switch is waiting" in capsys.readouterr().err

    assert cli.main([*switch, "--no-promote"]) == 0
    assert "eval QUESTIONS.json --compare" in capsys.readouterr().out
    with db.connection(fresh_database_url, vector=False) as conn:
        candidate = load_candidate(conn)
        assert candidate is not None and candidate.model_id == FAKE
        for spec in settings.tables.values():
            assert vector_column_dimension(conn, shadow_spec(spec)) == 384
    assert models(settings) == {LOCAL}

    assert cli.main(["eval", str(questions), "--compare"]) == 0
    out = capsys.readouterr().out
    assert LOCAL in out and FAKE in out
    assert cli.main(["eval", str(questions), "--compare", "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert set(both) == {"k", "questions", "current", "candidate"}
    assert (both["current"]["model"], both["candidate"]["model"]) == (LOCAL, FAKE)
    # text search does not involve the model: the same figures for both
    assert both["current"]["modes"]["text"] == both["candidate"]["modes"]["text"]
    assert both["candidate"]["modes"]["vector"]["mrr"] < both["current"]["modes"]["vector"]["mrr"]

    fault_server.reset_counts()
    promote = ["model", "switch", "--promote", "--require-not-worse", "--questions", str(questions)]
    assert cli.main(promote) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: {FAKE} is worse than {LOCAL} on {questions} (5 questions): vector"
    )
    assert "Nothing was swapped" in err and err.count("\n") == 1
    assert models(settings) == {LOCAL}
    assert fault_server.snapshot().received  # the candidate embedded the questions

    assert cli.main(["model", "switch", "--promote"]) == 0
    assert "EP_EMBEDDING_PROVIDER=ollama EP_EMBEDDING_MODEL=all-minilm" in capsys.readouterr().out
    assert models(settings) == {FAKE}
    with db.connection(fresh_database_url, vector=False) as conn:
        assert load_candidate(conn) is None

    # configured for the fake model now; the local model is the better candidate
    monkeypatch.setenv("EP_EMBEDDING_PROVIDER", "ollama")
    monkeypatch.setenv("EP_EMBEDDING_MODEL", "all-minilm")
    back = ["model", "switch", "--provider", "local", "--require-not-worse"]
    assert cli.main([*back, "--questions", str(questions)]) == 0
    out = capsys.readouterr().out
    assert f"{LOCAL} is not worse than {FAKE}" in out
    assert models(settings) == {LOCAL}


def models(settings: Settings) -> set[str]:
    with db.connection(settings.effective_database_url, vector=False) as conn:
        return {
            str(r[0])
            for spec in settings.tables.values()
            for r in conn.execute(
                f"SELECT DISTINCT embedding_model FROM {spec.table}"  # noqa: S608
            ).fetchall()
        }


def test_the_search_eval_check(small_embedded, tmp_path, instance):
    """Defined only with EP_EVAL_QUESTIONS, and not among the per-run checks; passes at or
    above the floors, warns below them, fails when the file names rows the database lacks."""
    assert EVAL not in check_names(build_definitions(small_embedded))
    assert EVAL not in PER_RUN_CHECKS
    path = write(tmp_path, TINY)

    def run(checks: CheckSettings, asset: str = "atom_embeddings") -> dg.AssetCheckEvaluation:
        resources = {
            "postgres": PostgresResource(database_url=small_embedded.effective_database_url),
            "embedder": EmbedderResource(),
        }
        defs = build_definitions(replace(small_embedded, checks=checks), resources)
        assert EVAL in check_names(defs)
        key = dg.AssetCheckKey(dg.AssetKey(asset), EVAL)
        result = dg.materialize(
            [
                defs.get_assets_def(asset),
                *[c for c in defs.asset_checks or [] if key in c.check_keys],
            ],
            selection=dg.AssetSelection.checks(key),
            resources=defs.resources,
            instance=instance,
            raise_on_error=False,
        )
        [evaluation] = result.get_asset_check_evaluations()
        return evaluation

    passed = run(CheckSettings(eval_questions=path))
    assert passed.passed
    meta = {k: v.value for k, v in passed.metadata.items()}
    assert (meta["questions"], meta["model"]) == (3, LOCAL)
    assert meta["hybrid_recall"] == 1.0 and meta["vector_mrr"] == 1.0

    floors = CheckSettings(eval_questions=path, eval_min_recall=1.0, eval_min_mrr=1.0)
    assert run(floors).passed  # the atoms: every figure 1.0, not below 1.0
    below = run(floors, "message_embeddings")  # "disk full error": vector rank 2
    assert not below.passed and below.severity == dg.AssetCheckSeverity.WARN
    assert (below.description or "").startswith("below the floor: vector MRR 0.500 < 1; ")
    assert run(floors, "topic_embeddings").passed  # "pizza": text finds nothing, not floored

    bad = write(
        tmp_path,
        {"questions": [{"question": "x", "table": "atoms", "relevant": ["zz"]}]},
        "bad.json",
    )
    failed = run(CheckSettings(eval_questions=bad))
    assert not failed.passed and failed.severity == dg.AssetCheckSeverity.ERROR
    assert "not in the atoms table: 'zz'" in (failed.description or "")


def check_names(defs: dg.Definitions) -> set[str]:
    return {k.name for c in defs.asset_checks or [] for k in c.check_keys}
