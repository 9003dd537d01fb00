"""Test-only start-up hook for a headless ComfyUI and the ranks it spawns (comfy_host.tiny_wan22_vae_env puts this
folder on PYTHONPATH and the widths in $PDIT_TEST_WAN22_VAE_WIDTHS). ComfyUI's detection builds the Wan 2.2 VAE at
its release widths (160 / 256: 705 M parameters) whatever the file holds; here `comfy.ldm.wan.vae2_2.WanVAE` is built
at the tiny file's widths, its own class and code otherwise, in every process that imports it (server and ranks
alike, so native and parallel runs load the same model)."""
import importlib.abc
import importlib.util
import json
import os
import sys

TARGET = "comfy.ldm.wan.vae2_2"


def _narrow(module, widths: dict):
    real = module.WanVAE

    def WanVAE(**kwargs):  # noqa: N802 - stands in for the class under its name (comfy.sd calls it with keywords)
        return real(**{**kwargs, **widths})
    module.WanVAE = WanVAE


class _NarrowOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, widths: dict):
        self.widths = widths

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # once: find the real module, run it, then narrow its class
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _narrow(module, self.widths)
        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("PDIT_TEST_WAN22_VAE_WIDTHS"):
    sys.meta_path.insert(0, _NarrowOnImport(json.loads(os.environ["PDIT_TEST_WAN22_VAE_WIDTHS"])))
