"""Access to parallel_backend by its plain module name (see the pack's __init__.py for why)."""
import importlib
import os
import sys

CATEGORY = "parallel_dit"
CONFIG_TYPE = "PARALLEL_CONFIG"


def backend(name: str):
    """Import `parallel_backend.<name>` by its plain name, making the pack folder importable first."""
    pack = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if pack not in sys.path:
        sys.path.append(pack)
    return importlib.import_module(f"parallel_backend.{name}")
