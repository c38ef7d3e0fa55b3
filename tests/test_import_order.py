"""selkv's modules import downwards only, with no cycle.

Dependency order (each layer imports only from the layers before it or its own):
errors, quant, upstream <- middle, storage, layers, shapes, selective_cache, specs <- cache, testing <- attention, kernels <- models, generation, sizing
(and the ``selkv`` package's public API) <- eval <- cli, cli_help.
Imports inside functions count too, and so do ``importlib.import_module("selkv...")`` strings.
"""

from __future__ import annotations

import ast
from pathlib import Path

import selkv

SRC = Path(selkv.__file__).resolve().parent.parent

LAYERS = (
    ("errors", "quant", "upstream"),
    ("middle", "storage", "layers", "shapes", "selective_cache", "specs"),
    ("cache", "testing"),
    ("attention", "kernels"),
    ("models", "generation", "sizing", ""),  # "": the package itself (selkv/__init__.py, the public API)
    ("eval",),
    ("cli", "cli_help"),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    path = SRC / module.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """The selkv modules ``path`` imports, anywhere in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import cache` names a module; `from .cache import x` a name
                found.add(f"{target}.{alias.name}" if _exists(f"{target}.{alias.name}") else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("selkv."):
            if _exists(node.value):  # importlib.import_module("selkv.x")
                found.add(node.value)
    return {m for m in found if m.split(".")[0] == "selkv" and m != name}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted((SRC / "selkv").rglob("*.py"))}


def _layer(module: str) -> int:
    parts = module.split(".")
    return RANK[parts[1] if len(parts) > 1 else ""]


def test_every_module_has_a_layer():
    missing = sorted(m for m in _graph() if (m.split(".") + [""])[1] not in RANK)
    assert not missing, f"add these to LAYERS: {missing}"


def test_no_import_goes_up_a_layer():
    upward = sorted(f"{m} -> {d}" for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m))
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            parent_package = module.startswith(dep + ".")  # a submodule reading its own package's __init__
            if state.get(dep) == 1 and not parent_package:
                cycles.append(" -> ".join(path[path.index(dep):] + [module, dep]) if dep in path else f"{module} -> {dep}")
            elif dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
