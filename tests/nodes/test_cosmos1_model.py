"""The MODEL the loader builds for a Cosmos 1.0 file: ComfyUI's CosmosVideo BaseModel (from the family's config) whose
diffusion model is the pack's proxy. What ComfyUI's BaseModel hands GeneralDIT's forward reaches the group as the
ranks take it: the defaults GeneralDIT.forward passes on itself (data_type) are not conds, the text attention mask
and the frame rate cross, anything else is refused (here a stand-in group records the call: no rank starts)."""
import pytest
import torch

from parallel_backend.config import ParallelConfig
from parallel_backend.models import cosmos1
from parallel_backend.testing.synthetic import write_tiny_cosmos1
from parallel_backend.weights.reads import read_header


class _Group:
    def __init__(self):
        self.calls = []

    def model_key_for(self, path, precision):
        return (path, precision)

    def forward(self, x, t, ctx, **kw):
        self.calls.append((x, t, ctx, kw))
        return torch.zeros_like(x)


@pytest.fixture
def cosmos1_model(comfy, pack, tmp_path):
    path = write_tiny_cosmos1(str(tmp_path / "tiny_cosmos1_v2w.safetensors"), preset="tiny-v2w")
    header = read_header(path)
    info = cosmos1.model_shape(header).to_info()
    config = ParallelConfig(world_size=1, device="cpu", dtype="fp32")
    patcher = pack.nodes.model_patcher.build_model_patcher(config, path, "fp32", header, info)
    proxy = pack.nodes.proxy.parallel_model_of(patcher)
    group = _Group()
    proxy.group = lambda: group
    return patcher.model, proxy, group, pack.nodes.patches


def test_cosmos1_conds_cross_to_the_group(cosmos1_model):
    base, proxy, group, cm = cosmos1_model
    assert type(base).__name__ == "CosmosVideo" and type(base.model_config).__name__ == "CosmosI2V"
    assert proxy.class_name() == "GeneralDIT"
    x = torch.randn(1, 17, 2, 8, 8)
    ctx, mask = torch.randn(1, 12, 1024), torch.ones(1, 12)
    t = torch.tensor([0.5])
    base.diffusion_model(x, t, context=ctx, attention_mask=mask, fps=8.0, transformer_options={})
    (gx, gt, gctx, kw), = group.calls
    assert torch.equal(gx, x) and torch.equal(gctx, ctx) and torch.equal(kw["attention_mask"], mask)
    assert kw["values"] == {"fps": 8.0} and "data_type" not in kw and "data_type" not in kw["values"]
    # a frame rate the conditioning does not set is no cond at all
    base.diffusion_model(x, t, context=ctx, transformer_options={})
    assert group.calls[-1][3]["values"] == {} and "attention_mask" not in group.calls[-1][3]


def test_cosmos1_refuses_conds_its_ranks_do_not_take(cosmos1_model):
    base, _, group, cm = cosmos1_model
    x = torch.randn(1, 17, 2, 8, 8)
    refusal = r"\(GeneralDIT\).*'latent_condition'.*they take: attention_mask, fps, padding_mask"
    with pytest.raises(cm.UnsupportedPatchError, match=refusal):
        base.diffusion_model(x, torch.tensor([0.5]), context=torch.randn(1, 12, 1024),
                             latent_condition=torch.randn_like(x), transformer_options={})
    assert not group.calls


@pytest.mark.multirank
def test_loader_runs_cosmos1_on_the_group_as_comfyui_native(comfy, pack, config_spec):
    """Parallel Model Loader on a Cosmos 1.0 file: detected as the cosmos1 family (the parallel_plan output and the
    model info name it), ComfyUI's CosmosVideo BaseModel around the proxy; one model call through ComfyUI's
    BaseModel.apply_model on 2 ranks (ulysses 2) with the frame rate and the text mask set equals ComfyUI's native
    model on the same file."""
    import os

    from comfy_test_nodes import cosmos1_native

    import parallel_backend.runtime.group as group

    name = "tiny_cosmos1_t2w.safetensors"
    path = write_tiny_cosmos1(os.path.join(comfy["models_dir"], name), seed=3)
    try:
        model, plan = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load(name, "fp32",
                                                                             config_spec(world_size=2, ulysses=2))
        assert "ulysses=2" in plan and "for cosmos1 (4 heads, 2 blocks)" in plan, plan
        proxy = pack.nodes.proxy.parallel_model_of(model)
        assert proxy.info["family"] == "cosmos1" and type(model.model).__name__ == "CosmosVideo"
        g = torch.Generator().manual_seed(0)
        x, ctx = torch.randn(1, 16, 3, 6, 10, generator=g), torch.randn(1, 12, 1024, generator=g)
        mask = (torch.arange(12) < 9).float()[None]
        sigma = torch.tensor([2.0])
        conds = dict(c_crossattn=ctx, attention_mask=mask, fps=8.0)
        with torch.no_grad():
            out = model.model.apply_model(x, sigma, **conds)
            ref = cosmos1_native(path, 2, 4).apply_model(x, sigma, **conds)
        assert out.shape == ref.shape == x.shape
        diff = (out - ref).abs().max().item()
        print(f"loader + apply_model on 2 ranks (ulysses 2) vs ComfyUI native: {diff:.2e}")
        assert diff <= 1e-4 and ref.abs().mean() > 0.1
    finally:
        group.stop_all()
