
import pytest
import torch

import comfy_host


@pytest.fixture
def no_new_processes():
    """The test starts no worker group and leaves no new child process (bad input refused in the nodes)."""
    import psutil

    import parallel_backend.runtime.group as group
    before = (group.starts, {c.pid for c in psutil.Process().children(recursive=True)})
    yield
    assert group.starts == before[0], "a worker group was started"
    new = {c.pid for c in psutil.Process().children(recursive=True)} - before[1]
    assert not [p for p in new if "resource_tracker" not in " ".join(psutil.Process(p).cmdline())]


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI imported in this process, with a models folder holding a tiny Wan."""
    folder_paths = comfy_host.import_comfy()
    from parallel_backend.testing.synthetic import write_tiny_wan
    d = tmp_path_factory.mktemp("diffusion_models")
    write_tiny_wan(str(d / "tiny_wan.safetensors"), seed=1)
    folder_paths.add_model_folder_path("diffusion_models", str(d))
    return {"models_dir": str(d), "folder_paths": folder_paths}


@pytest.fixture(scope="session")
def pack(comfy):
    return comfy_host.import_pack()


@pytest.fixture
def conds():
    g = torch.Generator().manual_seed(11)
    return [[torch.randn(1, 12, 4096, generator=g), {}]], [[torch.randn(1, 12, 4096, generator=g), {}]]


@pytest.fixture
def config_spec(pack):
    """The Parallel Config node's output for the given degrees (the node validates on the spot)."""
    def make(world_size=2, dtype="fp32", device="cpu", weights="auto", **degrees):
        d = {"cfg": 1, "ulysses": 1, "ring": 1, "tp": 1, "dp": 1, **degrees}
        return pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(world_size, d["cfg"], d["ulysses"], d["ring"],
                                                                 d["tp"], d["dp"], dtype, device, "sdpa",
                                                                 weights=weights)[0]
    return make
