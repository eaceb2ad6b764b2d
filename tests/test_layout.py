"""The package layout's dependency rules (DESIGN.md section 2), checked on the source with `ast`.

Every `import` / `from ... import` under newllm/ counts, at module level or inside a function (a lazy
import is still a dependency). A module belongs to its subpackage (`newllm.train.loop` -> `train`);
the top-level modules (`newllm.config`, `newllm.errors`, `newllm.__main__`) are units of their own,
and `newllm` itself (newllm/__init__.py, the public facade) is the unit "newllm".
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "newllm"
#: what the model code may not know about (DESIGN.md: "the model knows no training loop, corpus or command line")
NOT_FOR_MODELS = ("train", "eval", "cli", "data", "experiment", "checkpoints")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, int]]:
    """The newllm modules `name` imports, with line numbers (`from pkg import mod` names pkg.mod)."""
    path, is_pkg = MODULES[name]
    package = name if is_pkg else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..data import y
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:
                sub = f"{module}.{a.name}"
                found.append((sub if sub in MODULES else module, node.lineno))
    return [(m, line) for m, line in found if m == "newllm" or m.startswith("newllm.")]


def unit(module: str) -> str:
    """`newllm.train.loop` -> "train"; `newllm.config` -> "config"; `newllm` -> "newllm"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "newllm"


EDGES = [(m, t, line) for m in MODULES for t, line in _imports(m)]


def _where(edges) -> list[str]:
    return [f"{MODULES[m][0].relative_to(PACKAGE.parent)}:{line} imports {t}" for m, t, line in edges]


def test_the_import_graph_is_read():
    """Guards the checks below against passing vacuously (a parser that finds nothing)."""
    units = {(unit(m), unit(t)) for m, t, _ in EDGES}
    assert ("train", "models") in units and ("cli", "train") in units and len(MODULES) > 30


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for m, t, _ in EDGES:
        if unit(m) != unit(t):
            graph.setdefault(unit(m), set()).add(unit(t))
    # depth-first search; a back edge closes a cycle
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(u: str):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                cycle = visit(v)
                if cycle:
                    return cycle
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            cycle = visit(u)
            if cycle:
                steps = [e for a, b in zip(cycle, cycle[1:])
                         for e in [next(e for e in EDGES if unit(e[0]) == a and unit(e[1]) == b)]]
                pytest.fail(f"import cycle between subpackages: {' -> '.join(cycle)} ({'; '.join(_where(steps))})")


def _offending(src: str, targets: tuple[str, ...]) -> list[str]:
    return _where([e for e in EDGES if unit(e[0]) == src and unit(e[1]) in targets])


def test_experiment_does_not_import_the_cli():
    assert not _offending("experiment", ("cli",)), _offending("experiment", ("cli",))


def test_data_does_not_import_checkpoints():
    """Checkpoints may use data, never the reverse."""
    assert not _offending("data", ("checkpoints",)), _offending("data", ("checkpoints",))


def test_models_know_no_loop_corpus_adapter_or_command_line():
    bad = _offending("models", NOT_FOR_MODELS)
    assert not bad, bad


def test_only_the_command_line_imports_the_cli():
    bad = _where([e for e in EDGES if unit(e[1]) == "cli" and unit(e[0]) not in ("cli", "__main__")])
    assert not bad, bad
