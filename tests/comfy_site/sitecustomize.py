"""Test-only start-up hook for a headless ComfyUI and the ranks it spawns (comfy_host.tiny_vae_env puts this folder on
PYTHONPATH and the widths in $PDIT_TEST_VAE_WIDTHS). ComfyUI's detection builds the Wan 2.2 VAE (160 / 256 wide:
705 M parameters), HunyuanVideo's VAEs (1.0: 128; 1.5: 1024) and Cosmos 1.0's tokenizer (128) at their release widths
whatever the file holds;
here they are built at the tiny files' widths (parallel_backend.testing.synthetic's TINY_* widths, the same
narrowing as synthetic.tiny_vae_widths), ComfyUI's own classes and code otherwise, in every process that imports
them (server and ranks alike, so native and parallel runs load the same model)."""
import importlib.abc
import importlib.util
import json
import os
import sys


def _narrow_wan22(module, widths: dict):
    real = module.WanVAE

    def WanVAE(**kwargs):  # noqa: N802 - stands in for the class under its name (comfy.sd calls it with keywords)
        return real(**{**kwargs, **widths["wan22"]})
    module.WanVAE = WanVAE


def _narrow_hunyuan(module, widths: dict):
    kl, engine = module.AutoencoderKL, module.AutoencodingEngine

    def AutoencoderKL(ddconfig, **kwargs):  # noqa: N802
        if ddconfig.get("conv3d"):  # HunyuanVideo 1.0's VAE (Kandinsky 5's): the only 3-D one of this class
            ddconfig = {**ddconfig, **widths["hunyuan_video"]}
        return kl(ddconfig=ddconfig, **kwargs)

    def AutoencodingEngine(**kwargs):  # noqa: N802
        for part in ("encoder_config", "decoder_config"):
            if kwargs[part]["target"].startswith("comfy.ldm.hunyuan_video.vae_refiner."):
                kwargs[part] = {**kwargs[part], "params": {**kwargs[part]["params"], **widths["hunyuan_video15"]}}
        return engine(**kwargs)
    module.AutoencoderKL, module.AutoencodingEngine = AutoencoderKL, AutoencodingEngine


def _narrow_cosmos1(module, widths: dict):
    real = module.CausalContinuousVideoTokenizer

    def CausalContinuousVideoTokenizer(**kwargs):  # noqa: N802
        return real(**{**kwargs, **widths["cosmos1"]})
    module.CausalContinuousVideoTokenizer = CausalContinuousVideoTokenizer


NARROW = {"comfy.ldm.wan.vae2_2": _narrow_wan22, "comfy.sd": _narrow_hunyuan, "comfy.ldm.cosmos.vae": _narrow_cosmos1}


class _NarrowOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, widths: dict):
        self.widths, self.pending = widths, set(NARROW)

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        self.pending.discard(name)
        sys.meta_path.remove(self)  # find the real module (then back, while another is pending)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            if self.pending:
                sys.meta_path.insert(0, self)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            NARROW[name](module, self.widths)
        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("PDIT_TEST_VAE_WIDTHS"):
    sys.meta_path.insert(0, _NarrowOnImport(json.loads(os.environ["PDIT_TEST_VAE_WIDTHS"])))
