"""What Cosmos Predict2 (cosmos.py) and Cosmos 1.0 (cosmos1.py) share: their files' key prefixes (the release's `net.`
as well as ComfyUI's) and diffusers' own key converter, run on key names only."""
from __future__ import annotations

from ..weights.checkpoint import MODEL_PREFIXES, strip_prefix, stripped_shapes

COSMOS_PREFIXES = ("net.", *MODEL_PREFIXES)


def strip_cosmos(key: str) -> str:
    """A Cosmos file's key as the module path it names (`net.` or ComfyUI's prefix dropped)."""
    return strip_prefix(key, COSMOS_PREFIXES)


def cosmos_shapes(header: dict) -> dict:
    """module path -> shape for every tensor of a Cosmos file's header."""
    return stripped_shapes(header, COSMOS_PREFIXES)


def converted_names(keys_by_name, generation: str) -> dict:
    """diffusers parameter name -> checkpoint key: diffusers' Cosmos converter run on `keys_by_name` (a mapping of the
    names it expects to the file's keys, so its values stay the keys); a variant it would need tensors for is refused,
    naming the `generation`."""
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    converted = convert_cosmos_transformer_checkpoint_to_diffusers(keys_by_name)
    bad = [k for k, v in converted.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{generation} key conversion needs tensor values for {bad[:3]}: unsupported variant")
    return dict(converted)
