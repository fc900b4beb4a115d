"""The house's rules, read from the package's own import statements (function-level imports included).

Imports only go down: cli -> server -> tools -> methods -> models -> the ground floor (errors, progress,
settings, prompts). There is no import circle, only `server/` imports the MCP SDK, a tool module is plain:
no torch and no other tool, only the shared kernel (`tools/base.py`, `tools/render.py`), and the laboratory
(`lab/`, not in the wheel) is never imported when a product module is.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import pictoprompt

PACKAGE_DIR = Path(pictoprompt.__file__).resolve().parent
PYPROJECT = PACKAGE_DIR.parent / "pyproject.toml"

FLOORS = {
    "pictoprompt.cli": 5,
    "pictoprompt.server": 4,
    "pictoprompt.tools": 3,
    "pictoprompt.methods": 2,
    "pictoprompt.models": 1,
}
"""Anything else in the package (errors, progress, settings, prompts, the root) is the ground floor, 0."""

TOOL_KERNEL = {"pictoprompt.tools", "pictoprompt.tools.base", "pictoprompt.tools.render"}
TENSOR_LIBRARIES = {"torch", "diffusers", "transformers", "open_clip"}

OPTIONAL_IMPORTS = {
    "pictoprompt.server.demo": {"skimage": "demo"},
    "pictoprompt.server.ray_serve": {"ray": "ray"},
}
"""Third-party imports that only an extra provides, by module: the demo's photos and the serving on Ray Serve."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def imports_of(module: str) -> Iterator[str]:
    """Every module `module` imports, at any depth of its code: `from a import b` yields a.b when that is a module."""
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module} uses a relative import"
            base = node.module or ""
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)


def package_imports(module: str) -> set[str]:
    return {name for name in imports_of(module) if name in MODULES and name != module}


def floor(module: str) -> int:
    matches = [prefix for prefix in FLOORS if module == prefix or module.startswith(prefix + ".")]
    return FLOORS[max(matches, key=len)] if matches else 0


def test_the_rules_see_every_floor():
    floors = {floor(module) for module in MODULES}
    assert floors == {0, 1, 2, 3, 4, 5}
    assert package_imports("pictoprompt.models.runtime") >= {
        "pictoprompt.models.llm_loading",
        "pictoprompt.models.profiles",
    }


def test_imports_only_go_down():
    upward = [
        f"{module} (floor {floor(module)}) imports {imported} (floor {floor(imported)})"
        for module in MODULES
        for imported in package_imports(module)
        if floor(imported) > floor(module)
    ]
    assert upward == []


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of `graph`, those with more than one module or a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    graph = {module: package_imports(module) for module in MODULES}
    assert strongly_connected(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_server_floor_imports_the_mcp_sdk():
    outside = [
        f"{module} imports {name}"
        for module in MODULES
        if floor(module) != FLOORS["pictoprompt.server"]
        for name in imports_of(module)
        if name.split(".")[0] in {"mcp", "mcp_types"}
    ]
    assert outside == []


def test_tool_modules_are_plain():
    tools = [module for module in MODULES if module.startswith("pictoprompt.tools.") and module not in TOOL_KERNEL]
    assert len(tools) >= 8
    impure = [
        f"{module} imports {name}"
        for module in tools
        for name in imports_of(module)
        if name.split(".")[0] in TENSOR_LIBRARIES
        or (name.startswith("pictoprompt.tools") and name in MODULES and name not in TOOL_KERNEL)
    ]
    assert impure == []
    for kernel in TOOL_KERNEL - {"pictoprompt.tools"}:
        # The kernel too hands tensors on without touching them: tensor work lives in methods/.
        assert not {name.split(".")[0] for name in imports_of(kernel)} & TENSOR_LIBRARIES, kernel


def module_level_imports(tree: ast.Module) -> Iterator[str]:
    """The modules a file imports when it is itself imported: every import outside a function body."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            todo.extend(ast.iter_child_nodes(node))


def test_no_product_module_imports_the_lab_at_module_level():
    importing = [
        f"{module} imports {name}"
        for module, path in MODULES.items()
        for name in module_level_imports(ast.parse(path.read_text()))
        if name.split(".")[0] == "lab"
    ]
    assert importing == []


def test_the_lab_import_finder_sees_guarded_imports():
    tree = ast.parse("import os\nif True:\n    from lab.shapes import train\ndef f():\n    import lab.real_size\n")
    assert sorted(module_level_imports(tree)) == ["lab.shapes", "os"]


# ------------------------------------------------------------------------------------------------ dependencies


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalise(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]) for requirement in requirements}


PROJECT = tomllib.loads(PYPROJECT.read_text())["project"] if PYPROJECT.is_file() else None
needs_checkout = pytest.mark.skipif(PROJECT is None, reason="pyproject.toml is only in a checkout")


def third_party(module: str) -> set[str]:
    names = {name.split(".")[0] for name in imports_of(module)}
    return {name for name in names if name not in sys.stdlib_module_names and name != "pictoprompt"}


@needs_checkout
def test_every_runtime_import_is_a_declared_dependency():
    assert PROJECT is not None
    declared = requirement_names(PROJECT["dependencies"])
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for module in MODULES:
        optional = OPTIONAL_IMPORTS.get(module, {})
        for name in third_party(module):
            allowed = (
                declared | requirement_names(PROJECT["optional-dependencies"][optional[name]])
                if (name in optional)
                else declared
            )
            if not {normalise(d) for d in distributions.get(name, [name])} & allowed:
                undeclared.append(f"{module} imports {name}")
    assert undeclared == []


def needs_an_extra_to_import(module: str) -> bool:
    """Whether `module`'s own top-level statements import something only an extra provides."""
    top = [
        node for node in ast.parse(MODULES[module].read_text()).body if isinstance(node, ast.Import | ast.ImportFrom)
    ]
    names = {
        (alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
        for node in top
        for alias in node.names
    }
    return bool(names & set(OPTIONAL_IMPORTS.get(module, {})))


def top_level_package_imports(module: str) -> set[str]:
    """The package modules `module` imports when it is itself imported (not inside a function)."""
    names = set()
    for node in ast.parse(MODULES[module].read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {node.module or ""} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in MODULES and name != module}


def test_no_runtime_module_needs_an_extra():
    assert not needs_an_extra_to_import("pictoprompt.server.demo"), "the demo asks for its extra when it needs it"
    # The server reaches Ray Serve only when asked to serve on it, and says how to install it otherwise.
    assert needs_an_extra_to_import("pictoprompt.server.ray_serve")
    assert "pictoprompt.server.ray_serve" in package_imports("pictoprompt.server.app")
    users = [
        f"{module} imports {imported}"
        for module in MODULES
        for imported in top_level_package_imports(module)
        if needs_an_extra_to_import(imported)
    ]
    assert users == []


@needs_checkout
@pytest.mark.parametrize(
    ("distribution", "floor_version", "why"),
    [("diffusers", (0, 40), "from_pretrained(dtype=...)"), ("transformers", (4, 56), "from_pretrained(dtype=...)")],
)
def test_dependency_floors_cover_what_the_code_uses(distribution, floor_version, why):
    assert PROJECT is not None
    requirement = next(r for r in PROJECT["dependencies"] if normalise(r).startswith(distribution))
    declared = tuple(int(part) for part in re.search(r">=([\d.]+)", requirement).group(1).split("."))
    assert declared >= floor_version, f"{distribution} needs >= {floor_version} for {why}"
    installed = tuple(int(part) for part in re.findall(r"\d+", importlib.metadata.version(distribution))[:2])
    assert installed >= floor_version


# ------------------------------------------------------------------------------------------------ the tests' own rules

TESTS_DIR = Path(__file__).resolve().parent


def test_no_test_module_imports_another():
    modules = {path.stem for path in TESTS_DIR.glob("*.py")}
    crossing = [
        f"{path.name} imports {name}"
        for path in sorted(TESTS_DIR.glob("test_*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in ([alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        if name.split(".")[0] in modules
    ]
    assert crossing == [], "share helpers through conftest.py fixtures"


def test_no_test_expects_just_any_exception():
    broad = [
        f"{path.name}:{node.lineno}"
        for path in sorted(TESTS_DIR.glob("test_*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and ast.unparse(node.func) == "pytest.raises"
        and node.args
        and ast.unparse(node.args[0]) in {"Exception", "BaseException"}
    ]
    assert broad == [], "name the error type the code raises"
