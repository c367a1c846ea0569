"""The layout's rules (docs/architecture.md), read from the source: every import anywhere in a module (top level,
inside functions, under TYPE_CHECKING) is an edge of one graph over our packages, and the graph must have no cycle
and cross no wall. A rule broken here is a design decision to make in docs/architecture.md first, not a test to
relax."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

from backends.settings import REPO_ROOT

PACKAGES = ("backends", "openai_frontend", "tools", "benchmarks", "scripts", "tests")
# Which top-level package may import which (a package always imports itself). Tests import anything; nothing
# imports tests; tools serve tests, benchmarks and scripts; backends import no project code outside themselves.
MAY_IMPORT = {
    "backends": set(),
    "openai_frontend": {"backends"},
    "tools": {"backends", "openai_frontend"},
    "benchmarks": {"backends", "openai_frontend", "tools"},
    "scripts": {"backends", "openai_frontend", "tools", "benchmarks"},
    "tests": {"backends", "openai_frontend", "tools", "benchmarks", "scripts"},
}
# The only modules that talk to Triton's Python-backend API: engine, runner, services and the LoRA core run
# without a Triton stub (the offline API, the benchmarks and most tests use them that way).
TRITON_FACING = {"backends.triton_io", "backends.llm.triton_model", "backends.llm.metrics",
                 "backends.diffusion.triton_model", "backends.diffusion.metrics", "backends.lora.manager.metrics"}
HEAVY = {"torch", "triton", "peft", "diffusers", "safetensors", "triton_python_backend_utils"}


@dataclass
class Module:
    name: str
    path: Path
    internal: set[str] = field(default_factory=set)  # our modules it imports
    external: set[str] = field(default_factory=set)  # top-level names of third-party imports


def _name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Module]:
    found = {_name(p): Module(_name(p), p) for pkg in PACKAGES for p in (REPO_ROOT / pkg).rglob("*.py")}
    for p in (REPO_ROOT / "model_repository").glob("*/1/model.py"):
        found[f"model_repository.{p.parts[-3]}"] = Module(f"model_repository.{p.parts[-3]}", p)
    for module in found.values():
        package = module.name.split(".") if module.path.name == "__init__.py" else module.name.split(".")[:-1]
        for node in ast.walk(ast.parse(module.path.read_text(), str(module.path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in found else base for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] not in PACKAGES:
                    module.external.add(target.split(".")[0])
                    continue
                while target and target not in found:
                    target = target.rpartition(".")[0]
                if target and target != module.name:
                    module.internal.add(target)
    return found


def closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(modules()[current].internal)
    return seen


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph = {n: sorted(m.internal) for n, m in modules().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_import_graph_sees_the_whole_tree():
    """Guards the checks below against reading nothing: known edges are found, through every import form."""
    graph = modules()
    assert len(graph) > 150
    assert "backends.lora.ops.batch" in graph["backends.lora.layers.context"].internal  # from-import
    assert "backends.llm" in graph["model_repository.llm"].internal
    assert "torch" in graph["backends.lora.ops.torch_ops"].external


def test_no_import_cycles():
    assert _cycles() == []


def test_cycle_detection_finds_a_planted_cycle(monkeypatch):
    a, b = modules()["backends.errors"], modules()["backends.settings"]
    monkeypatch.setattr(a, "internal", a.internal | {"backends.settings"})
    monkeypatch.setattr(b, "internal", b.internal | {"backends.errors"})
    assert any({"backends.errors", "backends.settings"} <= set(cycle) for cycle in _cycles())


def test_packages_import_only_what_they_may():
    wrong = [f"{m.name} -> {t}" for m in modules().values() for t in m.internal
             if (src := m.name.split(".")[0]) in MAY_IMPORT and (dst := t.split(".")[0]) != src
             and dst not in MAY_IMPORT[src]]
    assert wrong == []


def test_model_shims_are_thin():
    for shim in ("model_repository.llm", "model_repository.diffusion"):
        module = modules()[shim]
        assert module.internal == {"backends", shim.replace("model_repository", "backends")}, module.internal
        assert len(module.path.read_text().splitlines()) < 20


def test_the_lora_core_knows_no_model_kind():
    """backends.lora serves any model: it imports only itself and the shared backend foundations."""
    foundations = {"backends.errors", "backends.settings", "backends.model_params"}
    wrong = [f"{m.name} -> {t}" for m in modules().values() if m.name.startswith("backends.lora")
             for t in m.internal if not t.startswith("backends.lora") and t not in foundations]
    assert wrong == []


def test_only_the_triton_facing_modules_touch_the_triton_stub_api():
    users = {m.name for m in modules().values()
             if m.name.startswith("backends.") and "triton_python_backend_utils" in m.external}
    assert users == TRITON_FACING
    for offline in ("backends.offline.text", "backends.offline.image", "backends.llm.engine",
                    "backends.diffusion.service", "backends.llm.service"):
        assert not closure(offline) & TRITON_FACING, offline


@pytest.mark.parametrize("entry", ["openai_frontend.app", "openai_frontend.__main__"])
def test_the_frontend_imports_nothing_heavy(entry):
    """Static twin of test_torch_free.py: no module the frontend can reach imports torch or Triton's stub API,
    even inside a function that the served requests did not happen to call."""
    heavy = {f"{name}: {sorted(modules()[name].external & HEAVY)}" for name in closure(entry)
             if modules()[name].external & HEAVY}
    assert heavy == set()


def test_routers_are_http_only():
    """A router parses HTTP and hands the body to the engine: no backend code, no Triton client, no business logic
    (a handler is at most a few statements)."""
    for name, module in modules().items():
        if not name.startswith("openai_frontend.routers."):
            continue
        assert not {t for t in module.internal if t.startswith("backends")}, name
        assert not module.internal & {"openai_frontend.engine.gateway", "openai_frontend.engine.catalog"}, name
        assert "tritonclient" not in module.external, name
        for node in ast.walk(ast.parse(module.path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert len(node.body) <= 4, f"{name}.{node.name} has {len(node.body)} statements"
