"""The package's shape, read with ``ast``: no import cycle, no import pointing up a layer, the
environment read in ``flagopt/settings.py`` alone. Lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flagopt"

# Higher imports lower. Within one group (a row's module or package) imports are free, as long
# as they make no cycle; across groups they must point strictly down. A new module must be
# placed here.
LAYERS = {
    "flagopt": 7,  # the package face: re-exports the public API of everything below
    "flagopt.finetune": 7,  # `python -m flagopt.finetune` (for torchrun): runs flagopt.cli
    "flagopt.cli": 6,  # `flagopt ...`; dispatches `flagopt download` to flagopt.download
    "flagopt.download": 5,  # `flagopt-download`
    "flagopt.serve": 5,
    "flagopt.train": 5,
    "flagopt.eval": 5,
    "flagopt.auto_model": 4,  # registry, fetch, AutoLoader
    "flagopt.predictor": 4,
    "flagopt.model": 3,
    "flagopt.hub": 3,  # downloading files
    "flagopt.tokenizer": 2,
    "flagopt.paths": 1,
    "flagopt.settings": 1,  # the environment, read once
    "flagopt.version": 1,
    "flagopt.errors": 0,
}
SETTINGS_MODULE = "flagopt.settings"
_ENV_NAMES = frozenset({"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"})


def module_names(package: Path) -> dict[str, Path]:
    """``{"flagopt.model.config": path, "flagopt.model": path/__init__.py, ...}``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """The package modules one import statement loads (``from a import b`` is ``a.b`` when
    ``b`` is a module, else ``a``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = module.split(".")[:len(module.split(".")) - node.level + is_package]
            base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    else:
        return []
    found = []
    for name in names:  # `import a.b.c` loads a.b.c; keep the deepest package module
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
    return found


def import_edges(package: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its body)."""
    paths = module_names(package)
    edges: dict[str, set[str]] = {m: set() for m in paths}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            edges[module].update(_imported(node, module, path.name == "__init__.py",
                                           set(paths)))
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def group_of(module: str, layers: dict[str, int]) -> str | None:
    """The longest entry of ``layers`` that is ``module`` or a package above it."""
    while module and module not in layers:
        module = module.rpartition(".")[0]
    return module or None


def layer_violations(edges: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    problems = []
    for module in sorted(edges):
        group = group_of(module, layers)
        if group is None:
            problems.append(f"{module} has no layer: add it to LAYERS")
            continue
        for target in sorted(edges[module]):
            other = group_of(target, layers)
            if other is None or other == group:
                continue
            if layers[other] >= layers[group]:
                problems.append(f"{module} (layer {layers[group]}) imports {target} "
                                f"(layer {layers[other]}): imports must point down")
    return problems


def environment_reads(package: Path, allowed: str) -> list[str]:
    """``os.environ``/``os.getenv``/... uses (or ``from os import environ``) outside ``allowed``."""
    found = []
    for module, path in module_names(package).items():
        if module == allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            hit = (isinstance(node, ast.Attribute) and node.attr in _ENV_NAMES
                   and isinstance(node.value, ast.Name) and node.value.id == "os") or \
                  (isinstance(node, ast.ImportFrom) and node.module == "os"
                   and any(a.name in _ENV_NAMES for a in node.names))
            if hit:
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    return found


# --- the package ------------------------------------------------------------------------------


def test_no_import_cycles() -> None:
    assert find_cycles(import_edges(PACKAGE)) == []


def test_imports_point_down_the_layers() -> None:
    assert layer_violations(import_edges(PACKAGE), LAYERS) == []


def test_environment_read_in_settings_only() -> None:
    assert (PACKAGE / "settings.py").is_file()
    assert environment_reads(PACKAGE, SETTINGS_MODULE) == []


# --- the checks can fail ----------------------------------------------------------------------


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """A package with a cycle (a <-> b), an upward import (low -> high) and an env read."""
    root = tmp_path / "toy"
    (root / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from toy import b\n",
        "b.py": "def f():\n    from . import a\n",
        "high.py": "x = 1\n",
        "low.py": "import os\ndef f():\n    from toy.high import x\n    return os.environ['X']\n",
        "sub/__init__.py": "from .leaf import y\n",
        "sub/leaf.py": "from os import getenv\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_checker_sees_cycles_layers_and_env_reads(toy: Path) -> None:
    edges = import_edges(toy)
    assert edges["toy.a"] == {"toy.b"} and edges["toy.b"] == {"toy.a"}
    assert edges["toy.sub"] == {"toy.sub.leaf"}
    assert find_cycles(edges) == [["toy.a", "toy.b"]]
    layers = {"toy": 9, "toy.a": 1, "toy.b": 1, "toy.high": 2, "toy.low": 1, "toy.sub": 0}
    problems = layer_violations(edges, layers)
    assert problems == ["toy.a (layer 1) imports toy.b (layer 1): imports must point down",
                        "toy.b (layer 1) imports toy.a (layer 1): imports must point down",
                        "toy.low (layer 1) imports toy.high (layer 2): imports must point down"]
    assert layer_violations(edges, {"toy": 0}) == []  # one group: free inside
    assert "toy.sub has no layer: add it to LAYERS" in layer_violations(edges, {"toy.a": 0})
    assert environment_reads(toy, "toy.settings") == ["toy/low.py:4", "toy/sub/leaf.py:1"]
