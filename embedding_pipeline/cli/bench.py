"""`bench`: the scripts of the checkout's `benchmarks/` folder, listed or run
(docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

from embedding_pipeline.cli.common import CliError
from embedding_pipeline.settings import Settings

#: The benchmarks of the source checkout this package runs from; an installed wheel has none.
BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def benchmark_scripts(folder: Path) -> dict[str, Path]:
    """Each script of `folder` by its name without `.py`, sorted: the modules that run as
    a program (`if __name__ == "__main__"`), not the harness they share."""
    return {
        path.stem: path
        for path in sorted(folder.glob("*.py"))
        if path.is_file() and _runs_as_a_program(path)
    }


def _runs_as_a_program(script: Path) -> bool:
    try:
        tree = ast.parse(script.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return False
    return any(
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        for node in tree.body
    )


def summary(script: Path) -> str:
    """The first line of `script`'s module docstring, or "" when it has none."""
    try:
        docstring = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8")))
    except (SyntaxError, UnicodeDecodeError):
        return ""
    return docstring.strip().splitlines()[0] if docstring else ""


def cmd_bench(args: argparse.Namespace, settings: Settings | None) -> int:
    """Without a name, one line per benchmark script; with one, the script run by this
    Python with the arguments that follow it, and its exit code."""
    if not BENCHMARKS_DIR.is_dir():
        raise CliError(
            f"no benchmarks folder at {BENCHMARKS_DIR}: the benchmarks come with a source "
            "checkout of embedding_pipeline, not with an installed package"
        )
    scripts = benchmark_scripts(BENCHMARKS_DIR)
    if args.name is None:
        width = max(map(len, scripts), default=0)
        for name, path in scripts.items():
            print(f"{name:<{width}}  {summary(path)}".rstrip())
        return 0
    script = scripts.get(args.name)
    if script is None:
        raise CliError(f"no benchmark {args.name!r}; one of {', '.join(scripts)}")
    sys.stdout.flush()
    code = subprocess.run([sys.executable, str(script), *args.bench_args], check=False).returncode
    # a script killed by a signal exits as a shell reports it (SIGINT: 130)
    return 128 - code if code < 0 else code
