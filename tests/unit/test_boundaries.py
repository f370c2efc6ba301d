"""Architecture guards, read from the sources (ast; nothing is imported):

- ``rollout`` never imports ``megatron_alp`` (the rollout fleet runs without the trainer);
- ``megatron_alp/algo`` never imports Megatron's ``parallel_state`` (algorithm code is
  parallelism-agnostic: it receives process groups, it does not look them up);
- the library (``megatron_alp``, ``rollout``) does not print: it logs, its command-line entry points
  included (their output goes through megatron_alp/runtime/command_output.py). No exceptions, and
  no ``noqa`` silences this one. (A ``print(`` inside a string, such as the TIR prompt that tells
  the model to print, is not a call and is not flagged.)
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Tuple

REPO = Path(__file__).resolve().parents[2]


def _sources(package: str) -> Iterator[Tuple[str, ast.AST]]:
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        yield rel, ast.parse(path.read_text(), filename=rel)


def _imports(tree: ast.AST) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every import; relative imports are inside their package."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def test_rollout_never_imports_megatron_alp():
    bad = [f"{f}:{line} imports {mod}" for f, tree in _sources("rollout") for line, mod in _imports(tree)
           if mod == "megatron_alp" or mod.startswith("megatron_alp.")]
    assert not bad, "\n".join(bad)


def test_algo_never_imports_parallel_state():
    bad = [f"{f}:{line} imports {mod}" for f, tree in _sources("megatron_alp/algo") for line, mod in _imports(tree)
           if mod.startswith("megatron.core.parallel_state")]
    assert not bad, "\n".join(bad)


def _is_print(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"


def test_library_does_not_print():
    bad = []
    for package in ("megatron_alp", "rollout"):
        for f, tree in _sources(package):
            bad += [f"{f}:{n.lineno}" for n in ast.walk(tree) if _is_print(n)]
    assert not bad, "print() in the library (use logging): " + ", ".join(bad)


def test_the_guards_see_violations():
    tree = ast.parse("import megatron_alp.x\nfrom megatron.core import parallel_state as ps\nprint(1)\n")
    mods = [m for _, m in _imports(tree)]
    assert "megatron_alp.x" in mods and "megatron.core.parallel_state" in mods
    assert any(_is_print(n) for n in ast.walk(tree))
    assert any(_is_print(n) for n in ast.walk(ast.parse("print(1)  # noqa: T201\n")))  # a noqa does not hide it
    assert not any(_is_print(n) for n in ast.walk(ast.parse("PROMPT = 'use print() to show results'\n")))
