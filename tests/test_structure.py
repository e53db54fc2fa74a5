"""The package's shape: no import cycle between its modules, no private name imported across modules, and hooks
registered in one place (`ablate.hooks.hooks`, which removes them in `finally`)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ablate"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.rglob("*.py"))}


def imports(tree: ast.Module, known: set[str]) -> list[tuple[str, list[str]]]:
    """Every `ablate` module a module imports, at the top or inside a function, with the names it takes."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ablate" and node.level == 0:
            names = [alias.name for alias in node.names]
            submodules = [f"{node.module}.{name}" for name in names if f"{node.module}.{name}" in known]
            found.append((node.module, [name for name in names if f"{node.module}.{name}" not in known]))
            found += [(submodule, []) for submodule in submodules]
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "ablate"]
    return found


def test_no_import_cycle_between_modules():
    trees = modules()
    known = set(trees)
    graph = {name: {target for target, _ in imports(tree, known) if target in known and target not in ("ablate", name)}
             for name, tree in trees.items()}
    # A package's own __init__ re-exports its submodules: that edge is not a dependency of the submodule.
    for name in graph:
        graph[name] = {target for target in graph[name] if not name.startswith(target + ".")}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            assert state.get(target) != 1, f"import cycle: {' -> '.join(path + [name, target])}"
            if target not in state:
                visit(target, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_private_name_is_imported_across_modules():
    trees = modules()
    known = set(trees)
    offenders = [f"{name} imports {target}.{imported}" for name, tree in trees.items()
                 for target, names in imports(tree, known) if target != name
                 for imported in names if imported.startswith("_") and not imported.endswith("__")]
    assert not offenders, offenders


def test_hooks_are_registered_only_by_the_hook_context_manager():
    registering = sorted(name for name, tree in modules().items() for node in ast.walk(tree)
                         if isinstance(node, ast.Attribute) and node.attr.startswith("register_forward"))
    assert set(registering) == {"ablate.hooks"}, registering
