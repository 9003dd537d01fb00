"""The MODEL the loader builds for a Cosmos 1.0 file: ComfyUI's CosmosVideo BaseModel (from the family's config) whose
diffusion model is the pack's proxy. What ComfyUI's BaseModel hands GeneralDIT's forward reaches the group as the
ranks take it: the defaults GeneralDIT.forward passes on itself (data_type) are not conds, the text attention mask
and the frame rate cross, anything else is refused (here a stand-in group records the call: no rank starts)."""
import sys

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
    cm = sys.modules[pack.__name__ + ".nodes.comfy_model"]
    path = write_tiny_cosmos1(str(tmp_path / "tiny_cosmos1_v2w.safetensors"), preset="tiny-v2w")
    header = read_header(path)
    info = cosmos1.model_shape(header).to_info()
    config = ParallelConfig(world_size=1, device="cpu", dtype="fp32")
    patcher = cm.build_model_patcher(config, path, "fp32", header, info)
    proxy = cm.parallel_model_of(patcher)
    group = _Group()
    proxy.group = lambda: group
    return patcher.model, proxy, group, cm


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
