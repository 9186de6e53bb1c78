"""The package's import structure: no import circle between modules, the folders of
`src/saescale` in one order with every import pointing down it, and Ray imported only where it
enters (the service, the sweeps' backend). Read from the source text with `ast`, function-level
imports included: a lazy import inside a function is still an arrow."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
RAY_PACKAGES = ("saescale.service", "saescale.sweeps")  # where Ray enters (README, Layout)


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "saescale").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported_names(path: Path, module: str, is_package: bool) -> set[str]:
    """Every dotted name `path` imports, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> saescale modules it imports, module -> every top-level package it imports)."""
    mods = modules()

    def resolve(name: str) -> str | None:  # the deepest module of ours a dotted name lies in
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for module, path in mods.items():
        names = imported_names(path, module, path.name == "__init__.py")
        graph[module] = {r for r in map(resolve, names) if r and r != module and r.startswith("saescale")}
        external[module] = {n.split(".")[0] for n in names}
    return graph, external


def folder(module: str) -> str:
    """The room a module lives in: its folder under saescale/, or the loose module itself."""
    return ".".join(module.split(".")[:2])


def test_no_import_circle_between_modules():
    graph, _ = import_graph()
    assert len(graph) > 50  # the walk found the package
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the circle


def test_the_folders_form_one_stack_with_every_import_pointing_down():
    """Folder to folder (a lower folder never imports a higher one, directly or round about):
    the folder graph has no circle, so its folders stack with every arrow pointing down."""
    graph, _ = import_graph()
    folders: dict[str, set[str]] = {}
    for module, targets in graph.items():
        folders.setdefault(folder(module), set()).update(folder(t) for t in targets if folder(t) != folder(module))
    order = list(graphlib.TopologicalSorter(folders).static_order())  # raises CycleError on an upward arrow
    # the ends of the stack, as the README's layout has them
    assert order.index("saescale.storage") < order.index("saescale.formats") < order.index("saescale.app")
    assert order.index("saescale.core") < order.index("saescale.train") < order.index("saescale.service")
    assert order.index("saescale.cli") == len(order) - 1 or "saescale.cli" not in {
        t for targets in folders.values() for t in targets
    }


def test_ray_enters_only_in_the_service_and_the_sweeps_backend():
    _, external = import_graph()
    importers = sorted(m for m, names in external.items() if "ray" in names)
    assert importers, "no module imports ray: the walk is broken"
    assert [m for m in importers if not m.startswith(RAY_PACKAGES)] == []
