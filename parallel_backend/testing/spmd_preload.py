"""Imported once by run_on_ranks' forkserver (CPU ranks, no CUDA on the machine): what every rank would import
anyway, so forked ranks start with it. ComfyUI's model code is imported only when a host is configured
($COMFYUI_PATH or an importable `comfy`), as models/host.py imports it in a rank."""
import importlib.util
import os

import torch  # noqa: F401
import torch.distributed  # noqa: F401

import parallel_backend.runtime.mesh  # noqa: F401
import parallel_backend.runtime.rendezvous  # noqa: F401

if importlib.util.find_spec("comfy") is not None or os.environ.get("COMFYUI_PATH"):
    from parallel_backend.models.host import import_host

    import_host("cpu")
    import comfy.ldm.wan.model  # noqa: F401
