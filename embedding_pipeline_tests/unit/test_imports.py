"""The package's import graph keeps its layers (docs/architecture.md).

Every import statement of every module counts, those inside functions and under
`TYPE_CHECKING` included: an import hidden in a function is still a dependency. The
rules: no circle between modules; nothing under `lib/`, `search/` or `testing/` imports
Dagster; nothing under `lib/` imports `embedding_pipeline.settings` (the domain types are in
`lib/store`); `testing/` (the stand-in services) imports nothing else of the package and
nothing else of the package imports it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from embedding_pipeline_tests.support.paths import ROOT as CHECKOUT

PACKAGE = "embedding_pipeline"
ROOT = CHECKOUT / PACKAGE
#: Pure code: no Dagster import anywhere below these.
NO_DAGSTER = ("embedding_pipeline.lib", "embedding_pipeline.search", "embedding_pipeline.testing")
#: Stand-ins for the tests and the benchmarks: apart from the product, both ways.
STANDALONE = "embedding_pipeline.testing"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported(module: str, path: Path, known: Iterable[str]) -> set[str]:
    """Every module `module` imports, anywhere in its body: a `from a import b` names the
    module `a.b` when there is one, else `a`."""
    known = set(known)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the modules of the package it imports."""
    mods = modules()
    return {
        name: {m for m in imported(name, path, mods) if m in mods and m != name}
        for name, path in mods.items()
    }


def circles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": ["b"], "b": ["c"], "c": []}, []),
        ({"a": ["b"], "b": ["a"]}, [["a", "b"]]),
        ({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}, [["a", "b", "c"]]),
        ({"a": ["b"], "b": ["a"], "c": ["d"], "d": ["c"]}, [["a", "b"], ["c", "d"]]),
    ],
)
def test_circles_are_found(graph, expected):
    assert sorted(circles(graph)) == expected


def test_imports_inside_functions_are_edges(tmp_path):
    """A circle hidden by an import inside a function is still found."""
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from p.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from p import a\n    return a\n")
    known = {"p", "p.a", "p.b"}
    assert imported("p.b", pkg / "b.py", known) == {"p.a"}
    graph = {m: imported(m, pkg / f"{m.split('.')[-1]}.py", known) - {m} for m in ("p.a", "p.b")}
    assert circles(graph) == [["p.a", "p.b"]]


def test_the_walk_sees_the_whole_package():
    graph = import_graph()
    assert {"embedding_pipeline.definitions", "embedding_pipeline.lib.engine.run"} <= set(graph)
    # an import inside a function (the CLI imports the runner when a command needs it)
    assert "embedding_pipeline.runner" in graph["embedding_pipeline.cli.runs"]


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_lib_and_search_import_no_dagster():
    mods = modules()
    offenders = sorted(
        f"{name} imports {imp}"
        for name, path in mods.items()
        if name.startswith(NO_DAGSTER)
        for imp in imported(name, path, mods)
        if imp.split(".")[0] == "dagster" or imp.startswith("dagster_")
    )
    assert offenders == []


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


def test_lib_does_not_import_the_settings_and_testing_stands_apart():
    graph = import_graph()
    offenders = sorted(
        f"{name} imports {imp}"
        for name, imps in graph.items()
        for imp in imps
        if (in_package(name, "embedding_pipeline.lib") and in_package(imp, PACKAGE + ".settings"))
        or in_package(name, STANDALONE) != in_package(imp, STANDALONE)
    )
    assert offenders == []


#: What each `lib/` package may import of `lib/`: the order the data travels in (the
#: store at the bottom; docs/architecture.md).
LIB_LAYERS = {
    "store": set(),
    "embedders": set(),
    "sources": {"store"},
    "engine": {"store", "embedders"},
    "quality": {"store", "embedders", "engine"},
}


def test_lib_packages_import_only_the_layers_below():
    graph = import_graph()

    def lib_package(module: str) -> str | None:
        parts = module.split(".")
        return parts[2] if len(parts) > 2 and parts[1] == "lib" else None

    offenders = sorted(
        f"{name} imports {imp}"
        for name, imps in graph.items()
        if (own := lib_package(name)) is not None
        for imp in imps
        if (other := lib_package(imp)) is not None
        and other != own
        and other not in LIB_LAYERS.get(own, set())
    )
    assert offenders == []
    assert {
        p.name for p in (ROOT / "lib").iterdir() if p.is_dir() and p.name != "__pycache__"
    } == set(LIB_LAYERS)


#: One module a family of checks (docs/architecture.md): each imports the shared
#: `checks.base` and no other family; `checks.builder` lists them all.
CHECK_FAMILIES = ("completeness", "shape", "index", "search")


def test_check_families_import_only_the_shared_base():
    graph = import_graph()
    families = [f"{PACKAGE}.checks.{family}" for family in CHECK_FAMILIES]
    assert set(families) <= set(graph)
    offenders = sorted(
        f"{name} imports {imp}"
        for name in families
        for imp in graph[name]
        if imp.startswith(f"{PACKAGE}.checks") and imp != f"{PACKAGE}.checks.base"
    )
    assert offenders == []
