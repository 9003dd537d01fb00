"""Nodes are V3 (comfy_api) where the host offers it, classic otherwise, from one declaration."""
import sys


def test_v3_where_the_host_has_it(comfy, pack):
    from comfy_api.latest import io
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert issubclass(cls, io.ComfyNode), node_id
        schema = cls.GET_SCHEMA()
        assert schema.node_id == node_id and schema.category == "parallel_dit"
        for inp in schema.inputs:
            assert inp.tooltip, f"{node_id}.{inp.id} has no tooltip"
    # validate_inputs refuses an impossible mesh before the graph runs
    msg = pack.NODE_CLASS_MAPPINGS["ParallelConfig"].validate_inputs(world_size=3, cfg=0, ulysses=2, ring=0, tp=0,
                                                                      dp=0)
    assert isinstance(msg, str) and "world_size" in msg


def test_classic_nodes_on_a_host_without_v3(comfy, pack, monkeypatch):
    schema = sys.modules[pack.__name__ + ".nodes.schema"]
    classic = sys.modules[pack.__name__ + ".nodes"]
    monkeypatch.setattr(schema, "host_has_v3", lambda: False)
    mappings = schema.register(classic.NODE_CLASS_MAPPINGS, classic.NODE_DISPLAY_NAME_MAPPINGS)
    assert mappings == classic.NODE_CLASS_MAPPINGS
    for node_id, cls in mappings.items():
        decl = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in decl.get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name}"
        assert cls.CATEGORY == "parallel_dit" and hasattr(cls, cls.FUNCTION)


def test_parallel_config_asks_the_common_inputs_first(comfy, pack):
    """world size, degrees, dtype, device, attention first (required); placement, pipeline and several machines
    optional and advanced (hidden by a frontend that has advanced widgets), in the saved workflows' order."""
    classic = sys.modules[pack.__name__ + ".nodes"].NODE_CLASS_MAPPINGS["ParallelConfig"]
    decl = classic.INPUT_TYPES()
    assert list(decl["required"]) == ["world_size", "cfg", "ulysses", "ring", "tp", "dp", "dtype", "device",
                                      "attention"]
    advanced = [n for n, spec in decl["optional"].items() if spec[1].get("advanced")]
    assert advanced == ["first_device", "pp", "stage_split", "devices", "nodes", "ranks_per_node", "rendezvous",
                        "secret_file", "rejoin_timeout"]
    v3 = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]
    if hasattr(v3, "GET_SCHEMA"):  # the V3 declaration carries the flag to the frontend too
        shown = {i.id: i.as_dict() for i in v3.GET_SCHEMA().inputs}
        assert [n for n, d in shown.items() if d.get("advanced")] == advanced
