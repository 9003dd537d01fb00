"""ComfyUI entry point of the parallel DiT pack. Importing it starts no process and loads no model."""
import os
import sys

# Worker ranks are spawned processes that import `parallel_backend.worker` by that plain name, while
# ComfyUI imports this pack under its folder path; so the pack folder must be importable by name.
# Appended (not prepended) so it never shadows ComfyUI's own top-level `nodes` module.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
