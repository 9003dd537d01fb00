"""ComfyUI's own detection for a file, as the pack asks it in the ComfyUI process (nodes/host_model.py), without any
rank: the BaseModel (sampling type, conds) is the one ComfyUI's own loader builds for the file, its metadata
included."""
import pytest

import comfy_host

# preset -> (the BaseModel ComfyUI 0.33 builds, the diffusion model class); 0.3.75 has neither
METADATA_CLASSES = {"tiny-animate2": ("WAN_Animate2", "WanAnimate2Model"),
                    "tiny-flowrvs": ("WAN21_FlowRVS", "WanModel")}


@pytest.mark.parametrize("preset", list(METADATA_CLASSES))
def test_the_proxy_model_is_the_class_the_file_metadata_picks(tmp_path, pack, preset):
    """ComfyUI 0.33 picks Animate 2 and FlowRVS from the file's metadata config; the ComfyUI process's BaseModel
    must be that one (Animate 2's pose conds, FlowRVS' sampling type), not the plain Wan its keys alone suggest."""
    import comfy.model_base

    from parallel_backend.testing.synthetic import write_tiny_wan
    from parallel_backend.weights.reads import read_header

    base_name, model_name = METADATA_CLASSES[preset]
    if not hasattr(comfy.model_base, base_name):
        pytest.skip(f"this ComfyUI has no {base_name} (ComfyUI 0.3.75): its files are refused by class name")
    path = write_tiny_wan(str(tmp_path / f"{preset}.safetensors"), preset=preset, fill=0.0)
    host_model = comfy_host.import_pack().nodes.host_model
    model_config, sd, host_class = host_model.host_model_config("wan", path, "fp32", read_header(path))
    base = model_config.get_model(sd, "", device="meta")
    assert type(base).__name__ == base_name and host_class.__name__ == model_name
    assert host_model.detected_host_class(path, read_header(path)).endswith(f"({model_name})")


def test_minimax_h3_runs_where_the_host_has_the_class_and_is_refused_by_name_elsewhere(tmp_path, pack):
    """MiniMax H3 files: accepted on a ComfyUI with MiniMaxH3Model (0.33), refused before any rank starts on one
    without it (0.3.75), the refusal naming the missing class and what to change."""
    import comfy.supported_models

    from parallel_backend.testing.synthetic import write_tiny_minimax
    from parallel_backend.weights.reads import read_header

    path = write_tiny_minimax(str(tmp_path / "minimax_h3.safetensors"))
    host_model = comfy_host.import_pack().nodes.host_model
    if hasattr(comfy.supported_models, "MiniMaxH3"):
        host_model.refuse_unsupported_class("minimax_h3", path, read_header(path))
        assert host_model.host_model_config("minimax_h3", path, "fp32", read_header(path))[2].__name__ == \
            "MiniMaxH3Model"
        return
    assert comfy_host.comfyui_version() == "0.3.75"
    with pytest.raises(ValueError, match=r"minimax_h3.safetensors: this ComfyUI has no MiniMaxH3 model class .*update "
                                         r"ComfyUI"):
        host_model.refuse_unsupported_class("minimax_h3", path, read_header(path))


def test_an_ltx2_file_runs_where_the_host_has_ltxavmodel_and_is_refused_before_any_rank_elsewhere(tmp_path, pack):
    """An LTX-2 (audio + video) file in Parallel Model Loader: accepted on 0.33 (LTXAVModel, through the queue in
    tests/families/test_ltxav_workflow.py); on 0.3.75 (no LTXAVModel: it would build a video-only LTXVModel) refused
    in the ComfyUI process before any rank starts, naming the class and what to change."""
    from parallel_backend.models import ltxv
    from parallel_backend.testing.synthetic import write_tiny_ltxav
    from parallel_backend.weights.reads import read_header

    path = write_tiny_ltxav(str(tmp_path / "ltx2.safetensors"))
    host_model = comfy_host.import_pack().nodes.host_model
    if ltxv.host_has_class("LTXAVModel"):
        host_model.refuse_unsupported_class("ltxv", path, read_header(path))
        assert host_model.host_model_config("ltxv", path, "fp32", read_header(path))[2].__name__ == "LTXAVModel"
        return
    with pytest.raises(ValueError, match=r"ltx2.safetensors: its key .* LTXAVModel .* update ComfyUI"):
        host_model.refuse_unsupported_class("ltxv", path, read_header(path))
