"""V3 schema where the host offers it: each node is written once in the classic form
(INPUT_TYPES with a tooltip on every input, RETURN_TYPES, CATEGORY, VALIDATE_INPUTS) and, when
ComfyUI has `comfy_api.latest`, registered as an `io.ComfyNode` derived from that declaration.

The derived class keeps the classic method (e.g. `ParallelConfig().make(...)`), so scripts
written against either form keep working; on an older host the classic class is registered as is.
"""
from __future__ import annotations


def host_has_v3() -> bool:
    try:
        from comfy_api.latest import io  # noqa: F401
        return True
    except ImportError:
        return False


def _io_type(io, kind):
    known = {"MODEL": io.Model, "CONDITIONING": io.Conditioning, "LATENT": io.Latent, "STRING": io.String,
             "INT": io.Int, "FLOAT": io.Float, "BOOLEAN": io.Boolean, "IMAGE": io.Image, "*": io.AnyType}
    return known.get(kind) or io.Custom(kind)


_PASS = {"INT": ("default", "min", "max", "step", "control_after_generate", "display_mode"),
         "FLOAT": ("default", "min", "max", "step", "round", "display_mode"),
         "STRING": ("default", "multiline", "placeholder"),
         "BOOLEAN": ("default", "label_on", "label_off")}


def _io_input(io, name, decl, optional):
    kind, opts = decl[0], (decl[1] if len(decl) > 1 else {})
    common = {"tooltip": opts.get("tooltip"), "optional": optional}
    if isinstance(kind, (list, tuple)):
        made = io.Combo.Input(name, options=list(kind), default=opts.get("default"), **common)
    else:
        extra = {k: opts[k] for k in _PASS.get(kind, ()) if k in opts}
        made = _io_type(io, kind).Input(name, **extra, **common)
    # on the built input's extra_dict (as_dict merges it on every host): 0.3.75's Int.Input etc. take neither
    # `advanced=` nor `extra_dict=` (0.33's and 0.38's, Comfy-Org/ComfyUI 04e2a91, take both); it reaches
    # object_info as the classic declaration's flag does
    if opts.get("advanced") and isinstance(getattr(made, "extra_dict", None), dict):
        made.extra_dict["advanced"] = True
    return made


def v3_from_classic(classic, node_id: str, display_name: str):
    """An io.ComfyNode equivalent to a classic node class."""
    from comfy_api.latest import io

    def define_schema(cls):
        decl = classic.INPUT_TYPES()
        inputs = [_io_input(io, n, d, False) for n, d in decl.get("required", {}).items()]
        inputs += [_io_input(io, n, d, True) for n, d in decl.get("optional", {}).items()]
        names = getattr(classic, "RETURN_NAMES", classic.RETURN_TYPES)
        tips = getattr(classic, "OUTPUT_TOOLTIPS", (None,) * len(classic.RETURN_TYPES))
        outputs = [_io_type(io, k).Output(display_name=n, tooltip=t)
                   for k, n, t in zip(classic.RETURN_TYPES, names, tips)]
        return io.Schema(node_id=node_id, display_name=display_name, category=classic.CATEGORY,
                         description=getattr(classic, "DESCRIPTION", ""), inputs=inputs, outputs=outputs,
                         is_output_node=getattr(classic, "OUTPUT_NODE", False))

    def execute(cls, **kwargs):
        return io.NodeOutput(*getattr(classic(), classic.FUNCTION)(**kwargs))

    attrs = {"define_schema": classmethod(define_schema), "execute": classmethod(execute),
             # the classic entry point, for scripts and tests
             classic.FUNCTION: lambda self, *a, **k: getattr(classic(), classic.FUNCTION)(*a, **k),
             "classic": classic}
    if hasattr(classic, "VALIDATE_INPUTS"):
        attrs["validate_inputs"] = classmethod(lambda cls, **kw: classic.VALIDATE_INPUTS(**kw))
    return type(node_id, (io.ComfyNode,), attrs)


def register(classic_mappings: dict, display_names: dict) -> dict:
    """The mapping ComfyUI should register: V3 classes where available, the classic ones otherwise."""
    if not host_has_v3():
        return dict(classic_mappings)
    return {nid: v3_from_classic(cls, nid, display_names.get(nid, nid)) for nid, cls in classic_mappings.items()}
