"""The tree's promises, checked on the source: the README's module tree matches the code, the product never
imports the test helpers, the engine never imports ComfyUI (family files may, inside a rank), and the nodes
never call torch.distributed."""
import ast
import os
import re

import pytest

pytestmark = pytest.mark.engine  # reads the source only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _py_files(top):
    for d, dirs, files in os.walk(os.path.join(REPO, top)):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                yield os.path.relpath(os.path.join(d, f), REPO)


def _imports(path):
    """Every module name an import statement in the file names (relative ones resolved)."""
    tree = ast.parse(open(os.path.join(REPO, path)).read())
    pkg = os.path.dirname(path).replace(os.sep, ".")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_readme_tree_lists_every_module_and_only_existing_ones():
    readme = open(os.path.join(REPO, "README.md")).read()
    block = readme.split("## Source tree", 1)[1].split("```", 2)[1]
    listed, stack = set(), []
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m or not re.match(r"^[\w.]+/?$", m.group(2)):
            continue
        depth, name = len(m.group(1)) // 2, m.group(2)
        stack[depth:] = [name.rstrip("/")]
        if name.endswith(".py"):
            listed.add("/".join(stack))
    code = {p for top in ("parallel_backend", "nodes") for p in _py_files(top) if not p.endswith("__init__.py")}
    assert code - listed == set(), f"modules missing from the README tree: {sorted(code - listed)}"
    stale = {p for p in listed if p.startswith(("parallel_backend/", "nodes/"))} - code
    assert stale == set(), f"README lists modules that do not exist: {sorted(stale)}"


def test_product_never_imports_test_helpers():
    product = [p for top in ("parallel_backend", "nodes") for p in _py_files(top)
               if not p.startswith("parallel_backend/testing/")] + ["__init__.py"]
    for path in product:
        bad = {m for m in _imports(path) if m and m.startswith("parallel_backend.testing")}
        assert not bad, f"{path} imports {bad}"


def test_engine_never_imports_comfyui_and_nodes_never_torch_distributed():
    host = ("comfy", "comfy_api", "folder_paths", "nodes", "server", "execution")
    for path in _py_files("parallel_backend"):
        if path.startswith(("parallel_backend/models/", "parallel_backend/testing/")):
            continue  # a family file may build the host's model class inside a rank
        bad = {m for m in _imports(path) if m and m.split(".")[0] in host}
        assert not bad, f"{path} imports ComfyUI: {bad}"
    for path in _py_files("nodes"):
        bad = {m for m in _imports(path) if m and m.startswith("torch.distributed")}
        assert not bad, f"{path} uses torch.distributed: {bad}"
