"""ComfyUI's own workflow templates (the pinned `comfyui-workflow-templates-json` package) made runnable here.

- `wan_cosmos_templates()`: every template of the package's index whose name or models mention Wan or Cosmos.
- `convert(ui, object_info)`: UI -> API format, as ComfyUI's frontend queues a graph: links resolved, bypassed
  nodes (mode 4) passed through by type, muted nodes (mode 2) dropped, Reroute / PrimitiveNode / notes resolved,
  `widgets_values` matched to the live node definitions (with the extra "control_after_generate" value of seed
  widgets and the upload widget of LoadImage / LoadVideo). What it cannot convert (subgraphs, group nodes) is
  raised as `Unconvertible` with the reason, never guessed.
- `tiny_variant(api, ...)`: the graph made small and self-contained (the same change for the native and the
  parallel run, see `tiny_variant`'s docstring); `parallel_variant`: the same graph with only each UNETLoader
  replaced by Parallel Model Loader on one Parallel Config.
- `write_inputs(api, base)`: the files the graph names, written tiny: the DiT of the class the file name implies
  (built from ComfyUI's own model class for that variant, so the key layout is the real one), a random Wan 2.1 VAE
  of ComfyUI's class at a tiny width, LoRAs in ComfyUI's key layout, input images and videos.
"""
from __future__ import annotations

import copy
import json
import os

CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
# tiny DiT: 2 heads of 128 (ComfyUI derives heads as dim // 128), 2 blocks
DIT = dict(dim=256, ffn_dim=512, num_layers=2)
WIDTH, HEIGHT, LENGTH, MAX_STEPS = 96, 64, 5, 4


class Unconvertible(Exception):
    pass


# ---- the package and its index -----------------------------------------------------------------------------
def templates_dir() -> str:
    import comfyui_workflow_templates_json as pkg
    return os.path.join(os.path.dirname(pkg.__file__), "templates")


def load_template(name: str) -> dict:
    with open(os.path.join(templates_dir(), name + ".json")) as f:
        return json.load(f)


def wan_cosmos_templates() -> list[str]:
    """Names of the index's templates whose name or models mention Wan or Cosmos, in index order."""
    with open(os.path.join(templates_dir(), "index.json")) as f:
        index = json.load(f)
    out = []
    for category in index:
        for t in category["templates"]:
            text = (t["name"] + " " + " ".join(t.get("models", []))).lower()
            if ("wan" in text or "cosmos" in text) and t["name"] not in out:
                out.append(t["name"])
    return out


def node_types(ui: dict) -> list[str]:
    """Node types of the graph and of its subgraph definitions (virtual nodes left out)."""
    nodes = list(ui.get("nodes", []))
    subgraphs = ui.get("definitions", {}).get("subgraphs", [])
    ids = {sg["id"] for sg in subgraphs}
    for sg in subgraphs:
        nodes += sg.get("nodes", [])
    return sorted({n["type"] for n in nodes if n["type"] not in VIRTUAL and n["type"] not in ids})


def missing_nodes(ui: dict, object_info: dict) -> list[str]:
    return [t for t in node_types(ui) if t not in object_info]


# ---- UI -> API ---------------------------------------------------------------------------------------------
def _links(ui: dict) -> dict:
    out = {}
    for link in ui.get("links", []):
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                    link.get("type")]
        out[link[0]] = link
    return out


def _is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def convert(ui: dict, object_info: dict) -> dict:
    """The API-format prompt ComfyUI's frontend would queue for this UI-format graph."""
    subgraph_ids = {sg["id"] for sg in ui.get("definitions", {}).get("subgraphs", [])}
    nodes = {n["id"]: n for n in ui["nodes"]}
    for n in nodes.values():
        if n["type"] in subgraph_ids:
            raise Unconvertible(f"node {n['id']} is a subgraph ({n['type']}): the converter does not expand them")
        if n["type"].startswith("workflow>") or n["type"].startswith("workflow/"):
            raise Unconvertible(f"node {n['id']} is a group node ({n['type']})")
    links = _links(ui)

    def source(link_id, want_type):
        """(origin node, slot) a link resolves to, through Reroutes and bypassed nodes; None if nothing."""
        seen = 0
        link = links.get(link_id)
        while link is not None and seen < 1000:
            seen += 1
            origin, slot = nodes.get(link[1]), link[2]
            if origin is None:
                return None
            if origin["type"] == "Reroute":
                link = links.get((origin.get("inputs") or [{}])[0].get("link"))
                continue
            if origin.get("mode", 0) == 4:  # bypass: the input of the output's type, same index first
                ins = origin.get("inputs") or []
                order = ([slot] if slot < len(ins) else []) + list(range(len(ins)))
                nxt = None
                for i in order:
                    if ins[i].get("type") == want_type and ins[i].get("link") is not None:
                        nxt = links.get(ins[i]["link"])
                        break
                link = nxt
                continue
            if origin.get("mode", 0) == 2:
                raise Unconvertible(f"node {origin['id']} ({origin['type']}) is muted but feeds an active node")
            return origin, slot
        return None

    api = {}
    for n in ui["nodes"]:
        if n["type"] in VIRTUAL or n.get("mode", 0) in (2, 4):
            continue
        info = object_info[n["type"]]
        order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        linked = {i["name"]: i for i in n.get("inputs") or [] if i.get("link") is not None}
        wv = n.get("widgets_values")
        values = dict(wv) if isinstance(wv, dict) else None
        seq = list(wv or []) if values is None else []
        inputs = {}
        for section in ("required", "optional"):
            for name in order.get(section, []):
                spec = specs[name]
                if _is_widget(spec):
                    if values is not None:
                        if name in values:
                            inputs[name] = values[name]
                    elif seq:
                        inputs[name] = seq.pop(0)
                        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                        if seq and isinstance(seq[0], str) and seq[0] in CONTROL_VALUES and (
                                opts.get("control_after_generate") or name in ("seed", "noise_seed")
                                or spec[0] in ("INT", "FLOAT")):
                            seq.pop(0)  # the frontend's "control after generate" widget
                        elif seq and any(k.endswith("_upload") for k in opts):
                            seq.pop(0)  # the upload button's value
                if name in linked:
                    src = source(linked[name]["link"], linked[name].get("type"))
                    if src is None:
                        continue
                    origin, slot = src
                    if origin["type"] == "PrimitiveNode":
                        inputs[name] = (origin.get("widgets_values") or [None])[0]
                    else:
                        inputs[name] = [str(origin["id"]), slot]
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api


# ---- the graph made tiny ------------------------------------------------------------------------------------
def _consumers(api, nid):
    return [(k, name) for k, node in api.items() for name, v in node["inputs"].items()
            if isinstance(v, list) and len(v) == 2 and v[0] == nid]


def _upstream(api, nid, class_type):
    """The node ids of `class_type` that `nid` depends on."""
    out, todo, seen = [], [nid], set()
    while todo:
        k = todo.pop()
        if k in seen or k not in api:
            continue
        seen.add(k)
        if api[k]["class_type"] == class_type:
            out.append(k)
        todo += [v[0] for v in api[k]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return out


def tiny_variant(api: dict, prefix: str) -> dict:
    """The converted template, small and self-contained; the change is the same for both runs:
    - CLIPLoader dropped and each CLIPTextEncode replaced by the test conditioning node (random umt5-width tokens);
      a LoraLoader whose CLIP output fed only those becomes LoraLoaderModelOnly (same file and model strength);
    - CLIPVisionLoader dropped and each CLIPVisionEncode replaced by the test CLIP-vision node (random 257 x 1280
      penultimate tokens): ComfyUI detects CLIP-ViT-H only at its full 632 M-parameter size;
    - the Wan 2.2 VAE (48 channels) replaced by the test VAE node (the encoder's shapes, deterministic values):
      ComfyUI fixes its width at 160 (705 M parameters); the Wan 2.1 VAE stays, as a tiny file of its real class;
    - width x height x frames set to 96 x 64 x 5 on every node that has them (latent makers, camera embeddings,
      and the PrimitiveInt nodes feeding them), steps to at most 4 (a KSamplerAdvanced split scaled with them);
    - everything after the sampler (VAE decode, video / image saves and previews) replaced by SaveLatent of the
      decoded latent, so the sampled latents are compared, and nodes no output needs dropped.
    Seeds, cfg, samplers, schedulers, shifts, LoRA strengths and every other node stay as the template has them."""
    g = copy.deepcopy(api)
    for nid, node in list(g.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "CLIPTextEncode":
            g[nid] = {"class_type": "PditTestConditioning", "inputs": {"seed": 100 + int(nid), "tokens": 12,
                                                                       "width": 4096}}
        elif ct == "CLIPVisionEncode":
            g[nid] = {"class_type": "PditTestClipVision", "inputs": {"seed": 200 + int(nid)}}
        elif ct == "VAELoader" and "2.2" in inp["vae_name"]:
            g[nid] = {"class_type": "PditTestVAE", "inputs": {"seed": 7, "kind": "wan2.2"}}
        for key, value in (("width", WIDTH), ("height", HEIGHT), ("length", LENGTH)):
            if key not in inp:
                continue
            if isinstance(inp[key], list):
                src = g.get(inp[key][0])
                if src is not None and src["class_type"] in ("PrimitiveInt", "PrimitiveNode"):
                    src["inputs"]["value"] = value
            elif ct not in ("SaveLatent",):
                inp[key] = value
        if ct == "KSampler":
            inp["steps"] = min(inp["steps"], MAX_STEPS)
        elif ct == "KSamplerAdvanced":
            steps = inp["steps"]
            new = min(steps, MAX_STEPS)
            inp["steps"] = new
            for k in ("start_at_step", "end_at_step"):
                if inp[k] < steps:
                    inp[k] = round(inp[k] * new / steps)
    # a LoraLoader whose CLIP output only fed the replaced text encoders: its model half (LoraLoaderModelOnly)
    for nid, node in list(g.items()):
        if node["class_type"] == "LoraLoader" and not any(
                g[k]["inputs"][name][1] == 1 for k, name in _consumers(g, nid)):
            inp = node["inputs"]
            g[nid] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": inp["model"], "lora_name": inp["lora_name"], "strength_model": inp["strength_model"]}}
    # outputs: one SaveLatent per latent that was decoded
    decoded = {}
    for nid, node in list(g.items()):
        if node["class_type"] in ("VAEDecode", "VAEDecodeTiled"):
            decoded.setdefault(tuple(node["inputs"]["samples"]), nid)
    info_outputs = ("Save", "Preview", "CreateVideo")
    for nid, node in list(g.items()):
        if node["class_type"].startswith(info_outputs):
            del g[nid]
    for i, (samples, _) in enumerate(sorted(decoded.items(), key=lambda kv: int(kv[1]))):
        g[f"save{i}"] = {"class_type": "SaveLatent", "inputs": {"samples": list(samples),
                                                                "filename_prefix": f"{prefix}_{i}"}}
    keep = set()
    for nid in [k for k in g if k.startswith("save")]:
        todo = [nid]
        while todo:
            k = todo.pop()
            if k in keep:
                continue
            keep.add(k)
            todo += [v[0] for v in g[k]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    missing = sorted({k for k in keep if k not in g})
    if missing:
        raise Unconvertible(f"nodes {missing} are needed but were dropped (text / vision encoders feed another node)")
    return {k: v for k, v in g.items() if k in keep}


def parallel_variant(g: dict, old_prefix: str, new_prefix: str, degrees: dict | None = None) -> dict:
    """The same graph with only each UNETLoader replaced by Parallel Model Loader (fp32) on one Parallel Config
    (2 CPU ranks; ulysses 2 unless `degrees` says otherwise), and the SaveLatent prefixes renamed."""
    g = copy.deepcopy(g)
    degrees = {"cfg": 1, "ulysses": 2, "ring": 1, "tp": 1, "dp": 1, **(degrees or {})}
    g["pdit_config"] = {"class_type": "ParallelConfig", "inputs": {
        "world_size": 2, **degrees, "dtype": "fp32", "device": "cpu", "attention": "sdpa", "first_device": 0}}
    for nid, node in list(g.items()):
        if node["class_type"] == "UNETLoader":
            g[nid] = {"class_type": "ParallelModelLoader", "inputs": {
                "model_name": node["inputs"]["unet_name"], "base_precision": "fp32",
                "parallel_config": ["pdit_config", 0]}}
        elif node["class_type"] == "SaveLatent":
            node["inputs"]["filename_prefix"] = node["inputs"]["filename_prefix"].replace(old_prefix, new_prefix, 1)
    return g


# ---- tiny files under the names the graph uses -----------------------------------------------------------------
def dit_config(name: str) -> tuple[dict, str]:
    """(ComfyUI unet_config for a tiny model of the variant the file name implies, file dtype)."""
    n = name.lower()
    wan22 = "wan2.2" in n or "wan2_2" in n
    five_b = "5b" in n
    out_dim = 48 if wan22 and five_b else 16
    cfg = dict(image_model="wan2.1", dim=DIT["dim"], ffn_dim=DIT["ffn_dim"], num_layers=DIT["num_layers"],
               num_heads=DIT["dim"] // 128, out_dim=out_dim, patch_size=(1, 2, 2), freq_dim=256,
               window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6, model_type="t2v", in_dim=16)
    if "vace" in n:
        cfg.update(model_type="vace", vace_in_dim=96, vace_layers=1)
    elif "fun_camera" in n:
        cfg.update(model_type="camera_2.2", in_dim=36) if wan22 else cfg.update(model_type="camera", in_dim=32)
    elif "fun_control" in n:
        # Wan 2.2 Fun control: latent + control latent + start-image latent + 4 mask channels
        # and ref_conv for the reference image its node passes
        if wan22:
            cfg.update(in_dim=3 * out_dim + 4, in_dim_ref_conv=out_dim)
        else:
            cfg.update(model_type="i2v", in_dim=48)
    elif "fun_inp" in n:
        cfg.update(in_dim=2 * out_dim + 4) if wan22 else cfg.update(model_type="i2v", in_dim=36)
    elif "ti2v" in n:
        cfg.update(in_dim=48)
    elif "i2v" in n or "flf2v" in n:
        if wan22:  # Wan 2.2 A14B I2V: no CLIP-vision embedding
            cfg.update(in_dim=36)
        else:
            cfg.update(model_type="i2v", in_dim=36)
            if "flf2v" in n:
                cfg["flf_pos_embed_token_number"] = 514
    dtype = ("fp8_scaled" if "fp8_scaled" in n else "fp8_e4m3fn" if "fp8_e4m3fn" in n else
             "bf16" if "bf16" in n else "fp16" if "fp16" in n else "fp32")
    return cfg, dtype


def host_state_shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def wan_dit_shapes(unet_config: dict) -> dict:
    """key -> shape of ComfyUI's own model class for this unet_config (the class its detection picks)."""
    import comfy.model_detection
    import torch
    model_config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if model_config is None:
        raise ValueError(f"ComfyUI has no model for {unet_config}")
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, "", device=torch.device("meta"))
    return host_state_shapes(base.diffusion_model)


def write_dit(path: str, name: str, seed: int) -> str:
    import torch

    from parallel_backend.testing.synthetic import write_checkpoint, write_fp8_variant
    cfg, dtype = dit_config(name)
    shapes = wan_dit_shapes(cfg)
    if dtype.startswith("fp8"):
        tmp = path + ".fp32"
        write_checkpoint(tmp, shapes, seed=seed)
        write_fp8_variant(tmp, path, scaled=dtype == "fp8_scaled")
        os.remove(tmp)
        return path
    return write_checkpoint(path, shapes, dtype={"fp32": torch.float32, "fp16": torch.float16,
                                                 "bf16": torch.bfloat16}[dtype], seed=seed)


def write_wan21_vae(path: str, seed: int = 11, dim: int = 16) -> str:
    """A random Wan 2.1 VAE of ComfyUI's class (comfy.ldm.wan.vae.WanVAE) at width `dim`, which ComfyUI's
    detection reads from the file (decoder.head.0.gamma)."""
    import comfy.ldm.wan.vae as wan_vae
    import torch

    from parallel_backend.testing.synthetic import random_tensor, write_safetensors_stream
    with torch.device("meta"):
        vae = wan_vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                             temperal_downsample=[False, True, True], dropout=0.0)
    g = torch.Generator().manual_seed(seed)

    def make(k, s):  # RMS_norm gammas are (C, 1, 1[, 1]): ones plus noise, like any norm weight
        return 1.0 + 0.1 * torch.randn(s, generator=g) if k.endswith("gamma") else random_tensor(k, s, g)

    return write_safetensors_stream(path, [(k, s, torch.float32, lambda k=k, s=s: make(k, s))
                                           for k, s in host_state_shapes(vae).items()])


def write_image(path: str, seed: int = 0) -> str:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    img = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, rng.integers(0, 256, (HEIGHT, WIDTH))], -1)
    Image.fromarray(img.astype(np.uint8)).convert("RGB").save(path)
    return path


def write_video(path: str, frames: int = 8) -> str:
    import av
    import numpy as np
    with av.open(path, "w") as out:
        s = out.add_stream("mpeg4", rate=16)
        s.width, s.height, s.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(frames):
            y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
            img = np.stack([(x + 8 * i) % 256, y * 4 % 256, np.full_like(x, 40 * i % 256)], -1).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def write_inputs(g: dict, base: str) -> dict:
    """Write (once) every file the tiny graph names under the ComfyUI base directory; returns {kind: [names]}."""
    from parallel_backend.testing.synthetic import write_wan_lora
    made = {"diffusion_models": [], "vae": [], "loras": [], "input": []}

    def path_of(folder, name):
        p = os.path.join(base, folder if folder == "input" else os.path.join("models", folder), name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    for nid, node in sorted(g.items(), key=lambda kv: kv[0]):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "UNETLoader":
            p = path_of("diffusion_models", inp["unet_name"])
            if not os.path.exists(p):
                write_dit(p, inp["unet_name"], seed=sum(map(ord, inp["unet_name"])) % 1000)
            made["diffusion_models"].append(inp["unet_name"])
        elif ct == "VAELoader":
            p = path_of("vae", inp["vae_name"])
            if not os.path.exists(p):
                write_wan21_vae(p)
            made["vae"].append(inp["vae_name"])
        elif ct == "LoadImage":
            p = path_of("input", inp["image"])
            if not os.path.exists(p):
                write_image(p, seed=len(inp["image"]))
            made["input"].append(inp["image"])
        elif ct == "LoadVideo":
            p = path_of("input", inp["file"])
            if not os.path.exists(p):
                write_video(p)
            made["input"].append(inp["file"])
    for nid, node in g.items():  # LoRAs after the DiTs they are made for
        if node["class_type"] in ("LoraLoader", "LoraLoaderModelOnly"):
            name = node["inputs"]["lora_name"]
            unets = _upstream(g, nid, "UNETLoader")
            if len(unets) != 1:
                raise Unconvertible(f"LoRA {name}: {len(unets)} diffusion models upstream")
            p = path_of("loras", name)
            if not os.path.exists(p):
                write_wan_lora(p, path_of("diffusion_models", g[unets[0]]["inputs"]["unet_name"]), fmt="comfy",
                               seed=sum(map(ord, name)) % 1000)
            made["loras"].append(name)
    return made
