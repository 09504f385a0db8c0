"""The package's shape: imports run one way (no cycle; the speed layer, the jobs and the benchmark each imported only
from above), and every module is linted (pyproject's ruff settings over phi4_pron/ and tests/)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "phi4_pron"
ENTRYPOINTS = {"phi4_pron.train", "phi4_pron.evaluate", "phi4_pron.assess", "phi4_pron.check"}
# the domain's base: what loads, checks and describes data, the checkpoint and the task
BASE = {
    "phi4_pron.config",
    "phi4_pron.paper",
    "phi4_pron.results",
    "phi4_pron.dist",
    "phi4_pron.answer",
    "phi4_pron.metrics",
    "phi4_pron.data",
    "phi4_pron.modeling",
    "phi4_pron.adapters",
    "phi4_pron.tiny_model",
    "phi4_pron.table3",
    "phi4_pron.stats",
}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """Each module of phi4_pron and the modules of phi4_pron it imports (at the top or inside a function)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("phi4_pron"):
                found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("phi4_pron")}
        graph[name] = {m for m in found if m in modules and m not in (name, "phi4_pron")}
    return graph


def test_no_import_runs_back_up():
    graph = _imports()
    assert len(graph) > 30
    for name, deps in graph.items():
        top = name.split(".")[1] if "." in name else ""
        if name in BASE:
            assert not {d for d in deps if d not in BASE}, f"{name} (the base) imports {deps - BASE}"
        if top == "fast":
            allowed = {"phi4_pron.modeling", "phi4_pron.config"}
            assert all(d.startswith("phi4_pron.fast") or d in allowed for d in deps), f"{name} imports {deps}"
        if top not in ("jobs", "bench") and name not in ENTRYPOINTS:
            assert not {d for d in deps if d.startswith("phi4_pron.jobs")}, f"{name} imports a job"
        if top != "bench":
            assert not {d for d in deps if d.startswith("phi4_pron.bench")}, f"{name} imports the benchmark"
    for name in ENTRYPOINTS:  # thin: the schema, then the job of the same name
        assert graph[name] == {"phi4_pron.config", f"phi4_pron.jobs.{name.split('.')[1]}"}, graph[name]


def test_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, name, dep])
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
