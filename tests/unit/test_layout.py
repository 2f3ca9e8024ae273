"""The package layout: imports point down the data path, no cycles, no private names across modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"hookchains": ROOT / "hookchains", "hookchains.adapters": ROOT / "adapters", "hookchains.cli": ROOT / "cli"}
# the data path: a module may import from its own stage and the stages before it
STAGES = ["inputs", "adapters", "core", "tokens", "analysis", "evaluation", "viz", "workflow", "cli"]
VOCABULARY = {"core.sites": "inputs"}  # adapters find sites: the sites vocabulary sits below them


def _modules() -> dict:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict):
    """(target module, imported name) for every hookchains import in ``path``, inside functions too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hookchains"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield (full if full in modules else node.module), alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("hookchains"):
                    yield alias.name, ""


def _stage(module: str) -> int:
    rest = module.removeprefix("hookchains.")
    rest = VOCABULARY.get(rest, rest)
    head = rest.split(".")[0]
    return STAGES.index(head) if head in STAGES else -1


MODULES = _modules()
IMPORTS = {m: {t for t, _ in _imports(m, p, MODULES) if t in MODULES and t not in (m, "hookchains")}
           for m, p in MODULES.items() if p.name != "__init__.py"}
EDGES = {m: {t for t in targets if MODULES[t].name != "__init__.py"} for m, targets in IMPORTS.items()}


def test_no_private_name_is_imported_across_modules():
    private = [f"{m} imports {t}.{n}" for m, p in MODULES.items() for t, n in _imports(m, p, MODULES)
               if n.startswith("_") and not n.startswith("__") and t != m]
    assert private == []


def test_no_import_cycle():
    def reaches(start, goal, seen):
        return any(t == goal or (t not in seen and not seen.add(t) and reaches(t, goal, seen)) for t in EDGES.get(start, ()))
    cycles = [m for m in EDGES if reaches(m, m, set())]
    assert cycles == []


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if _stage(m) >= 0))
def test_imports_point_down_the_data_path(module):
    upward = [t for t in IMPORTS[module] if _stage(t) > _stage(module)]
    assert upward == [], f"{module} imports from later stages: {upward}"
