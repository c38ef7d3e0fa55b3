"""selkv's modules import downwards only, with no cycle.

Dependency order (each layer imports only from the layers before it or its own):
errors, quant, upstream <- middle, storage, layers, shapes, selective_cache, specs <- cache, testing
<- attention, kernels <- models, generation, sizing (and the ``selkv`` package's public API) <- eval <- cli, cli_help.
Imports inside functions count too, and so do ``importlib.import_module("selkv...")`` strings.

Triton is imported only by the kernel modules (``TRITON_MODULES``), and they only inside the functions that
launch a kernel: ``import selkv`` works without Triton, and Triton's first import (which fixes its interpreter
mode) is not selkv's.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
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
# The modules that import Triton when they are imported.
TRITON_MODULES = {"selkv.kernels.decode_attention", "selkv.kernels.decode_op", "selkv.kernels.triton_decode"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    path = SRC / module.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _module_level(node: ast.AST):
    """``node`` and what it holds, less the bodies of functions (what runs when a module is imported)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _module_level(child)


def _imports(path: Path, module_level: bool = False) -> set[str]:
    """The selkv modules ``path`` imports, anywhere in the file (``module_level``: outside functions), and
    ``triton`` if it imports that."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in _module_level(tree) if module_level else ast.walk(tree):
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
    found = {"triton" if m.split(".")[0] == "triton" else m for m in found}
    return {m for m in found if m.split(".")[0] in ("selkv", "triton") and m != name}


def _graph() -> dict[str, set[str]]:
    graph = {_module_name(p): _imports(p) for p in sorted((SRC / "selkv").rglob("*.py"))}
    return {m: {d for d in deps if d != "triton"} for m, deps in graph.items()}


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
                cycles.append(
                    " -> ".join(path[path.index(dep) :] + [module, dep]) if dep in path else f"{module} -> {dep}"
                )
            elif dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_triton_is_imported_by_the_kernel_modules_only():
    """Only TRITON_MODULES import Triton when imported, and other modules import them inside functions only."""
    eager = {_module_name(p): _imports(p, module_level=True) for p in sorted((SRC / "selkv").rglob("*.py"))}
    triton_importers = {m for m, deps in eager.items() if "triton" in deps}
    assert triton_importers <= TRITON_MODULES, (
        f"import triton at module level: {sorted(triton_importers - TRITON_MODULES)}"
    )
    eager_kernels = sorted(
        f"{m} -> {d}" for m, deps in eager.items() if m not in TRITON_MODULES for d in deps & TRITON_MODULES
    )
    assert not eager_kernels, "import these inside the functions that launch a kernel:\n" + "\n".join(eager_kernels)


def test_import_selkv_without_triton():
    """With Triton absent, ``import selkv`` works, imports no kernel module and finds no fused kernel."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` raises ImportError; find_spec gives None
        "import selkv\n"
        "from selkv.attention import kernel_module\n"
        "assert kernel_module() is None\n"
        f"print(sorted(set(sys.modules) & set({sorted(TRITON_MODULES)!r})))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
