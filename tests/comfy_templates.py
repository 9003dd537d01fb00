"""ComfyUI's own workflow templates (the pinned `comfyui-workflow-templates-json` package) made runnable here.

- `wan_cosmos_templates()`: every template of the package's index whose name or models mention Wan or Cosmos.
- `convert(ui, object_info)`: UI -> API format, as ComfyUI's frontend queues a graph: subgraph instances expanded
  into their inner nodes (`flatten`: ids "<instance>:<inner>", links joined across the boundaries, promoted widget
  values), links resolved, bypassed nodes (mode 4) passed through by type, muted nodes (mode 2) dropped, Reroute /
  PrimitiveNode / notes resolved, `widgets_values` matched to the live node definitions (with the extra
  "control_after_generate" value of seed widgets, the upload widget of LoadImage / LoadVideo / LoadAudio, and V3
  dynamic combos' option widgets as "<combo>.<child>"). What it cannot convert (group nodes, a muted node feeding
  an active one, instance widget values in an unknown layout) is raised as `Unconvertible` with the reason, never
  guessed.
- `tiny_variant(api, ...)`: the graph made small and self-contained (the same change for the native and the
  parallel run, see `tiny_variant`'s docstring); `parallel_variant`: the same graph with only each UNETLoader
  replaced by Parallel Model Loader on one Parallel Config.
- `write_inputs(api, base)`: the files the graph names, written tiny: the DiT of the class the file name implies
  (built from ComfyUI's own model class for that variant, so the key layout is the real one; the metadata ComfyUI
  reads Animate 2 / causal-AR files by), a random Wan 2.1 VAE of ComfyUI's class at a tiny width, LoRAs in ComfyUI's
  key layout, InfiniteTalk's MultiTalk patch of ComfyUI's class, input images, videos and audio.
"""
from __future__ import annotations

import copy
import json
import os

CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "COLOR")
VIRTUAL = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
# tiny DiT: 2 heads of 128 (ComfyUI derives heads as dim // 128), 2 blocks
DIT = dict(dim=256, ffn_dim=512, num_layers=2)
# beside an InfiniteTalk (MultiTalk) patch, whose attention ComfyUI builds with 40 heads: a width both 128 x heads
# and 40 x head width divide (5 heads of 128 for the DiT, 40 of 16 for the patch)
DIT_MULTITALK = dict(dim=640, ffn_dim=1280, num_layers=2)
MULTITALK_DIR = "multitalk"
WIDTH, HEIGHT, LENGTH, MAX_STEPS = 96, 64, 5, 4
MINIMAX_TEXT = 96  # the tiny MiniMax H3's text width (MINIMAX_PRESETS["tiny"]["text_dim"])
# an int8_convrot MiniMax H3: ConvRot rotates each linear's input in groups of 256, so every block linear's input
# width (hidden, heads x head_dim, ffn, the time embedding) is a multiple of 256: 4 heads of 64
MINIMAX_INT8 = dict(hidden=512, heads=4, head_dim=64, ffn=512, time_dim=256)
# a MiniMax H3 graph with guides at given frames (MiniMaxH3AddGuide: seconds x 24, the template's at 1.5, 3 and 5 s)
# keeps its 5-second length (17k + 5 frames, as its own length expression makes them)
MINIMAX_GUIDED_LENGTH = 124


class Unconvertible(Exception):
    pass


# ---- the package and its index -----------------------------------------------------------------------------
def templates_dir() -> str:
    import comfyui_workflow_templates_json as pkg
    return os.path.join(os.path.dirname(pkg.__file__), "templates")


def load_template(name: str) -> dict:
    with open(os.path.join(templates_dir(), name + ".json")) as f:
        return json.load(f)


def wan_cosmos_templates(words: tuple = ("wan", "cosmos")) -> list[str]:
    """Names of the index's templates whose name or models mention one of `words` (Wan or Cosmos), in index order."""
    with open(os.path.join(templates_dir(), "index.json")) as f:
        index = json.load(f)
    out = []
    for category in index:
        for t in category["templates"]:
            text = (t["name"] + " " + " ".join(t.get("models", []))).lower()
            if any(w in text for w in words) and t["name"] not in out:
                out.append(t["name"])
    return out


def hunyuan_video_templates() -> list[str]:
    """Names of the index's templates whose models list HunyuanVideo (not Hunyuan3D), in index order."""
    with open(os.path.join(templates_dir(), "index.json")) as f:
        index = json.load(f)
    return [t["name"] for category in index for t in category["templates"]
            if "hunyuan video" in " ".join(t.get("models", [])).lower()]


def kandinsky5_templates() -> list[str]:
    return wan_cosmos_templates(("kandinsky",))


def ltx_templates() -> list[str]:
    """LTX-Video (0.9.x) and LTX-2 (2, 2.3, 2.5) templates: name or models mention LTX."""
    return wan_cosmos_templates(("ltx",))


def minimax_h3_templates() -> list[str]:
    """Names of the index's templates whose models list MiniMax H3 (not MiniMax Music), in index order."""
    with open(os.path.join(templates_dir(), "index.json")) as f:
        index = json.load(f)
    out = []
    for category in index:
        for t in category["templates"]:
            if "minimax h3" in " ".join(t.get("models", [])).lower() and t["name"] not in out:
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
# How ComfyUI's frontend queues a graph (Comfy-Org/ComfyUI_frontend, read at 024dff7f / 01b3aeae):
# src/utils/executionUtil.ts graphToPrompt, src/lib/litegraph/src/subgraph/ExecutableNodeDTO.ts (links resolved
# through bypassed / virtual nodes and across subgraph boundaries) and SubgraphNode.ts (instances expanded into
# their inner nodes as "<instance>:<inner>", promoted widget values).
SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20  # a subgraph definition's input / output node in its links
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"


def _link_row(link) -> list:
    if isinstance(link, dict):
        return [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                link.get("type")]
    return list(link)


def _links(graph: dict) -> dict:
    return {row[0]: row for row in map(_link_row, graph.get("links", []))}


def _opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_widget(spec) -> bool:
    """A widget: a combo or a widget type, or a multi-type input drawn as the widget it names ("FLOAT,INT" with
    widgetType FLOAT: LTXVEmptyLatentAudio's frame_rate)."""
    kind = spec[0]
    return (isinstance(kind, list) or kind in WIDGET_TYPES or kind == DYNAMIC_COMBO or "widgetType" in _opts(spec)) \
        and not _opts(spec).get("forceInput")


def _has_control(name: str, spec) -> bool:
    """Whether the frontend gives this widget a "control after generate" companion widget."""
    return bool(_opts(spec).get("control_after_generate")) or name in ("seed", "noise_seed")


def _specs(inputs: dict, order: dict | None = None) -> list:
    """[(name, spec)] of a node's (or a dynamic combo option's) inputs in the frontend's widget order."""
    order = order or {s: list(inputs.get(s, {})) for s in ("required", "optional")}
    specs = {**inputs.get("required", {}), **inputs.get("optional", {})}
    return [(name, specs[name]) for section in ("required", "optional") for name in order.get(section, [])]


def _take_widgets(specs: list, prefix: str, seq: list, out: dict):
    """Pop `seq` (a node's widgets_values) into out[name] as the frontend lays widgets out: a seed widget's
    "control after generate" value and an upload button's value skipped, a dynamic combo followed by the widgets
    of its selected option, named '<combo>.<child>' (the names the server re-nests)."""
    for name, spec in specs:
        if not seq:
            return
        if not _is_widget(spec):
            continue
        value = out[prefix + name] = seq.pop(0)
        opts = _opts(spec)
        if seq and isinstance(seq[0], str) and seq[0] in CONTROL_VALUES and (
                _has_control(name, spec) or spec[0] in ("INT", "FLOAT")):
            seq.pop(0)
        elif seq and any(k.endswith("_upload") for k in opts) and (isinstance(spec[0], list) or spec[0] == "COMBO"):
            seq.pop(0)  # a file list's upload button (LoadImage, LoadVideo, LoadAudio)
        if spec[0] == DYNAMIC_COMBO:
            option = next((o for o in opts.get("options", []) if o.get("key") == value), None)
            if option is not None:
                _take_widgets(_specs(option.get("inputs") or {}), prefix + name + ".", seq, out)


def widget_values(node: dict, object_info: dict) -> dict:
    """{widget name: value} of a UI-format node, its widgets_values matched to the live node definition."""
    wv = node.get("widgets_values")
    if isinstance(wv, dict):
        return dict(wv)
    info = object_info[node["type"]]
    out = {}
    _take_widgets(_specs(info["input"], info.get("input_order")), "", list(wv or []), out)
    return out


class _Scope:
    """One graph level: the root graph, or a subgraph definition as one instance of it (at `path`) sees it."""

    def __init__(self, graph, defs, path=(), parent=None, instance=None):
        self.graph, self.defs, self.path, self.parent, self.instance = graph, defs, path, parent, instance
        self.nodes = {n["id"]: n for n in graph.get("nodes", [])}
        self.links = _links(graph)

    def flat_id(self, node_id) -> str:
        return ":".join(str(p) for p in (*self.path, node_id))

    def is_instance(self, node) -> bool:
        """An expanded subgraph instance: a bypassed or muted one is not expanded (frontend PR #8494: its
        contents are not queued; a bypassed one passes its inputs through by type, like any bypassed node)."""
        return node["type"] in self.defs and node.get("mode", 0) == 0

    def child(self, instance) -> "_Scope":
        return _Scope(self.defs[instance["type"]], self.defs, (*self.path, instance["id"]), self, instance)


def _resolve_link(scope: _Scope, link: list, info: dict):
    """Where a link of `scope` comes from: ("node", flat id, slot), ("value", v) for an instance input left
    unconnected whose promoted widget holds v, or None."""
    origin, slot = link[1], link[2]
    if origin != SUBGRAPH_INPUT:
        return _resolve_output(scope, origin, slot, info)
    sg, instance = scope.graph, scope.instance
    outer = _instance_input(instance, sg["inputs"][slot])
    if outer is not None and outer.get("link") is not None:
        return _resolve_link(scope.parent, scope.parent.links[outer["link"]], info)
    found, value, _ = _promoted_value(scope.parent, instance, slot, info)
    return ("value", value) if found else None


def _resolve_output(scope: _Scope, node_id, slot: int, info: dict):
    node = scope.nodes.get(node_id)
    if node is None:
        raise Unconvertible(f"link from node {scope.flat_id(node_id)}, which does not exist")
    if not scope.is_instance(node):
        return ("node", scope.flat_id(node_id), slot)
    inner = scope.child(node)
    ids = inner.graph["outputs"][slot].get("linkIds") or []
    return _resolve_link(inner, inner.links[ids[0]], info) if ids else None


def _instance_input(instance: dict, sg_input: dict):
    """The instance's serialized input for a definition input: by name and type, else by name (the frontend
    rebuilds an instance's inputs from its definition and rebinds the saved ones so)."""
    saved = instance.get("inputs") or []
    return (next((i for i in saved if i["name"] == sg_input["name"] and i.get("type") == sg_input.get("type")), None)
            or next((i for i in saved if i["name"] == sg_input["name"]), None))


def _interior_widget(scope: _Scope, k: int, info: dict):
    """(found, value, has control widget) of the inner widget definition input k of `scope` promotes: the first
    of its links that ends on a widget (or on a nested instance's promoted widget)."""
    for lid in scope.graph["inputs"][k].get("linkIds") or []:
        link = scope.links.get(lid)
        target = scope.nodes.get(link[3]) if link else None
        if target is None:
            continue
        tin = next((i for i in target.get("inputs") or [] if i.get("link") == lid), None)
        if tin is None:
            continue
        if scope.is_instance(target):
            nested = scope.child(target).graph["inputs"]
            slot = next((j for j, s in enumerate(nested) if s["name"] == tin["name"]), None)
            found = _promoted_value(scope, target, slot, info) if slot is not None else (False, None, False)
            if found[0]:
                return found
            continue
        if tin.get("widget") and target["type"] in info:
            name = tin["widget"]["name"]
            values = widget_values(target, info)
            if name in values:
                spec = dict(_specs(info[target["type"]]["input"])).get(name, ["INT"])
                return True, values[name], _has_control(name, spec)
    return False, None, False


def _promoted_value(parent: _Scope, instance: dict, slot: int, info: dict):
    """(found, value, has control) of the widget an instance shows for definition input `slot`: the instance's
    widgets_values (one per promoted input in definition order, an extra one after a seed's when the list is that
    long: SubgraphNode._applyPromotedWidgetValues), else the inner widget's own value."""
    scope = parent.child(instance)
    interior = [_interior_widget(scope, k, info) for k in range(len(scope.graph["inputs"]))]
    if not interior[slot][0]:
        return False, None, False
    saved = instance.get("widgets_values") or []
    if isinstance(saved, dict) or (saved and (instance.get("properties") or {}).get("proxyWidgets")):
        raise Unconvertible(f"instance {parent.flat_id(instance['id'])}: widget values in a layout the converter "
                            "does not know")
    promoted = [k for k, w in enumerate(interior) if w[0]]
    index = 0
    for k in promoted[:promoted.index(slot)]:
        index += 1 + (len(saved) > len(promoted) and interior[k][2])
    if index < len(saved) and saved[index] is not None:
        return True, saved[index], interior[slot][2]
    return interior[slot]


def flatten(ui: dict, object_info: dict) -> dict:
    """The graph as one level, every subgraph instance expanded into its inner nodes (ids "<instance>:<inner>",
    nested "a:b:c"), links across instance boundaries joined, an unconnected instance input replaced by a
    PrimitiveNode holding its promoted widget's value. Nodes keep their UI fields; ids are strings."""
    defs = {sg["id"]: sg for sg in ui.get("definitions", {}).get("subgraphs", [])}
    flat = {"nodes": [], "links": []}
    _expand(_Scope(ui, defs), object_info, flat)
    return flat


def _expand(scope: _Scope, info: dict, flat: dict):
    for n in scope.graph.get("nodes", []):
        if n["type"].startswith(("workflow>", "workflow/")):
            raise Unconvertible(f"node {scope.flat_id(n['id'])} is a group node ({n['type']})")
        if scope.is_instance(n):
            _expand(scope.child(n), info, flat)
            continue
        node = dict(n, id=scope.flat_id(n["id"]), inputs=[])
        for slot, inp in enumerate(n.get("inputs") or []):
            end = None if inp.get("link") is None else _resolve_link(scope, scope.links[inp["link"]], info)
            node["inputs"].append(dict(inp, link=_flat_link(flat, end, node["id"], slot, inp.get("type"))))
        flat["nodes"].append(node)


def _flat_link(flat: dict, end, target: str, slot: int, kind):
    if end is None:
        return None
    if end[0] == "value":
        holder = f"{target}.{slot}"
        flat["nodes"].append({"id": holder, "type": "PrimitiveNode", "mode": 0, "widgets_values": [end[1]]})
        end = ("node", holder, 0)
    flat["links"].append([len(flat["links"]) + 1, end[1], end[2], target, slot, kind])
    return len(flat["links"])


def _source(nodes: dict, links: dict, link_id, want_type):
    """(origin node, slot) a link of the flat graph resolves to, through Reroutes and bypassed nodes; None if
    nothing (ExecutableNodeDTO.resolveOutput)."""
    link = links.get(link_id)
    for _ in range(1000):
        if link is None:
            return None
        origin, slot = nodes.get(link[1]), link[2]
        if origin is None:
            return None
        if origin["type"] == "Reroute":
            link = links.get((origin.get("inputs") or [{}])[0].get("link"))
            continue
        if origin.get("mode", 0) == 4:  # bypass: the input of the output's type, same index first
            ins = origin.get("inputs") or []
            order = ([slot] if slot < len(ins) else []) + list(range(len(ins)))
            link = next((links.get(ins[i]["link"]) for i in order
                         if ins[i].get("type") == want_type and ins[i].get("link") is not None), None)
            continue
        if origin.get("mode", 0) == 2:
            raise Unconvertible(f"node {origin['id']} ({origin['type']}) is muted but feeds an active node")
        return origin, slot
    return None


def convert(ui: dict, object_info: dict) -> dict:
    """The API-format prompt ComfyUI's frontend would queue for this UI-format graph: every widget value of each
    active node by name, then each connected input as [origin id, slot] (or the value of the PrimitiveNode or
    promoted widget it resolves to)."""
    flat = flatten(ui, object_info)
    nodes, links = {n["id"]: n for n in flat["nodes"]}, _links(flat)
    api = {}
    for n in flat["nodes"]:
        if n["type"] in VIRTUAL or n.get("mode", 0) in (2, 4):
            continue
        inputs = widget_values(n, object_info)
        for inp in n.get("inputs") or []:
            src = None if inp.get("link") is None else _source(nodes, links, inp["link"], inp.get("type"))
            if src is None:
                continue
            origin, slot = src
            inputs[inp["name"]] = ((origin.get("widgets_values") or [None])[0] if origin["type"] == "PrimitiveNode"
                                   else [origin["id"], slot])
        api[n["id"]] = {"class_type": n["type"], "inputs": inputs}
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


def _id_number(nid: str) -> int:
    """A number for a node id, plain ("12") or of an inner node of a subgraph ("128:89" -> 12889): seeds of the
    stand-ins and the order of the outputs."""
    return int(str(nid).replace(":", ""))


def _locate(g: dict, nid: str, key: str, depth: int = 0):
    """(node id, input) holding the constant that input `key` of `nid` resolves to: the input itself, a Primitive*
    node's value, or the chosen branch of a ComfySwitchNode with a constant switch; None if it is computed."""
    value = g[nid]["inputs"].get(key)
    if not isinstance(value, list):
        return (nid, key)
    src = g.get(value[0])
    if src is None or depth > 50:
        return None
    if src["class_type"] in ("PrimitiveInt", "PrimitiveFloat", "PrimitiveBoolean", "PrimitiveNode"):
        return _locate(g, value[0], "value", depth + 1)
    if src["class_type"] == "ComfySwitchNode":
        switch = _locate(g, value[0], "switch", depth + 1)
        if switch is not None:
            branch = "on_true" if g[switch[0]]["inputs"][switch[1]] else "on_false"
            return _locate(g, value[0], branch, depth + 1)
    return None


def _fewer_steps(g: dict):
    """Every sampler to at most MAX_STEPS steps, a KSamplerAdvanced's start / end scaled with them; set where the
    value is held (the sampler's widget or the primitive feeding it, shared primitives once)."""
    wanted = {}  # location -> the values the samplers using it want there
    for nid, node in g.items():
        if node["class_type"] not in ("KSampler", "KSamplerAdvanced", "BasicScheduler", "LTXVScheduler"):
            continue
        where = {k: _locate(g, nid, k) for k in ("steps", "start_at_step", "end_at_step") if k in node["inputs"]}
        if None in where.values():
            raise Unconvertible(f"{node['class_type']} {nid}: steps computed by the graph")
        steps = _held(g, where["steps"])
        new = min(steps, MAX_STEPS)
        wanted.setdefault(where["steps"], set()).add(new)
        for k in ("start_at_step", "end_at_step"):
            if k in where:
                value = _held(g, where[k])
                wanted.setdefault(where[k], set()).update([round(value * new / steps)] if value < steps else [])
    for (nid, key), values in wanted.items():
        if len(values) > 1:
            raise Unconvertible(f"{nid}.{key} sets the steps of samplers that would need {sorted(values)}")
        if values:
            g[nid]["inputs"][key] = values.pop()


def _held(g: dict, where: tuple):
    return g[where[0]]["inputs"][where[1]]


def _smaller(g: dict):
    """width x height x frames to WIDTH x HEIGHT x LENGTH on every node that has them: where the value is held
    (the widget, or the primitive / switch branch feeding it); a value computed by a node that is not made
    smaller itself (a math expression of the template's duration) is replaced by the constant."""
    length = _min_length(g)
    sizes = {"width": WIDTH, "height": HEIGHT, "length": length, "video_frames": length, "motion_frame_count": length,
             "frames_number": length}
    for nid, node in list(g.items()):
        if node["class_type"] == "SaveLatent" or node["class_type"].startswith("PditTest"):
            continue  # (the test conditioning's width is the embedding's)
        for key, value in sizes.items():
            if key not in node["inputs"]:
                continue
            where = _locate(g, nid, key)
            src = node["inputs"][key]
            if where is None and not any(k in g[src[0]]["inputs"] for k in sizes):
                where = (nid, key)
            if where is not None:
                g[where[0]]["inputs"][where[1]] = value


def _min_length(g: dict) -> int:
    """LENGTH, or more frames where the graph needs them: NormalizeVideoLatentStart (Kandinsky 5 I2V) takes the mean
    of the latent frames after its start frames, NaN when there are none (4 frames a latent frame); the LTX nodes take
    8k + 1 frames, at least 9; MiniMaxH3AddGuide's frames are the template's (seconds x 24)."""
    starts = [n["inputs"]["start_frame_count"] for n in g.values() if n["class_type"] == "NormalizeVideoLatentStart"]
    ltx = any(n["class_type"].startswith(("LTXV", "EmptyLTXV")) for n in g.values())  # LTX nodes take 8k + 1, >= 9
    guides = any(n["class_type"] == "MiniMaxH3AddGuide" for n in g.values())
    return max([LENGTH] + [4 * int(k) + 5 for k in starts if isinstance(k, int)] + ([9] if ltx else []) +
               ([MINIMAX_GUIDED_LENGTH] if guides else []))


def _stand_ins(g: dict, wan22_vae: bool = False):
    """Text encoders, CLIP vision, the Wan 2.2 VAE (unless `wan22_vae`: then a tiny file of its class), audio encoders
    and SAM 3 replaced by the test nodes (see tiny_variant)."""
    for nid, node in list(g.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "CLIPTextEncode":
            shape = {**_pooled(g, inp["clip"]), **_text_shape(g, inp["clip"][0])}
            g[nid] = {"class_type": "PditTestConditioning", "inputs": {"seed": 100 + _id_number(nid), "tokens": 12,
                                                                       **shape}}
        elif ct == "CLIPVisionEncode":
            siglip = "sigclip" in g.get(inp["clip_vision"][0], {}).get("inputs", {}).get("clip_name", "")
            g[nid] = {"class_type": "PditTestClipVision", "inputs": {"seed": 200 + _id_number(nid),
                                                                     **({"kind": "siglip_384"} if siglip else {})}}
        elif ct == "VAELoader" and "2.2" in inp["vae_name"] and not wan22_vae:
            g[nid] = {"class_type": "PditTestVAE", "inputs": {"seed": 7, "kind": "wan2.2"}}
        elif ct == "VAELoader" and "hunyuanvideo15" in inp["vae_name"]:  # (1.5's VAE: 32 channels, 16x)
            g[nid] = {"class_type": "PditTestVAE", "inputs": {"seed": 7, "kind": "hunyuan_video_1.5"}}
        elif ct == "AudioEncoderEncode":
            name = g[inp["audio_encoder"][0]]["inputs"]["audio_encoder_name"]
            g[nid] = {"class_type": "PditTestAudioEncoding", "inputs": {
                "audio": inp["audio"], "kind": "wav2vec2_base" if "base" in name else "wav2vec2_large",
                "seed": 300 + _id_number(nid)}}
        elif ct == "CheckpointLoaderSimple" and "ltx" in inp["ckpt_name"].lower():
            _ltx_checkpoint(g, nid)
        elif ct == "LTXVAudioVAELoader" or (ct == "VAELoader" and "ltx" in inp["vae_name"]
                                             and "audio" in inp["vae_name"]):  # (LTX-2.5's audio VAE file)
            g[nid] = {"class_type": "PditTestVAE", "inputs": {"seed": 8, "kind": "ltx2-audio"}}
        elif ct == "VAELoader" and "ltx" in inp["vae_name"]:  # LTX-2.5's video VAE file
            g[nid] = {"class_type": "PditTestVAE", "inputs": {"seed": 7, "kind": "ltxv"}}
        elif ct == "CLIPLoader" and inp.get("type") == "minimax":  # MiniMaxH3ImageToVideo encodes with the CLIP
            g[nid] = {"class_type": "PditTestTextEncoder", "inputs": {"width": MINIMAX_TEXT}}
        elif ct == "VAELoader" and "minimax_h3" in inp["vae_name"] and "video" in inp["vae_name"]:
            g[nid] = {"class_type": "PditTestVAE", "inputs": {"seed": 7, "kind": "minimax_h3"}}
        elif ct == "SAM3_Detect":
            g[nid] = {"class_type": "PditTestSAM3Detect", "inputs": {"image": inp["image"]}}
        elif ct == "SAM3_VideoTrack":
            g[nid] = {"class_type": "PditTestSAM3Track", "inputs": {"images": inp["images"],
                                                                    "max_objects": inp["max_objects"]}}
    # a LoraLoader whose CLIP output only fed the replaced text encoders: its model half (LoraLoaderModelOnly)
    for nid, node in list(g.items()):
        if node["class_type"] == "LoraLoader" and not any(
                g[k]["inputs"][name][1] == 1 for k, name in _consumers(g, nid)):
            inp = node["inputs"]
            g[nid] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": inp["model"], "lora_name": inp["lora_name"], "strength_model": inp["strength_model"]}}


def _ltx_checkpoint(g: dict, nid: str):
    """An LTX all-in-one checkpoint in both runs: its DiT through UNETLoader (the loader the parallel run swaps; both
    read the file's model.diffusion_model.* tensors), its VAE output as the test VAE of LTX's latent shape (ComfyUI's
    LTX VAE at full size only); its CLIP output fed only the replaced text encoders."""
    vae = f"{nid}:9999"
    g[vae] = {"class_type": "PditTestVAE", "inputs": {"seed": 7, "kind": "ltxv"}}
    for k, name in _consumers(g, nid):
        if g[k]["inputs"][name][1] == 2:
            g[k]["inputs"][name] = [vae, 0]
    g[nid] = {"class_type": "UNETLoader", "inputs": {"unet_name": g[nid]["inputs"]["ckpt_name"],
                                                     "weight_dtype": "default"}}


def _pooled(g: dict, clip_link) -> dict:
    """HunyuanVideo 1.0's text encoders give a pooled CLIP-L vector (768) besides the tokens; the others none."""
    loader = g.get(clip_link[0], {})
    return {"pooled_width": 768} if loader.get("inputs", {}).get("type") == "hunyuan_video" else {}


def _text_shape(g: dict, clip_node: str) -> dict:
    """The test conditioning's widths for the text encoder feeding a CLIPTextEncode: umt5's 4096, Kandinsky 5's
    Qwen2.5-VL hidden states (3584) with CLIP-L's pooled vector (768), LTX-Video's T5 with its mask, LTX-2's raw
    Gemma text at the tiny file's width."""
    loaders = _upstream(g, clip_node, "DualCLIPLoader")
    if loaders and str(g[loaders[0]]["inputs"].get("type", "")).startswith("kandinsky5"):
        return {"width": 3584, "pooled_width": 768}
    loader = g.get(clip_node, {})
    gemma = "gemma" in str(loader.get("inputs", {}).get("clip_name", ""))  # LTX-2.5's CLIPLoader (type ltxv too)
    if loader.get("inputs", {}).get("type") == "ltxv" and not gemma:  # LTX-Video's T5 gives a mask (3 pad tokens)
        return {"width": 4096, "masked_tail": 3}
    if loader.get("class_type") == "PditTestTextEncoder" or loader.get("inputs", {}).get("type") == "minimax":
        return {"width": MINIMAX_TEXT}
    if loader.get("class_type") == "LTXAVTextEncoderLoader" or gemma:  # Gemma's raw text for the graph's tiny file
        return {"width": ltx2_text_width(g), "ltxav_raw": True}
    return {"width": 4096}


def ltx2_preset(name: str) -> str:
    """The tiny LTX-2 layout for a file name: LTX-2.3 and 2.5 files the 2.3 layout, others the 2.0 (19B) one."""
    return "tiny_2_3" if any(v in name.lower() for v in ("ltx-2.3", "ltx-2.5")) else "tiny"


def ltx2_text_width(g: dict) -> int:
    """The raw text width of the graph's LTX-2 DiT: 2.0's Gemma features (caption_channels), 2.3's text encoder
    projects them to the streams' widths (video + audio)."""
    from parallel_backend.testing.synthetic import LTXAV_PRESETS
    names = [str(v) for n in g.values() for k, v in n["inputs"].items() if k in ("unet_name", "ckpt_name")]
    presets = {ltx2_preset(n) for n in names if "ltx-2" in n.lower()}
    if len(presets) != 1:
        raise Unconvertible(f"LTX-2 text for DiT files of {len(presets)} layouts: {sorted(names)}")
    p = LTXAV_PRESETS[presets.pop()]
    return p["width"] + p["audio_width"] if p.get("version") == "2.3" else p["caption_channels"]


def _latent_outputs(g: dict, prefix: str) -> dict:
    """The outputs replaced by one SaveLatent per decoded latent (video and audio); the nodes no output needs
    dropped."""
    decoded = {}
    for nid, node in list(g.items()):
        if node["class_type"] in ("VAEDecode", "VAEDecodeTiled", "LTXVAudioVAEDecode", "VAEDecodeAudio"):
            decoded.setdefault(tuple(node["inputs"]["samples"]), nid)
    for nid, node in list(g.items()):
        if node["class_type"].startswith(("Save", "Preview", "CreateVideo")):
            del g[nid]
    saved = []
    for samples, _ in sorted(decoded.items(), key=lambda kv: _id_number(kv[1])):
        saved += _av_split(g, samples)
    for i, samples in enumerate(saved):
        g[f"save{i}"] = {"class_type": "SaveLatent", "inputs": {"samples": samples,
                                                                "filename_prefix": f"{prefix}_{i}"}}
    return _needed(g)


def _needed(g: dict) -> dict:
    """The nodes the "save*" outputs need (an Unconvertible error if one of them was dropped)."""
    keep, todo = set(), [k for k in g if k.startswith("save")]
    while todo:
        k = todo.pop()
        if k not in keep:
            keep.add(k)
            todo += [v[0] for v in g[k]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    missing = sorted(k for k in keep if k not in g)
    if missing:
        raise Unconvertible(f"nodes {missing} are needed but were dropped (text / vision encoders feed another node)")
    return {k: v for k, v in g.items() if k in keep}


SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")


def _av_split(g: dict, samples: tuple) -> list:
    """The latents to save for a decoded one: MiniMax H3's sampled [video, audio] nested latent (which its decoders
    unbind, and SaveLatent cannot store) split by ComfyUI's LTXVSeparateAVLatent into both; any other as it is."""
    minimax = any(n["class_type"].startswith(("MiniMaxH3", "EmptyMiniMaxH3")) for n in g.values())
    if not (minimax and g[samples[0]]["class_type"] in SAMPLERS):
        return [list(samples)]
    split = f"{samples[0]}:9998"
    g[split] = {"class_type": "LTXVSeparateAVLatent", "inputs": {"av_latent": list(samples)}}
    return [[split, 0], [split, 1]]


def tiny_variant(api: dict, prefix: str) -> dict:
    """The converted template, small and self-contained; the change is the same for both runs:
    - CLIPLoader dropped and each CLIPTextEncode replaced by the test conditioning node (random umt5-width tokens);
      a LoraLoader whose CLIP output fed only those becomes LoraLoaderModelOnly (same file and model strength);
    - CLIPVisionLoader dropped and each CLIPVisionEncode replaced by the test CLIP-vision node (random 257 x 1280
      penultimate tokens): ComfyUI detects CLIP-ViT-H only at its full 632 M-parameter size;
    - the Wan 2.2 VAE (48 channels) replaced by the test VAE node (the encoder's shapes, deterministic values):
      ComfyUI fixes its width at 160 (705 M parameters); the Wan 2.1 VAE stays, as a tiny file of its real class;
    - AudioEncoderLoader dropped and each AudioEncoderEncode replaced by the test audio-encoding node (the wav2vec2
      output's shapes for the audio it is given: ComfyUI detects wav2vec2 only at full size); SAM 3's loader dropped
      and SAM3_Detect / SAM3_VideoTrack replaced by test nodes giving rectangles as masks / tracks;
    - width x height x frames set to 96 x 64 x 5 on every node that has them (latent makers, camera embeddings,
      WanDancer's audio features, InfiniteTalk's motion frames, and the primitives feeding them), steps to at most
      4 (samplers and BasicScheduler; a KSamplerAdvanced split scaled with them);
    - beside an InfiniteTalk patch the DiT and its LoRAs are DIT_MULTITALK wide, under MULTITALK_DIR/;
    - LTX and MiniMax H3: an LTX checkpoint's DiT through UNETLoader, test VAEs of their latent shapes, a test
      text-encoder object where a node encodes with the CLIP itself, LTX graphs at 9 frames (docs/templates.md);
    - everything after the sampler (VAE decode, video / image saves and previews) replaced by SaveLatent of the
      decoded latent (video and audio; MiniMax H3's [video, audio] latent split first), so the sampled latents are
      compared, and nodes no output needs dropped.
    Seeds, cfg, samplers, schedulers, shifts, LoRA strengths and every other node stay as the template has them."""
    g = copy.deepcopy(api)
    _stand_ins(g)
    _smaller(g)
    _fewer_steps(g)
    _multitalk_files(g)
    return _latent_outputs(g, prefix)


def tiny_decoded_variant(api: dict, prefix: str) -> dict:
    """tiny_variant with the VAE decode kept: each VAE Decode's IMAGE saved as floats (the test node
    PditTestSaveImage, under <prefix>_<i>) instead of the template's saves and previews, and the Wan 2.2 VAE kept as a
    tiny file of ComfyUI's class (the server must build it at the file's width: comfy_host.tiny_vae_env)."""
    g = copy.deepcopy(api)
    _stand_ins(g, wan22_vae=True)
    _smaller(g)
    _fewer_steps(g)
    _multitalk_files(g)
    decoders = sorted((k for k, n in g.items() if n["class_type"] in ("VAEDecode", "VAEDecodeTiled")), key=_id_number)
    for nid, node in list(g.items()):
        if node["class_type"].startswith(("Save", "Preview", "CreateVideo")):
            del g[nid]
    for i, nid in enumerate(decoders):
        g[f"save{i}"] = {"class_type": "PditTestSaveImage", "inputs": {"images": [nid, 0],
                                                                       "filename_prefix": f"{prefix}_{i}"}}
    return _needed(g)


def parallel_vae_variant(g: dict, old_prefix: str, new_prefix: str, degrees: dict | None = None) -> dict:
    """parallel_variant with each Load VAE replaced by Parallel VAE Loader (fp32) on the same Parallel Config, and the
    PditTestSaveImage prefixes renamed."""
    g = parallel_variant(g, old_prefix, new_prefix, degrees)
    for nid, node in list(g.items()):
        if node["class_type"] == "VAELoader":
            g[nid] = {"class_type": "ParallelVAELoader", "inputs": {
                "vae_name": node["inputs"]["vae_name"], "precision": "fp32", "parallel_config": ["pdit_config", 0]}}
        elif node["class_type"] == "PditTestSaveImage":
            node["inputs"]["filename_prefix"] = node["inputs"]["filename_prefix"].replace(old_prefix, new_prefix, 1)
    return g


def _multitalk_files(g: dict):
    """Beside an InfiniteTalk patch the DiT is DIT_MULTITALK wide: its files (DiT, LoRAs) are named under
    MULTITALK_DIR/, so they never meet the same names' DIT-wide files other templates use."""
    if not any(n["class_type"] == "ModelPatchLoader" and "infinitetalk" in n["inputs"]["name"].lower()
               for n in g.values()):
        return
    for node in g.values():
        for key in ("unet_name", "lora_name"):
            if key in node["inputs"] and node["class_type"] in ("UNETLoader", "LoraLoaderModelOnly", "LoraLoader"):
                node["inputs"][key] = f"{MULTITALK_DIR}/{node['inputs'][key]}"


def parallel_degrees(g: dict) -> dict:
    """The 2-rank mesh for a graph: ulysses 2 (one head per rank), ring 2 for the DIT_MULTITALK width (5 heads)."""
    wide = any(n["class_type"] == "UNETLoader" and n["inputs"]["unet_name"].startswith(MULTITALK_DIR + "/")
               for n in g.values())
    return {"ulysses": 1, "ring": 2} if wide else {"ulysses": 2}


def parallel_variant(g: dict, old_prefix: str, new_prefix: str, degrees: dict | None = None) -> dict:
    """The same graph with only each UNETLoader replaced by Parallel Model Loader (fp32, the same weight_dtype) on one
    Parallel Config (2 CPU ranks; ulysses 2 unless `degrees` says otherwise), and the SaveLatent prefixes renamed."""
    g = copy.deepcopy(g)
    degrees = {"cfg": 1, "ulysses": 2, "ring": 1, "tp": 1, "dp": 1, **(degrees or {})}
    g["pdit_config"] = {"class_type": "ParallelConfig", "inputs": {
        "world_size": 2, **degrees, "dtype": "fp32", "device": "cpu", "attention": "sdpa", "first_device": 0}}
    for nid, node in list(g.items()):
        if node["class_type"] == "UNETLoader":
            g[nid] = {"class_type": "ParallelModelLoader", "inputs": {
                "model_name": node["inputs"]["unet_name"], "base_precision": "fp32",
                "parallel_config": ["pdit_config", 0],
                # the swapped loader keeps the native one's weight_dtype, as a user would set it
                "weight_dtype": node["inputs"].get("weight_dtype", "default")}}
        elif node["class_type"] == "SaveLatent":
            node["inputs"]["filename_prefix"] = node["inputs"]["filename_prefix"].replace(old_prefix, new_prefix, 1)
    return g


# ---- tiny files under the names the graph uses -----------------------------------------------------------------
# model types ComfyUI reads from the file's metadata ("config" -> "transformer"), not from its keys
METADATA_VARIANTS = {"animate_2": {"model_type": "animate2"}, "animate2": {"model_type": "animate2"},
                     "causal_forcing": {"causal_ar": True}}


def dit_config(name: str, dims: dict = DIT) -> tuple[dict, str, dict]:
    """(ComfyUI unet_config for a tiny model of the variant the file name implies, file dtype, the file's
    safetensors metadata). `dims`: width, FFN width and depth (DIT, or DIT_MULTITALK)."""
    n = name.lower()
    wan22 = "wan2.2" in n or "wan2_2" in n
    out_dim = 48 if wan22 and "5b" in n else 16
    cfg = dict(image_model="wan2.1", dim=dims["dim"], ffn_dim=dims["ffn_dim"], num_layers=dims["num_layers"],
               num_heads=dims["dim"] // 128, out_dim=out_dim, patch_size=(1, 2, 2), freq_dim=256,
               window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6, model_type="t2v", in_dim=16)
    cfg.update(_variant(n, wan22, out_dim))
    extra = next((v for k, v in METADATA_VARIANTS.items() if k in n), None)
    metadata = {}
    if extra is not None:
        cfg.update(extra)
        metadata = {"config": json.dumps({"transformer": extra})}
    dtype = ("fp8_scaled" if "fp8" in n and "scaled" in n else "fp8_e4m3fn" if "fp8_e4m3fn" in n else
             "int8" if "int8" in n else "bf16" if "bf16" in n else "fp16" if "fp16" in n else "fp32")
    return cfg, dtype, metadata


def _variant(n: str, wan22: bool, out_dim: int) -> dict:
    """The unet_config entries of the Wan variant a file name implies (what ComfyUI's detection reads from the
    real file's keys)."""
    if "vace" in n:
        return dict(model_type="vace", vace_in_dim=96, vace_layers=1)
    if "fun_camera" in n:
        return dict(model_type="camera_2.2", in_dim=36) if wan22 else dict(model_type="camera", in_dim=32)
    if "fun_control" in n:
        # Wan 2.2 Fun control: latent + control latent + start-image latent + 4 mask channels and ref_conv for the
        # reference image its node passes
        return dict(in_dim=3 * out_dim + 4, in_dim_ref_conv=out_dim) if wan22 else dict(model_type="i2v", in_dim=48)
    if "fun_inp" in n:
        return dict(in_dim=2 * out_dim + 4) if wan22 else dict(model_type="i2v", in_dim=36)
    if "ti2v" in n:
        return dict(in_dim=48)
    if "s2v" in n:
        return dict(model_type="s2v")
    if "scail_2" in n or "scail2" in n:
        return dict(model_type="scail2", in_dim=20)
    if "dancer" in n:
        return dict(model_type="wandancer", in_dim=36)
    if "animate" in n:
        return dict(in_dim=36)
    if wan22 and ("i2v" in n or "flf2v" in n):  # Wan 2.2 A14B I2V: no CLIP-vision embedding
        return dict(in_dim=36)
    if any(k in n for k in ("i2v", "flf2v", "chrono_edit", "wanmove")):  # Wan 2.1 I2V 14B and its fine-tunes
        return dict(model_type="i2v", in_dim=36, **({"flf_pos_embed_token_number": 514} if "flf2v" in n else {}))
    return {}


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


# tiny HunyuanVideo files (2 heads of 128, one double and one single block) with umt5's text width, as the test
# conditioning gives it; 1.0 with its CLIP-L vector and guidance embedders, 1.5 with ByT5 and SigLIP projections, 1.5's
# SR distilled files (`sr_distilled` in the name) with 98 input channels and the meanflow embedding
HUNYUAN_TINY = {"1.5": dict(preset="tiny", text_dim=4096),
                "1.5-sr": dict(preset="tiny-sr-distilled", text_dim=4096),
                "1.0": dict(preset="tiny", text_dim=4096, in_channels=16, out_channels=16, patch=(1, 2, 2), byt5=False,
                            vision=False, guidance=True, vector=True)}


def write_hunyuan_dit(path: str, name: str, seed: int) -> str:
    import torch

    from parallel_backend.testing.synthetic import write_tiny_hunyuan_video
    n = name.lower()
    dtype = torch.bfloat16 if "bf16" in n else torch.float16 if "fp16" in n else torch.float32
    version = ("1.5-sr" if "sr_distilled" in n else "1.5") if "1.5" in n or "15" in n else "1.0"
    return write_tiny_hunyuan_video(path, seed=seed, dtype=dtype, **HUNYUAN_TINY[version])


def write_hunyuan_latent_upsampler(path: str, seed: int = 14) -> str:
    """A random HunyuanVideo 1.5 latent upsampler of ComfyUI's 1080p class (comfy.ldm.hunyuan_video.upsampler
    .Upsampler: ResNet blocks at the size HunyuanVideo15LatentUpscaleWithModel upscaled to), 32 wide: ComfyUI's
    LatentUpscaleModelLoader reads its widths from the file."""
    import torch
    from comfy.ldm.hunyuan_video.upsampler import Upsampler

    from parallel_backend.testing.synthetic import random_tensor, write_safetensors_stream
    with torch.device("meta"):
        model = Upsampler(z_channels=32, out_channels=32, block_out_channels=(32,))
    g = torch.Generator().manual_seed(seed)

    def make(k, s):  # RMS_norm gammas: ones plus noise, like any norm weight
        return 1.0 + 0.1 * torch.randn(s, generator=g) if k.endswith("gamma") else random_tensor(k, s, g)

    return write_safetensors_stream(path, [(k, s, torch.float32, lambda k=k, s=s: make(k, s))
                                           for k, s in host_state_shapes(model).items()])


def write_dit(path: str, name: str, seed: int, dims: dict = DIT) -> str:
    import torch

    from parallel_backend.testing.synthetic import (write_checkpoint, write_fp8_variant, write_tiny_kandinsky5,
                                                    write_tiny_ltxav, write_tiny_ltxv)
    if "hunyuan" in name.lower():
        return write_hunyuan_dit(path, name, seed)
    if "ltx-2" in name.lower():  # LTX-2 (audio + video) of the name's layout: its metadata config gives the widths
        return write_tiny_ltxav(path, seed=seed, preset=ltx2_preset(name))
    if "minimax_h3" in name.lower():
        return write_minimax_dit(path, name, seed)
    if "ltx-video" in name.lower() or "ltxv" in name.lower():
        return write_tiny_ltxv(path, seed=seed)
    if "kandinsky5" in name.lower():  # 6 heads of 64; the image model is 2560 wide (ComfyUI detects it by width)
        image = dict(model_dim=2560, visual_embed_dim=64, visual_blocks=1) if "t2i" in name.lower() else {}
        return write_tiny_kandinsky5(path, seed=seed, **image)
    cfg, dtype, metadata = dit_config(name, dims)
    shapes = wan_dit_shapes(cfg)
    if dtype.startswith("fp8") or dtype == "int8":
        tmp = path + ".fp32"
        write_checkpoint(tmp, shapes, seed=seed, metadata=metadata)
        if dtype == "int8":
            write_int8_variant(tmp, path)
        else:
            write_fp8_variant(tmp, path, scaled=dtype == "fp8_scaled")
        os.remove(tmp)
        return path
    return write_checkpoint(path, shapes, dtype={"fp32": torch.float32, "fp16": torch.float16,
                                                 "bf16": torch.bfloat16}[dtype], seed=seed, metadata=metadata)


def write_minimax_dit(path: str, name: str, seed: int) -> str:
    """A tiny MiniMax H3 (MINIMAX_PRESETS' tiny: 6 heads of 64, 2 blocks); for the int8_convrot release names an int8
    file (ComfyUI's mixed-precision layout on its block linears) at MINIMAX_INT8's widths."""
    from parallel_backend.testing.synthetic import write_tiny_minimax
    if "int8" not in name.lower():
        return write_tiny_minimax(path, seed=seed)
    write_tiny_minimax(path + ".fp32", seed=seed, **MINIMAX_INT8)
    write_int8_variant(path + ".fp32", path)
    os.remove(path + ".fp32")
    return path


def write_int8_variant(src: str, dst: str, convrot: bool = True) -> str:
    """An int8 copy of checkpoint `src` in ComfyUI's mixed-precision layout, as the "int8_convrot" files are: each
    block linear's weight int8 with a per-tensor float32 `weight_scale` (max|w| / 127) and its `comfy_quant` entry
    {"format": "int8_tensorwise", "convrot": true} (without convrot: the plain int8 files); the rest and the file's
    metadata as they are."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    quant = {"format": "int8_tensorwise", **({"convrot": True} if convrot else {})}
    conf = torch.tensor(list(json.dumps(quant).encode()), dtype=torch.uint8)
    out = {}
    for k, t in tensors.items():
        if k.startswith("blocks.") and k.endswith(".weight") and t.ndim == 2:
            scale = (t.float().abs().amax().clamp(min=1e-12) / 127).reshape(())
            layer = k[:-len(".weight")]
            out[k] = (t.float() / scale).round().clamp(-127, 127).to(torch.int8)
            out[layer + ".weight_scale"], out[layer + ".comfy_quant"] = scale, conf.clone()
        else:
            out[k] = t
    save_file(out, dst, metadata=metadata)
    return dst


def write_multitalk_patch(path: str, dim: int, seed: int = 5) -> str:
    """A random InfiniteTalk (MultiTalk) model patch of ComfyUI's class (comfy_extras.nodes_model_patch
    .MultiTalkModelPatch: 40 blocks, 40 heads) for a DiT `dim` wide, audio projection 64 wide (ComfyUI reads the
    widths from the file), fp16."""
    import torch
    from comfy_extras.nodes_model_patch import MultiTalkModelPatch

    import comfy.ops
    from parallel_backend.testing.synthetic import random_tensor, write_safetensors_stream
    with torch.device("meta"):
        patch = MultiTalkModelPatch(audio_window=5, context_tokens=32, vae_scale=4, in_dim=dim, intermediate_dim=64,
                                    out_dim=64, operations=comfy.ops.manual_cast)
    g = torch.Generator().manual_seed(seed)
    return write_safetensors_stream(path, [(k, s, torch.float16, lambda k=k, s=s: random_tensor(k, s, g).half())
                                           for k, s in host_state_shapes(patch).items()])


# a tiny LTX latent upscaler (ComfyUI's LatentUpsampler, read from the file's metadata config): x2 spatial
LTX_UPSAMPLER = dict(in_channels=128, mid_channels=32, num_blocks_per_stage=1, dims=3, spatial_upsample=True,
                     temporal_upsample=False, spatial_scale=2.0, rational_resampler=False)


def write_ltx_latent_upsampler(path: str, seed: int = 13) -> str:
    """A random LTX latent upscale model of ComfyUI's class (comfy.ldm.lightricks.latent_upsampler.LatentUpsampler)
    with its config in the metadata, as LatentUpscaleModelLoader reads it."""
    import torch
    from comfy.ldm.lightricks.latent_upsampler import LatentUpsampler

    import comfy.ops
    from parallel_backend.testing.synthetic import random_tensor, write_safetensors_stream
    with torch.device("meta"):
        model = LatentUpsampler.from_config(LTX_UPSAMPLER, operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(seed)
    return write_safetensors_stream(path, [(k, s, torch.float32, lambda k=k, s=s: random_tensor(k, s, g))
                                           for k, s in host_state_shapes(model).items()],
                                    metadata={"config": json.dumps(LTX_UPSAMPLER)})


def write_block_lora(path: str, model_path: str, fmt: str = "comfy", seed: int = 0, rank: int = 4) -> str:
    """A random rank-4 LoRA in ComfyUI's names (`diffusion_model.<module>.lora_up / lora_down / alpha`) on every
    linear of a DiT file's blocks (LTX's `transformer_blocks.N`, video and audio; MiniMax H3's `blocks.N`)."""
    import torch

    from parallel_backend.testing.synthetic import write_safetensors_stream
    from parallel_backend.weights.reads import read_header
    assert fmt == "comfy", fmt
    header = read_header(model_path)
    g = torch.Generator().manual_seed(seed)
    entries = []
    for key, info in sorted(header.items()):
        module = key.removeprefix("model.diffusion_model.").removesuffix(".weight")
        shape = tuple(info[0]) if isinstance(info, (list, tuple)) else tuple(info)
        if not (module.startswith(("transformer_blocks.", "blocks.")) and key.endswith(".weight") and len(shape) == 2):
            continue
        rows, cols = shape
        up, down = torch.randn(rows, rank, generator=g) * 0.05, torch.randn(rank, cols, generator=g) / cols ** 0.5
        entries += [(f"diffusion_model.{module}.lora_up.weight", (rows, rank), torch.float32, lambda t=up: t),
                    (f"diffusion_model.{module}.lora_down.weight", (rank, cols), torch.float32, lambda t=down: t),
                    (f"diffusion_model.{module}.alpha", (), torch.float32, lambda: torch.tensor(float(rank)))]
    return write_safetensors_stream(path, entries)


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


def write_audio(path: str, seconds: float = 1.0, rate: int = 16000) -> str:
    """A short tone (with an overtone and a fade) as a WAV stream, whatever the file's extension: ComfyUI's
    LoadAudio decodes by content (PyAV)."""
    import wave

    import numpy as np
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 660 * t)) * np.linspace(1, 0.2, t.size)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((tone * 32767).astype("<i2").tobytes())
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
                dims = DIT_MULTITALK if inp["unet_name"].startswith(MULTITALK_DIR + "/") else DIT
                write_dit(p, inp["unet_name"], seed=sum(map(ord, inp["unet_name"])) % 1000, dims=dims)
            made["diffusion_models"].append(inp["unet_name"])
        elif ct == "ModelPatchLoader":
            p = path_of("model_patches", inp["name"])
            if not os.path.exists(p):
                write_multitalk_patch(p, DIT_MULTITALK["dim"])
            made.setdefault("model_patches", []).append(inp["name"])
        elif ct == "LatentUpscaleModelLoader":
            p = path_of("latent_upscale_models", inp["model_name"])
            if not os.path.exists(p):
                write_ltx_latent_upsampler(p)
            made.setdefault("latent_upscale_models", []).append(inp["model_name"])
        elif ct == "VAELoader":
            p = path_of("vae", inp["vae_name"])
            if not os.path.exists(p) and "2.2" in inp["vae_name"]:  # (tiny_decoded_variant keeps it)
                from parallel_backend.testing.synthetic import write_tiny_wan_vae
                write_tiny_wan_vae(p, version="2.2")
            elif not os.path.exists(p):
                write_wan21_vae(p)
            made["vae"].append(inp["vae_name"])
        elif ct == "LoadImage":
            p = path_of("input", inp["image"])
            if not os.path.exists(p):
                write_image(p, seed=len(inp["image"]))
            made["input"].append(inp["image"])
        elif ct == "LoadAudio":
            p = path_of("input", inp["audio"])
            if not os.path.exists(p):
                write_audio(p)
            made["input"].append(inp["audio"])
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
                dit = path_of("diffusion_models", g[unets[0]]["inputs"]["unet_name"])
                unet = g[unets[0]]["inputs"]["unet_name"].lower()
                writer = write_block_lora if "ltx" in unet or "minimax" in unet else write_wan_lora
                writer(p, dit, fmt="comfy", seed=sum(map(ord, name)) % 1000)
            made["loras"].append(name)
    return made
