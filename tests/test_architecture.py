"""The floors of the code base: one import direction, and the library never imports a recipe.

base (``mammorg`` without ``mammorg.app``) < terminology < evaluation < stage1_classification <
stage2_sft < application (``mammorg.app``, ``mammorg.__main__``). A module may import its own
floor and the floors below, never one above; imports inside functions count too. Recipes
(``train``, ``predict``, ``generate``, ``pretrain`` of the stage packages) are imported only by
other recipes of their package and by the application layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ["base", "terminology", "evaluation", "stage1_classification", "stage2_sft", "app"]
PACKAGES = ["mammorg", "terminology", "evaluation", "stage1_classification", "stage2_sft"]
RECIPES = {
    "stage1_classification.train",
    "stage1_classification.predict",
    "stage2_sft.train",
    "stage2_sft.generate",
    "stage2_sft.pretrain",
}


def floor_of(module: str) -> str | None:
    top = module.split(".")[0]
    if top == "mammorg":
        return "app" if module.startswith(("mammorg.app", "mammorg.__main__")) else "base"
    return top if top in FLOORS else None


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_imports_only_go_down_the_floors():
    wrong = []
    for module, path in modules().items():
        here = FLOORS.index(floor_of(module) or "app")
        for line, target in imports(path):
            there = floor_of(target)
            if there is not None and FLOORS.index(there) > here:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({floor_of(module)}) imports {target} ({there})")
    assert not wrong, "imports going up a floor:\n" + "\n".join(sorted(set(wrong)))


def test_the_library_never_imports_a_recipe():
    wrong = []
    for module, path in modules().items():
        if floor_of(module) == "app" or module in RECIPES:
            continue
        wrong += [
            f"{path.relative_to(ROOT)}:{line} imports {target}" for line, target in imports(path) if target in RECIPES
        ]
    assert not wrong, "library modules importing recipes:\n" + "\n".join(wrong)


def test_no_module_selects_a_matplotlib_backend_at_import():
    for module, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only, not inside functions
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            text = ast.unparse(node)
            assert "matplotlib.use(" not in text, f"{module} picks a matplotlib backend at import"
