"""The import contract that encodes the house's layering, read from the source (no imports run).

- The engine never imports the app or textual; the CLI's bare command (engine/cli/main.py) is the one
  way up, and only lazily, inside the function that opens the app.
- The app never imports the training stack, not even lazily (tests/test_import_hygiene.py also checks
  what each module drags in at run time).
- Screens never import other screens: the app alone knows the order of the steps (tui/navigation.py).
- No import circles among the app's modules or the engine's.
Imports under `if TYPE_CHECKING:` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

TRAINING_STACK = {"torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "liger_kernel",
                  "triton"}
FOLDERS = {"engine": "tunewiz.engine", "tui": "tunewiz.tui"}
WAY_UP = "tunewiz.engine.cli.main"
SCREEN_BASES = {"tunewiz.tui.screens", "tunewiz.tui.screens.base"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports, resolved to a module where the name is one
    line: int
    lazy: bool  # inside a function


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([FOLDERS[parts[0]], *parts[1:]])


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, lazy: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _walk(other, lazy)
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, lazy
        yield from _walk(child, lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    found = []
    for node, lazy in _walk(ast.parse(path.read_text(), str(path)), lazy=False):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            assert node.level == 0, f"{path}:{node.lineno}: relative import; the house uses absolute ones"
            base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        found += [Import(module, target, node.lineno, lazy) for target in targets]
    return found


MODULES = all_modules()
IMPORTS = [imp for name, path in MODULES.items() for imp in imports_of(name, path, set(MODULES))]


def _top(target: str) -> str:
    return target.partition(".")[0]


def test_the_contract_sees_the_code() -> None:
    assert {"tunewiz.engine.run.worker", "tunewiz.tui.app", "tunewiz.tui.screens.dashboard"} <= set(MODULES)
    assert any(i.module == WAY_UP and i.target.startswith("tunewiz.tui") and i.lazy for i in IMPORTS)
    assert any(i.module == "tunewiz.engine.training.trainer" and _top(i.target) == "torch" for i in IMPORTS)


def test_the_engine_never_imports_the_app_or_textual() -> None:
    wrong = [i for i in IMPORTS if i.module.startswith("tunewiz.engine")
             and (_top(i.target) == "textual" or i.target.startswith("tunewiz.tui"))
             and not (i.module == WAY_UP and i.lazy and i.target.startswith("tunewiz.tui"))]
    assert not wrong, "\n".join(f"{MODULES[i.module]}:{i.line} imports {i.target}" for i in wrong)


def test_the_app_never_imports_the_training_stack() -> None:
    wrong = [i for i in IMPORTS if i.module.startswith("tunewiz.tui") and _top(i.target) in TRAINING_STACK]
    assert not wrong, "\n".join(f"{MODULES[i.module]}:{i.line} imports {i.target}" for i in wrong)


def test_screens_never_import_other_screens() -> None:
    screens = {m for m in MODULES if m.startswith("tunewiz.tui.screens.")} - SCREEN_BASES
    wrong = [i for i in IMPORTS if i.module in screens and i.target in screens and i.target != i.module]
    assert not wrong, "\n".join(f"{MODULES[i.module]}:{i.line} imports {i.target}" for i in wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in `graph`, or None."""
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


@pytest.mark.parametrize("package", ["tunewiz.tui", "tunewiz.engine"])
def test_no_import_circles(package: str) -> None:
    graph: dict[str, set[str]] = {}
    for i in IMPORTS:  # a package's own __init__ is not an edge: importing a submodule always runs it
        if i.module.startswith(package) and i.target.startswith(package) and i.target in MODULES \
                and i.target != i.module and not i.module.startswith(i.target + "."):
            graph.setdefault(i.module, set()).add(i.target)
    circle = _cycle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def _script_guard_is_last(tree: ast.Module) -> bool:
    """Whether an `if __name__ == "__main__":` block, if any, is the module's last statement: a definition after
    it does not exist yet when the script runs (bench.profile_step's `--memory` once failed on a NameError so)."""
    guards = [index for index, node in enumerate(tree.body) if isinstance(node, ast.If)
              and isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name)
              and node.test.left.id == "__name__"]
    return all(index == len(tree.body) - 1 for index in guards)


def test_script_guards_come_last() -> None:
    scripts = [path for folder in ("engine", "tui", "bench", "tools") for path in (ROOT / folder).rglob("*.py")]
    late = [str(path.relative_to(ROOT)) for path in scripts if not _script_guard_is_last(ast.parse(path.read_text()))]
    assert late == [], f"definitions after `if __name__ == '__main__':` in {late}"


def test_the_guard_check_sees_a_late_definition() -> None:
    assert not _script_guard_is_last(ast.parse('if __name__ == "__main__":\n    main()\ndef main(): ...\n'))
    assert _script_guard_is_last(ast.parse('def main(): ...\nif __name__ == "__main__":\n    main()\n'))
