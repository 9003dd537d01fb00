"""ComfyUI entry point of the parallel DiT pack. Importing it starts no process and loads no model."""
import os
import sys

# Worker ranks are spawned processes that import `parallel_backend.runtime.worker` by that plain name, while
# ComfyUI imports this pack under its folder path; so the pack folder must be importable by name.
# Appended (not prepended) so it never shadows ComfyUI's own top-level `nodes` module.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)

if __package__:  # imported as a package (ComfyUI, the tests' import_pack): the nodes
    from .nodes import NODE_CLASS_MAPPINGS as _CLASSIC  # noqa: E402
    from .nodes import NODE_DISPLAY_NAME_MAPPINGS
    from .nodes.schema import register as _register  # noqa: E402

    # V3 (comfy_api) node classes where the host offers them, the classic ones otherwise
    NODE_CLASS_MAPPINGS = _register(_CLASSIC, NODE_DISPLAY_NAME_MAPPINGS)
else:  # the file alone (pytest's importlib mode does that to a checkout whose folder name is no Python name)
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
