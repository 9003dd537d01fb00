"""nodes/engine.py: the one place the nodes import the engine from, by the engine modules' plain names (the spawn trap
in README "How it works"): one module object per engine module, shared with the ranks' side of this process."""
import ast
import os
import sys

import pytest

NODES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "nodes")


def _engine_imports(name):
    """The parallel_backend modules a nodes file imports, and whether any import of it is relative to the pack."""
    tree = ast.parse(open(os.path.join(NODES, name)).read())
    named = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named.update(a.name for a in node.names if a.name.startswith("parallel_backend"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("parallel_backend"):
            named.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            named.add(f"{'.' * node.level}{node.module}")  # above nodes/: the pack's engine under another name
    return named


@pytest.mark.engine  # reads the source only
def test_only_engine_py_imports_the_engine_and_by_plain_names():
    files = sorted(f for f in os.listdir(NODES) if f.endswith(".py"))
    others = {f: _engine_imports(f) for f in files if f != "engine.py"}
    assert {f: m for f, m in others.items() if m} == {}, "nodes reach the engine through nodes/engine.py only"
    used = _engine_imports("engine.py")
    assert used and all(m.startswith("parallel_backend.") for m in used), used


def test_engine_modules_are_the_plain_named_ones(pack):
    engine = pack.nodes.engine
    for name in engine.__all__:
        module = getattr(engine, name)
        assert sys.modules[module.__name__] is module and module.__name__.startswith("parallel_backend."), name
