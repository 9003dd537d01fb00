"""The nodes' category and the config type they pass. `backend(name)` is the old string access to the engine, left only
for the loader's planning functions (resolve_config, model_bytes, ...: they move to parallel_backend/planner.py);
every other node imports nodes/engine.py."""
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
