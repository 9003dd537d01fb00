"""The shipped workflows as the browser draws them: every widget of the pack's nodes has its value, and no two
node boxes overlap once each box is as tall as the frontend makes it for its slots and widgets."""
import glob
import json
import os
import sys

import pytest

import comfy_host

WORKFLOWS = sorted(p for p in glob.glob(os.path.join(comfy_host.REPO, "workflows", "*.json"))
                   if not p.endswith("_api.json"))
# the frontend's litegraph metrics (comfyui-frontend-package 1.32 / 1.49): the title bar is drawn above the node's
# position, each input / output row is a slot, a widget row is 20 px plus 4 between; a prompt box is taller
TITLE_H, SLOT_H, WIDGET_H, TEXT_BOX_H, MARGIN = 30, 20, 24, 90, 8
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@pytest.fixture(scope="module")
def declarations() -> dict:
    """The pack's classic declarations (class name -> INPUT_TYPES()): what the browser builds its nodes from (the
    loader's lists its model folders through ComfyUI's folder_paths)."""
    comfy_host.import_comfy()
    pack = comfy_host.import_pack()
    return {name: cls.INPUT_TYPES() for name, cls in sys.modules[pack.__name__ + ".nodes"].NODE_CLASS_MAPPINGS.items()}


def _drawn_rows(decl: dict) -> tuple:
    """(socket inputs, widget rows) the frontend draws for a declaration: optional ones too, a seed's
    control_after_generate as a row of its own."""
    sockets = widgets = 0
    for section in ("required", "optional"):
        for spec in decl.get(section, {}).values():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list) or kind in WIDGET_KINDS:
                widgets += 2 if opts.get("control_after_generate") else 1
            else:
                sockets += 1
    return sockets, widgets


def _box(node: dict, declarations: dict) -> tuple:
    """(x0, y0, x1, y1) of a node as drawn: its saved size, grown to what its slots and widgets need."""
    slots, widgets = len(node.get("inputs", [])), len(node.get("widgets_values", []))
    if node["type"] in declarations:  # every declared widget and unlinked optional socket is drawn
        sockets, declared = _drawn_rows(declarations[node["type"]])
        slots, widgets = max(slots, sockets), max(widgets, declared)
    text_box = TEXT_BOX_H if node["type"] == "CLIPTextEncode" else 0
    needed = MARGIN + SLOT_H * max(slots, len(node.get("outputs", [])), 1) + WIDGET_H * widgets + text_box
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_H, x + w, y + max(h, needed)


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_the_pack_nodes_carry_every_widget(path, declarations):
    """The browser fills widgets from widgets_values in order: a shorter list would leave the box sized for fewer
    widgets than it draws."""
    for node in json.load(open(path))["nodes"]:
        if node["type"] in declarations:
            assert len(node["widgets_values"]) == _drawn_rows(declarations[node["type"]])[1], \
                f"{node['type']} (node {node['id']}): widgets_values does not name every widget"


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_no_two_nodes_overlap(path, declarations):
    nodes = json.load(open(path))["nodes"]
    boxes = {n["id"]: (n["type"], _box(n, declarations)) for n in nodes}
    overlaps = [(ta, tb) for a, (ta, ba) in boxes.items() for b, (tb, bb) in boxes.items()
                if a < b and ba[0] < bb[2] and bb[0] < ba[2] and ba[1] < bb[3] and bb[1] < ba[3]]
    assert overlaps == [], f"{os.path.basename(path)}: overlapping nodes {overlaps}"


def test_the_files_are_what_the_builder_writes():
    """workflows/*.json are build_workflows.py's output (so the layout tested above is the one it makes)."""
    import build_workflows as bw
    for name, spec in bw.WORKFLOWS.items():
        for suffix, data in (("", bw.to_ui(spec)), ("_api", bw.to_api(spec))):
            with open(os.path.join(comfy_host.REPO, "workflows", f"{name}{suffix}.json")) as f:
                assert json.load(f) == data, f"{name}{suffix}.json: run python workflows/build_workflows.py"
