"""The package's parts import one way (docs/architecture.md): top-level helpers, then the architecture families,
the patch format, the toy world, checkpoints, judging, erasing, the toy world's model building (it draws and judges
images, and trains FLUX.1's with erasing's flow-matching objective), test support,
the CLI; and no module imports itself in a circle, also through imports made inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import erasekit

SRC = Path(erasekit.__file__).parent
# a part may import the parts before it in this list, never one after it
LAYERS = [
    "helpers",
    "families",
    "format",
    "toyworld",
    "checkpoints",
    "judging",
    "erasing",
    "toymodel",
    "testing",
    "cli",
]
HELPERS = {"errors", "_torch", "_temps", "_parallel", "_version"}
# train and measure the toy world's models (FLUX.1's is trained with erasekit's own flow-matching objective)
TOYMODEL = {f"erasekit.toyworld.{m}" for m in ("train", "train_sdxl", "train_flux", "measure")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The erasekit modules ``name`` imports, anywhere in it (functions and TYPE_CHECKING blocks too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in modules else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in modules and m != name}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return None  # the package's lazy API and `python -m erasekit`
    if module in TOYMODEL:
        return "toymodel"
    return "helpers" if parts[1] in HELPERS else parts[1]


def test_every_module_belongs_to_a_part() -> None:
    assert {_layer(m) for m in _modules()} - {None} == set(LAYERS)


def test_parts_import_one_way() -> None:
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        mine = _layer(name)
        for dep in _imports(name, path, modules):
            theirs = _layer(dep)
            if mine and theirs and LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{name} imports {dep}")
    assert not wrong


def test_no_import_circles() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    graph = {n: {d for d in deps if not n.startswith(d + ".")} for n, deps in graph.items()}  # a package's own init
    seen: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for dep in sorted(graph[node]):
            if seen.get(dep) == 1:
                circles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in seen:
                visit(dep, stack + [dep])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [node])
    assert not circles
