"""The tree's promises, checked on the source: the README's module tree matches the code, the product never
imports the test helpers, the engine never imports ComfyUI (family files may, inside a rank), the nodes
never call torch.distributed, the engine's imports run down its layers with no cycle, and no product function is
longer than a reader can hold at once."""
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


def _engine_graph():
    """parallel_backend's modules -> the parallel_backend modules each imports (anywhere in the file)."""
    modules = {}
    for path in _py_files("parallel_backend"):
        name = path[:-3].replace(os.sep, ".").removesuffix(".__init__")
        modules[name] = path
    return {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}


# the engine's layers, lowest first: a module imports only from its own layer or a lower one
ENGINE_LAYERS = ("config", "parallel", "weights", "models", "planner", "runtime", "testing")
# config validates the attention backend by asking the kernels which package is missing (a leaf module)
LAYER_EXCEPTIONS = {("parallel_backend.config", "parallel_backend.parallel.kernels")}


def _layer(module):
    parts = module.split(".")
    return ENGINE_LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in ENGINE_LAYERS else -1


def test_engine_imports_run_down_the_layers_only():
    upward = sorted((m, i) for m, imports in _engine_graph().items() for i in imports
                    if _layer(i) > _layer(m) and (m, i) not in LAYER_EXCEPTIONS)
    assert upward == [], f"arrows that run up {ENGINE_LAYERS}: {upward}"


def test_engine_has_no_import_cycle():
    graph, done, stack = _engine_graph(), set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for i in sorted(graph[m]):
            visit(i)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


MAX_FUNCTION_LINES = 80


def test_product_functions_are_short_enough_to_read_at_once():
    long = []
    for path in [p for top in ("parallel_backend", "nodes") for p in _py_files(top)
                 if not p.startswith(os.path.join("parallel_backend", "testing"))]:
        for node in ast.walk(ast.parse(open(os.path.join(REPO, path)).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    assert long == [], f"split these (at most {MAX_FUNCTION_LINES} lines each): {long}"
