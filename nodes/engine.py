"""The engine modules the nodes use, imported here by their plain names so a reader (and an IDE) sees every arrow
from the nodes into parallel_backend: `from . import engine`, then `engine.group.get_group(...)`.

Plain names, never relative imports: the worker ranks are spawned processes that import
`parallel_backend.runtime.worker` by that name, while ComfyUI imports this pack under its folder path; a module
imported twice under two names would hold two registries of warm groups and pickle its classes under a name the
ranks cannot resolve (README "How it works"). Importing these starts no process and reads no file.
"""
import os
import sys

_PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _PACK not in sys.path:  # the pack's __init__.py does this first; kept for a nodes module imported on its own
    sys.path.append(_PACK)  # appended: never shadows ComfyUI's own top-level `nodes`

import parallel_backend.config as config  # noqa: E402
import parallel_backend.models as models  # noqa: E402
import parallel_backend.models.host as host  # noqa: E402
import parallel_backend.planner as planner  # noqa: E402
import parallel_backend.runtime.group as group  # noqa: E402
import parallel_backend.runtime.multinode as multinode  # noqa: E402
import parallel_backend.runtime.rank as rank  # noqa: E402
import parallel_backend.runtime.sharded_model as sharded_model  # noqa: E402
import parallel_backend.weights.fp8 as fp8  # noqa: E402
import parallel_backend.weights.lora as lora  # noqa: E402
import parallel_backend.weights.reads as reads  # noqa: E402
import parallel_backend.models.vae as vae  # noqa: E402

__all__ = ["config", "fp8", "group", "host", "lora", "models", "multinode", "planner", "rank", "reads", "sharded_model", "vae"]
