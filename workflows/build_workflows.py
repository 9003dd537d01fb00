"""Writes the shipped workflows in both ComfyUI formats from one graph spec, so they cannot drift.

    python workflows/build_workflows.py          # rewrite workflows/*.json
UI format (drag into the browser): <name>.json. API format (POST /prompt): <name>_api.json.
"""
from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

# class -> output (name, type) list; only what the shipped graphs use
OUTPUTS = {
    "CLIPLoader": [("CLIP", "CLIP")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "ParallelConfig": [("parallel_config", "PARALLEL_CONFIG")],
    "ParallelModelLoader": [("model", "MODEL"), ("parallel_plan", "STRING")],
    "EmptyHunyuanLatentVideo": [("LATENT", "LATENT")],
    "ParallelSampler": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "VAELoader": [("VAE", "VAE")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "SaveAnimatedWEBP": [],
    "SaveLatent": [],
    "UNETLoader": [("MODEL", "MODEL")],
    "PditTestConditioning": [("CONDITIONING", "CONDITIONING")],  # test-only node (tests/comfy_test_nodes)
}
# widgets followed by an extra UI-only value ("control_after_generate")
SEED_WIDGETS = {("ParallelSampler", "seed"), ("KSampler", "seed"), ("PditTestConditioning", "seed")}


def link(node: int, slot: int = 0):
    return ("link", node, slot)


WAN21_T2V = {
    "title": "Wan 2.1 text-to-video on a parallel worker group",
    "nodes": [
        (1, "CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"}),
        (2, "CLIPTextEncode", {"text": "a red fox running through fresh snow, golden hour, cinematic",
                               "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": "blurry, low quality, static, watermark", "clip": link(1)}),
        (4, "ParallelConfig", {"world_size": 2, "cfg": 0, "ulysses": 0, "ring": 0, "tp": 0, "dp": 0,
                               "dtype": "bf16", "device": "cuda", "attention": "sdpa", "first_device": 0}),
        (5, "ParallelModelLoader", {"model_name": "wan2.1_t2v_14B_bf16.safetensors", "base_precision": "bf16",
                                    "parallel_config": link(4)}),
        (6, "EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
        (7, "ParallelSampler", {"model": link(5), "seed": 42, "steps": 30, "cfg": 5.0, "sampler_name": "uni_pc",
                                "scheduler": "simple", "positive": link(2), "negative": link(3),
                                "latent_image": link(6), "denoise": 1.0}),
        (8, "VAELoader", {"vae_name": "wan_2.1_vae.safetensors"}),
        (9, "VAEDecode", {"samples": link(7), "vae": link(8)}),
        (10, "SaveAnimatedWEBP", {"images": link(9), "filename_prefix": "parallel_dit/wan21_t2v", "fps": 16.0,
                                  "lossless": False, "quality": 90, "method": "default"}),
    ],
}

WORKFLOWS = {"wan21_t2v_parallel": WAN21_T2V}


def spec_from_api(api: dict, title: str) -> dict:
    """The inverse of to_api: lets a test lay out a rewritten API graph for the browser."""
    nodes = []
    for nid in sorted(api, key=int):
        node = api[nid]
        inputs = {k: (link(int(v[0]), v[1]) if isinstance(v, list) else v) for k, v in node["inputs"].items()}
        nodes.append((int(nid), node["class_type"], inputs))
    return {"title": title, "nodes": nodes}


def to_api(spec: dict) -> dict:
    api = {}
    for nid, cls, inputs in spec["nodes"]:
        api[str(nid)] = {"class_type": cls, "_meta": {"title": cls},
                         "inputs": {k: ([str(v[1]), v[2]] if isinstance(v, tuple) else v) for k, v in inputs.items()}}
    return api


def to_ui(spec: dict) -> dict:
    """litegraph workflow JSON (version 0.4) as the ComfyUI frontend saves it."""
    nodes, links, link_id = [], [], 0
    out_links = {}  # (node, slot) -> [link ids]
    in_links = {}   # (node, input name) -> link id
    types = {nid: cls for nid, cls, _ in spec["nodes"]}
    for nid, cls, inputs in spec["nodes"]:
        for name, v in inputs.items():
            if isinstance(v, tuple):
                link_id += 1
                src, slot = v[1], v[2]
                links.append([link_id, src, slot, nid, None, OUTPUTS[types[src]][slot][1]])
                out_links.setdefault((src, slot), []).append(link_id)
                in_links[(nid, name)] = link_id
    for i, (nid, cls, inputs) in enumerate(spec["nodes"]):
        ui_inputs, widgets = [], []
        for name, v in inputs.items():
            if isinstance(v, tuple):
                lid = in_links[(nid, name)]
                ltype = next(l[5] for l in links if l[0] == lid)
                for l in links:
                    if l[0] == lid:
                        l[4] = len(ui_inputs)
                ui_inputs.append({"name": name, "type": ltype, "link": lid})
            else:
                widgets.append(v)
                if (cls, name) in SEED_WIDGETS:
                    widgets.append("fixed")
        outputs = [{"name": n, "type": t, "links": out_links.get((nid, s), []), "slot_index": s}
                   for s, (n, t) in enumerate(OUTPUTS[cls])]
        nodes.append({"id": nid, "type": cls, "pos": [60 + 330 * (i % 4), 80 + 300 * (i // 4)], "size": [300, 200],
                      "flags": {}, "order": i, "mode": 0, "inputs": ui_inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": cls}, "widgets_values": widgets})
    return {"last_node_id": max(types), "last_link_id": link_id, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"title": spec["title"]}, "version": 0.4}


def main():
    for name, spec in WORKFLOWS.items():
        for suffix, data in (("", to_ui(spec)), ("_api", to_api(spec))):
            with open(os.path.join(HERE, f"{name}{suffix}.json"), "w") as f:
                json.dump(data, f, indent=2)
                f.write("\n")


if __name__ == "__main__":
    main()
