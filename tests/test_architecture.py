"""The layering holds: the import-linter contracts in pyproject.toml, and no import cycle between files.

Both checks read the import graph that grimp builds from the source, imports inside functions
included (they couple modules as much as top-level ones). Importing `pkg.sub.mod` from outside
`pkg/sub` also runs `pkg/sub/__init__.py`, so the cycle check counts that edge too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import networkx as nx
import pytest
from importlinter import api as importlinter_api

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(directory: Path) -> tuple[bool, str]:
    """(all contracts kept, report): `lint-imports` with `directory`'s pyproject.toml over its `jaxtune`."""
    env = {**os.environ, "PYTHONPATH": str(directory)}
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(directory / "pyproject.toml")],
                          cwd=directory, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode == 0, done.stdout + done.stderr


def import_graph(package: str = "jaxtune") -> nx.DiGraph:
    """Module -> module edges of `package`, function-level imports and implicit package __init__ runs included."""
    graph = grimp.build_graph(package, cache_dir=None)
    edges = nx.DiGraph()
    for importer in graph.modules:
        edges.add_node(importer)
        for imported in graph.find_modules_directly_imported_by(importer):
            edges.add_edge(importer, imported)
            parts = imported.split(".")
            for i in range(2, len(parts)):  # the root package's __init__ is lazy (PEP 562 __getattr__) and left out
                parent = ".".join(parts[:i])
                if not importer.startswith(parent + "."):
                    edges.add_edge(importer, parent)
    return edges


def import_cycles(package: str = "jaxtune") -> list[list[str]]:
    return [sorted(c) for c in nx.strongly_connected_components(import_graph(package)) if len(c) > 1]


def test_import_contracts_hold():
    """pyproject.toml's [tool.importlinter] contracts (layers, plain settings), with no ignore list."""
    config = importlinter_api.read_configuration(str(ROOT / "pyproject.toml"))
    for contract in config["contracts_options"]:
        assert not contract.get("ignore_imports"), f"contract {contract['id']!r} has an ignore list"
    kept, report = _lint(ROOT)
    assert kept, report


def test_no_import_cycle_between_files():
    assert import_cycles() == []


def _scratch_package(tmp_path: Path, planted: str) -> Path:
    """A copy of the package and its contracts with `planted` appended to jaxtune/data/sources.py (data layer)."""
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "jaxtune", copy / "jaxtune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    with open(copy / "jaxtune" / "data" / "sources.py", "a") as f:
        f.write(planted)
    return copy


@pytest.mark.parametrize("planted", [
    "\n\ndef _planted():\n    from jaxtune import trainer  # an upward import hidden in a function\n\n    return trainer\n",
    "\n\ndef _planted():\n    import jaxtune.objectives.sft\n\n    return jaxtune\n",
])
def test_a_function_level_upward_import_breaks_the_contract(tmp_path, monkeypatch, planted):
    """The check counts imports inside functions: planting one in a scratch copy fails both checks."""
    copy = _scratch_package(tmp_path, planted)
    saved = {name: module for name, module in sys.modules.items() if name == "jaxtune" or name.startswith("jaxtune.")}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)  # grimp finds the package through the import system
    monkeypatch.syspath_prepend(str(copy))
    kept, report = _lint(copy)
    assert not kept and "jaxtune.data is not allowed to import" in report
    assert any("jaxtune.data.sources" in cycle for cycle in import_cycles())  # data -> ... -> data again
