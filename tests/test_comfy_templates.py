"""comfy_templates' UI -> API conversion on small hand-made graphs: subgraph instances expanded as ComfyUI's
frontend queues them, V3 dynamic combo widgets. (The templates themselves run in tests/families/test_templates.py.)"""
import comfy_templates as ct
import pytest

pytestmark = pytest.mark.engine  # no ComfyUI: a hand-made /object_info

INFO = {
    "Const": {"input": {"required": {"value": ["INT", {}]}}},
    "Scale": {"input": {"required": {"x": ["INT", {}], "factor": ["FLOAT", {}],
                                     "seed": ["INT", {"control_after_generate": True}]}},
              "input_order": {"required": ["x", "factor", "seed"]}},
    "Show": {"input": {"required": {"x": ["INT", {}]}}},
    "Resize": {"input": {"required": {
        "image": ["IMAGE", {}],
        "mode": ["COMFY_DYNAMICCOMBO_V3", {"options": [
            {"key": "dims", "inputs": {"required": {"width": ["INT", {}], "height": ["INT", {}]}}},
            {"key": "factor", "inputs": {"required": {"f": ["FLOAT", {}]}}}]}],
        "method": [["area", "nearest"], {}]}}},
}


def _in(name, link, kind="INT", widget=True):
    return {"name": name, "type": kind, "link": link, **({"widget": {"name": name}} if widget else {})}


def _link(i, origin, oslot, target, tslot, kind="INT"):
    return {"id": i, "origin_id": origin, "origin_slot": oslot, "target_id": target, "target_slot": tslot,
            "type": kind}


# "Inner": an input `v` feeding one Scale node, its output the definition's output
INNER = {"id": "sg-inner", "name": "Inner",
         "inputs": [{"name": "v", "type": "INT", "linkIds": [20]}], "outputs": [{"name": "out", "linkIds": [21]}],
         "nodes": [{"id": 7, "type": "Scale", "mode": 0, "inputs": [_in("x", 20)],
                    "widgets_values": [0, 2.0, 5, "randomize"]}],
         "links": [_link(20, -10, 0, 7, 0), _link(21, 7, 0, -20, 0)]}
# "Outer": inputs x / factor / seed promoted from a Scale node, whose output goes through a nested Inner instance
OUTER = {"id": "sg-outer", "name": "Outer",
         "inputs": [{"name": "x", "type": "INT", "linkIds": [10]}, {"name": "factor", "type": "FLOAT", "linkIds": [11]},
                    {"name": "seed", "type": "INT", "linkIds": [12]}],
         "outputs": [{"name": "out", "linkIds": [13]}],
         "nodes": [{"id": 1, "type": "Scale", "mode": 0,
                    "inputs": [_in("x", 10), _in("factor", 11, "FLOAT"), _in("seed", 12)],
                    "widgets_values": [0, 1.5, 42, "fixed"]},
                   {"id": 2, "type": "sg-inner", "mode": 0, "inputs": [_in("v", 14, widget=False)]}],
         "links": [_link(10, -10, 0, 1, 0), _link(11, -10, 1, 1, 1, "FLOAT"), _link(12, -10, 2, 1, 2),
                   _link(14, 1, 0, 2, 0), _link(13, 2, 0, -20, 0)]}


def _outer(node_id, x_link, widgets_values=(), mode=0, out_link=None):
    return {"id": node_id, "type": "sg-outer", "mode": mode,
            "inputs": [_in("x", x_link), _in("factor", None, "FLOAT")],  # seed: not saved on the instance
            "outputs": [{"name": "out", "type": "INT", "links": [out_link]}],
            "widgets_values": list(widgets_values)}


UI = {
    "nodes": [
        {"id": 1, "type": "Const", "mode": 0, "widgets_values": [3]},
        _outer(2, 1),                                  # x from Const; factor / seed: the inner widgets' values
        {"id": 4, "type": "Show", "mode": 0, "inputs": [_in("x", 2)], "widgets_values": [0]},
        _outer(3, None, [99, 2.5, 9, "fixed"]),        # unconnected: the instance's own widget values
        {"id": 8, "type": "Show", "mode": 0, "inputs": [_in("x", 4)], "widgets_values": [0]},
        _outer(5, 3, mode=4),                          # bypassed: its input passed through, its contents not queued
        {"id": 6, "type": "Show", "mode": 0, "inputs": [_in("x", 5)], "widgets_values": [0]},
        {"id": 9, "type": "Resize", "mode": 0, "inputs": [_in("image", None, "IMAGE", widget=False)],
         "widgets_values": ["dims", 64, 32, "nearest"]},
        {"id": 10, "type": "Note", "mode": 0, "widgets_values": ["a note"]},
    ],
    "links": [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 4, 0, "INT"], [3, 1, 0, 5, 0, "INT"], [4, 3, 0, 8, 0, "INT"],
              [5, 5, 0, 6, 0, "INT"]],
    "definitions": {"subgraphs": [OUTER, INNER]},
}


def test_subgraph_instances_flattened_as_the_frontend_queues_them():
    assert ct.convert(UI, INFO) == {
        "1": {"class_type": "Const", "inputs": {"value": 3}},
        "2:1": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 1.5, "seed": 42}},
        "2:2:7": {"class_type": "Scale", "inputs": {"x": ["2:1", 0], "factor": 2.0, "seed": 5}},
        "4": {"class_type": "Show", "inputs": {"x": ["2:2:7", 0]}},
        # promoted x, factor, seed; one extra value after the seed's (its "control after generate")
        "3:1": {"class_type": "Scale", "inputs": {"x": 99, "factor": 2.5, "seed": 9}},
        "3:2:7": {"class_type": "Scale", "inputs": {"x": ["3:1", 0], "factor": 2.0, "seed": 5}},
        "8": {"class_type": "Show", "inputs": {"x": ["3:2:7", 0]}},
        "6": {"class_type": "Show", "inputs": {"x": ["1", 0]}},
        "9": {"class_type": "Resize", "inputs": {"mode": "dims", "mode.width": 64, "mode.height": 32,
                                                 "method": "nearest"}},
    }


def test_node_types_and_missing_nodes_look_inside_subgraphs():
    assert ct.node_types(UI) == ["Const", "Resize", "Scale", "Show"]
    assert ct.missing_nodes(UI, {k: v for k, v in INFO.items() if k != "Scale"}) == ["Scale"]


def test_a_muted_node_feeding_an_active_one_is_not_guessed():
    ui = {**UI, "nodes": [dict(n, mode=2) if n["id"] == 1 else n for n in UI["nodes"]]}
    with pytest.raises(ct.Unconvertible, match="muted"):
        ct.convert(ui, INFO)


def test_ltx2_file_names_pick_their_tiny_layout_and_the_text_width():
    """LTX-2 file names pick the tiny layout (2.3 and 2.5 the 2.3 layout); the test text is as wide as that layout's
    text encoder gives it (2.0: Gemma's features at caption_channels; 2.3: video + audio widths)."""
    from parallel_backend.testing.synthetic import LTXAV_PRESETS

    assert ct.ltx2_preset("ltx-2-19b-dev-fp8.safetensors") == "tiny"
    assert ct.ltx2_preset("ltx-2.3-22b-dev-fp8.safetensors") == "tiny_2_3"
    assert ct.ltx2_preset("ltx-2.5-22b-distilled-transformer-comfy-int8-convrot.safetensors") == "tiny_2_3"
    p, q = LTXAV_PRESETS["tiny"], LTXAV_PRESETS["tiny_2_3"]
    ckpt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "ltx-2-19b-dev-fp8.safetensors"}}}
    unet = {"2": {"class_type": "UNETLoader", "inputs": {"unet_name": "ltx-2.5-22b-distilled.safetensors"}}}
    assert ct.ltx2_text_width(ckpt) == p["caption_channels"]
    assert ct.ltx2_text_width(unet) == q["width"] + q["audio_width"]
    with pytest.raises(ct.Unconvertible, match="2 layouts"):
        ct.ltx2_text_width({**ckpt, **unet})
