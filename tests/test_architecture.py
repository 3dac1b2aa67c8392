"""The layout stays changeable: no import cycle in the package, no private name imported from
another module, and the model modules have one forward each (no grad-mode switch, no
module-level mutable state)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dist_video"
MODEL_MODULES = ["clip", "dist", "model", "baselines", "classifier", "fused", "folding", "reference"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """Every ``dist_video`` module that ``path`` imports (at any depth: function-level imports
    are part of the graph too), with the names it takes from it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dist_video":
                continue
            names = [a.name for a in node.names]
            # ``from . import x`` may name a submodule
            submodules = [f"{target}.{n}" for n in names if (PACKAGE.parent / f"{target}.{n}".replace(".", "/")).
                          with_suffix(".py").exists() or (PACKAGE.parent / f"{target}.{n}".replace(".", "/")).is_dir()]
            found.append((target, [n for n in names if f"{target}.{n}" not in submodules]))
            found.extend((s, []) for s in submodules)
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name.split(".")[0] == "dist_video")
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # importing a.b.c runs a and a.b first: the package __init__ files are not edges of their own
        edges[name] = {t for t, _ in imports_of(path) if t in modules and t != name and not name.startswith(t + ".")}
    return edges


def test_the_package_has_no_import_cycle():
    edges = graph()
    assert "dist_video.fused" in edges and "dist_video.dist" in edges["dist_video.fused"]
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt == "dist_video":  # the package root re-exports; importing it from inside is a cycle too
                pytest.fail(f"{node} imports the package root dist_video")
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if not state.get(nxt):
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node != "dist_video" and not state.get(node):
            visit(node)


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for target, names in imports_of(path):
            offenders += [f"{module_name(path)}: from {target} import {n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
    assert not offenders, offenders


@pytest.mark.parametrize("module", MODEL_MODULES)
def test_model_modules_have_one_forward_and_no_module_state(module):
    source = (PACKAGE / f"{module}.py").read_text()
    tree = ast.parse(source)
    assert "is_grad_enabled" not in source
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)], "a function rebinds module state"
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) and node.value is not None else []
        for target in targets:
            name = getattr(target, "id", "")
            mutable = isinstance(node.value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp))
            # an upper-case table (PRESETS, ARCHITECTURES) is a constant; anything else is state
            constant = name.isupper() or (name.startswith("__") and name.endswith("__"))
            assert not (mutable and not constant), f"{module}.{name} is module-level mutable state"


def test_importing_the_package_loads_no_video_decoder():
    """``import dist_video`` works where PyAV is missing (an offline GPU node before its wheels
    arrive): the decoders are imported by what uses them."""
    import subprocess
    import sys

    blocker = ("import sys\n"
               "class NoAV:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'av' or name.startswith('av.'):\n"
               "            raise ImportError('av is blocked')\n"
               "sys.meta_path.insert(0, NoAV())\n"
               "import dist_video\n"
               "print(sorted(m for m in sys.modules if m.split('.')[0] in ('av', 'decord', 'torchcodec')))\n")
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
