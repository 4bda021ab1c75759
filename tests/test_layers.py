"""The package's layers: each module imports only from the layers below it (or its own), never in a circle.

Imports inside functions count: a function-level import that only dodges a cycle is still a cycle.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "retrain"

# Bottom to top: the data flows up this list, from a folder to a model and on to its users.
LAYERS = [
    ("foundations", {"errors", "evidence", "files", "guards", "progress", "preprocess", "decode", "augment", "config", "stopping",
                     "prefetch",
                     "validate", "interrupts", "outputs", "distributed", "split", "connections", "memo"}),
    ("networks and runtime", {"networks", "backbones", "runtime", "scan", "store", "engine", "graphs"}),
    ("stages", {"features", "head", "data", "finetune", "scratch", "calibrate", "prediction", "evaluation", "metrics",
                "report", "summaries", "imagenet", "lrfind", "checks", "export", "datasets", "tuned"}),
    ("pipeline", {"api", "pipeline", "plan"}),
    ("applications", {"doctor", "compare", "serve", "commands", "cli", "__main__", "__init__", "webconfig", "httpguard",
                      "uploads", "batching", "workspace", "trainjob", "jobs", "modelstore", "webstate", "routes_predict",
                      "routes_photos", "routes_training"}),
]
LAYER_OF = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}


def package_imports(path: Path) -> set[str]:
    """The package modules a module imports, at any depth of its code (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retrain."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("retrain.")}
    return found - {"__version__"}


@functools.cache  # parsed once, not once per parametrized test
def graph() -> dict[str, set[str]]:
    return {p.stem: package_imports(p) for p in PACKAGE.glob("*.py")}


def test_every_module_has_a_layer():
    assert set(graph()) <= set(LAYER_OF), sorted(set(graph()) - set(LAYER_OF))


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py")))
def test_no_module_imports_upward(module):
    upward = {m for m in graph()[module] if LAYER_OF.get(m, -1) > LAYER_OF[module]}
    assert not upward, f"{module} ({LAYERS[LAYER_OF[module]][0]}) imports from above: {sorted(upward)}"


def test_no_import_cycles():
    edges, seen, stack, cycles = graph(), set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            visit(nxt)
        stack.pop()
    for module in sorted(edges):
        visit(module)
    assert not cycles, cycles
