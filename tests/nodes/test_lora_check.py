"""nodes/lora_check.py in-process: a LoRA mapped onto the pack's model from the headers, as the ranks map it, before
any rank exists (no worker group starts here). The end-to-end cases (the log through a real server, parity with the
native loader, the copy after Unload) are in tests/e2e/test_lora_queue.py."""
import logging
import os
import sys

import pytest


def _lora_check(pack):
    return sys.modules[pack.__name__ + ".nodes.lora_check"]


class _Proxy:
    def __init__(self, path):
        self.path, self.precision = path, "fp32"


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    from parallel_backend.testing.synthetic import write_tiny_wan, write_wan_lora
    d = tmp_path_factory.mktemp("lora_check")
    model = os.path.join(comfy["models_dir"], "tiny_wan.safetensors")
    four = write_tiny_wan(str(d / "four.safetensors"), num_layers=4)
    wide = write_tiny_wan(str(d / "wide.safetensors"), dim=1024, ffn_dim=2048)
    for name, src in (("full", model), ("four", four), ("wide", wide)):
        write_wan_lora(str(d / f"{name}_lora.safetensors"), src, rank=4, alpha=2.0, seed=3)
    return {"model": model, **{k: str(d / f"{k}_lora.safetensors") for k in ("full", "four", "wide")}}


def test_partial_lora_is_logged_as_comfyui_does_and_counted(comfy, pack, files, caplog, no_new_processes):
    check = _lora_check(pack).check_lora
    with caplog.at_level(logging.WARNING):
        report = check(_Proxy(files["model"]), files["four"], 0.8)
    print(report)
    assert report.startswith("four_lora.safetensors at strength 0.8: 60 of 120 LoRA tensors applied; 60 match no ")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lora key not loaded: ")]
    assert len(lines) == 60 and all(".blocks.2." in ln or ".blocks.3." in ln for ln in lines)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert check(_Proxy(files["model"]), files["full"], 1.0).endswith("60 of 60 LoRA tensors applied")
    assert not caplog.records  # a LoRA that fully applies says nothing


def test_lora_of_another_width_is_refused_before_any_rank(comfy, pack, files, no_new_processes):
    from parallel_backend.weights.lora import LoraError
    with pytest.raises(LoraError, match=r"has up \(1024, 4\) / down \(4, 1024\), which do not fit the model's "
                                        r"blocks\.0\.\S+ of shape \(512, 512\): this LoRA was trained for another"):
        _lora_check(pack).check_lora(_Proxy(files["model"]), files["wide"], 1.0)


def test_native_loader_tensors_are_checked_without_a_file_and_written_per_group(comfy, pack, files, tmp_path,
                                                                                 no_new_processes):
    """A native loader's LoRA is checked from its tensors (no file yet); its file is written into the folder of the
    group that needs it, once, and again for another group."""
    import comfy.utils
    mod = _lora_check(pack)
    tensors = mod.LoraTensors(comfy.utils.load_torch_file(files["four"]))
    assert "60 of 120" in mod.check_lora(_Proxy(files["model"]), tensors, 1.0)

    class _Group:
        def __init__(self, d):
            self.d = d

        def scratch_dir(self, name):
            os.makedirs(os.path.join(self.d, name), exist_ok=True)
            return os.path.join(self.d, name)
    first = mod.lora_path(tensors, _Group(str(tmp_path / "g1")))
    assert first == mod.lora_path(tensors, _Group(str(tmp_path / "g1")))  # written once per group
    second = mod.lora_path(tensors, _Group(str(tmp_path / "g2")))
    assert os.path.dirname(first) == str(tmp_path / "g1" / "loras")
    assert os.path.dirname(second) == str(tmp_path / "g2" / "loras")
    from safetensors.torch import load_file
    written = load_file(second)
    assert written.keys() == tensors.tensors.keys() and all((written[k] == v).all() for k, v in tensors.tensors.items())
    assert mod.lora_path(files["full"], None) == files["full"]  # a models/loras file is used where it is
