"""The layers of ldm/ (.importlinter): no import cycle at all, and an upward import breaks the contracts.

`make test` runs `lint-imports` on the repository itself; these check the checker: that it sees
every import (function-level ones too), and that it fails on the kind of import the layers forbid.
"""
import os
import shutil
import subprocess
import sys

import grimp

from conftest import ROOT

LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def import_cycles(graph) -> list:
    """The strongly connected components of more than one module (Tarjan), and modules importing themselves: every import cycle."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in graph.find_modules_directly_imported_by(module):  # a module importing itself too
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycle_between_any_two_modules():
    graph = grimp.build_graph("ldm")  # function-level (lazy) imports count too
    assert len(graph.modules) > 40
    assert graph.direct_import_exists(importer="ldm.training.build", imported="ldm.data.stream")  # the graph sees lazy imports
    assert import_cycles(graph) == []


def lint_copy(tmp_path, upward_import: str = ""):
    """lint-imports on a copy of ldm/ (plus one added line in ldm/models/recipe.py)."""
    shutil.copytree(os.path.join(ROOT, "ldm"), tmp_path / "ldm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, ".importlinter"), tmp_path / ".importlinter")
    if upward_import:
        with open(tmp_path / "ldm" / "models" / "recipe.py", "a") as f:
            f.write(f"\n\ndef _upward():\n    {upward_import}\n")
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)))


def test_contracts_hold_and_an_upward_import_breaks_them(tmp_path):
    assert lint_copy(tmp_path / "as_is").returncode == 0
    res = lint_copy(tmp_path / "upward", "from ldm.training.args import ModelArguments  # models -> training: forbidden")
    assert res.returncode == 1, res.stdout
    assert "ldm.models.recipe -> ldm.training.args" in res.stdout
    res = lint_copy(tmp_path / "sideways", "from ldm.data.records import Skip  # models -> data: forbidden")
    assert res.returncode == 1, res.stdout
    assert "data and models never import each other" in res.stdout and "BROKEN" in res.stdout
