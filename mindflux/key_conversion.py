"""Key tables: the black-forest-labs (BFL) checkpoint layout of the FLUX transformer, and kohya's
underscored spelling of it and of CLIP, mapped to diffusers module names.

BFL fuses what diffusers keeps apart: `img_attn.qkv` holds to_q/to_k/to_v stacked on the output
axis, and a single block's `linear1` holds q, k, v and the MLP input. One table, module to
modules, says it all; single files (`mindflux.models.single_file`) and LoRA files (`mindflux.lora`) both
read it. Two more rules: BFL's RMS-norm parameter is `scale` (diffusers: `weight`), and the final
layer's modulation is (shift, scale) where diffusers has (scale, shift).
It depends on numpy only and sits on the floor of the layers, so models and LoRA formats
share it without importing each other.
"""

from __future__ import annotations

import re

import numpy as np

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# A BFL module whose output rows are diffusers' in the other order (two halves swapped).
SWAPPED_HALVES = frozenset({"final_layer.adaLN_modulation.1"})

_TOP_LEVEL = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
_DOUBLE = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
}
BFL_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def strip_bfl_prefix(key: str) -> str:
    for prefix in BFL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def bfl_module_targets(module: str) -> tuple[str, ...] | None:
    """The diffusers module(s) behind a BFL module name, in stacking order; None if unknown."""
    if module in _TOP_LEVEL:
        return _TOP_LEVEL[module]
    match = BFL_BLOCK.match(module)
    if not match:
        return None
    kind, index, rest = match.groups()
    if kind == "double_blocks":
        table, prefix = _DOUBLE, "transformer_blocks"
    else:
        table, prefix = _SINGLE, "single_transformer_blocks"
    return tuple(f"{prefix}.{index}.{t}" for t in table[rest]) if rest in table else None


def _inverse_table() -> dict[tuple[str | None, str], tuple[str | None, str, int]]:
    """(block list or None, diffusers suffix) -> (BFL block kind or None, BFL suffix, position in stack)."""
    inverse = {}
    for block_list, kind, table in (("transformer_blocks", "double_blocks", _DOUBLE),
                                    ("single_transformer_blocks", "single_blocks", _SINGLE)):
        for bfl, targets in table.items():
            for pos, target in enumerate(targets):
                inverse[(block_list, target)] = (kind, bfl, pos)
    for bfl, (target,) in _TOP_LEVEL.items():
        inverse[(None, target)] = (None, bfl, 0)
    return inverse


_INVERSE = _inverse_table()
_DIFFUSERS_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def bfl_module_of(diffusers_module: str) -> tuple[str, int] | None:
    """(BFL module, position of this module in the BFL module's stack) for a diffusers module name."""
    match = _DIFFUSERS_BLOCK.match(diffusers_module)
    block_list, index, rest = match.groups() if match else (None, None, diffusers_module)
    found = _INVERSE.get((block_list, rest))
    if found is None:
        return None
    kind, bfl, pos = found
    return (f"{kind}.{index}.{bfl}" if kind else bfl), pos


_UNDERSCORED = {
    None: {name.replace(".", "_"): name for name in _TOP_LEVEL},
    "double_blocks": {name.replace(".", "_"): name for name in _DOUBLE},
    "single_blocks": {name.replace(".", "_"): name for name in _SINGLE},
}
_KOHYA_BLOCK = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")


def bfl_module_from_kohya(name: str) -> str | None:
    """The BFL module behind kohya's `lora_unet_<name>`, which writes the module's dots as underscores."""
    match = _KOHYA_BLOCK.match(name)
    if match is None:
        return _UNDERSCORED[None].get(name)
    kind, index, rest = match.groups()
    found = _UNDERSCORED[kind].get(rest)
    return f"{kind}.{index}.{found}" if found else None


def split_rows(array: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Split a fused weight/bias along its output axis."""
    if sum(sizes) != array.shape[0]:
        raise ValueError(f"cannot split {array.shape[0]} rows into {sizes}")
    return np.split(array, np.cumsum(sizes)[:-1], axis=0)


def swap_halves(array: np.ndarray) -> np.ndarray:
    half = array.shape[0] // 2
    return np.concatenate([array[half:], array[:half]], axis=0)


def bfl_to_diffusers_converter(out_rows):
    """A `convert(key, array)` for ModelMixin.load_weights, reading BFL keys.

    `out_rows(diffusers module)` gives each target's output size, used to split fused weights.
    Keys that are not part of the table are returned unchanged, so they show up as unexpected.
    """

    def convert(key: str, array: np.ndarray):
        name = strip_bfl_prefix(key)
        module, _, param = name.rpartition(".")
        targets = bfl_module_targets(module)
        if targets is None:
            return [(key, array)]
        param = "weight" if param == "scale" else param
        if module in SWAPPED_HALVES:
            array = swap_halves(array)
        pieces = split_rows(array, [out_rows(t) for t in targets]) if len(targets) > 1 else [array]
        return [(f"{t}.{param}", p) for t, p in zip(targets, pieces)]

    return convert


_CLIP_KOHYA = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$")


def clip_module_from_kohya(name: str) -> str | None:
    """kohya's underscored CLIP module name (`lora_te1_<name>`) back to the dotted diffusers one."""
    m = _CLIP_KOHYA.match(name)
    if m is None:
        return None
    index, rest = m.groups()
    rest = rest.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
    return f"text_model.encoder.layers.{index}.{rest}"


def _underscored_diffusers() -> dict[str | None, dict[str, str]]:
    """{block list or None: {module suffix with dots as underscores: dotted suffix}} of FLUX's linear layers."""
    out: dict[str | None, dict[str, str]] = {"transformer_blocks": {}, "single_transformer_blocks": {}, None: {}}
    for (block_list, target) in _INVERSE:
        out[block_list][target.replace(".", "_")] = target
    return out


_UNDERSCORED_DIFFUSERS = _underscored_diffusers()
_UNDERSCORED_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)_(\d+)_(.+)$")


def diffusers_module_from_underscored(name: str) -> str | None:
    """A FLUX transformer module written with underscores (`transformer_blocks_0_attn_to_out_0`, as the
    `lora_transformer_` and `lycoris_` prefixes of some trainers do) back to its dotted name."""
    match = _UNDERSCORED_BLOCK.match(name)
    if match is None:
        return _UNDERSCORED_DIFFUSERS[None].get(name)
    block_list, index, rest = match.groups()
    found = _UNDERSCORED_DIFFUSERS[block_list].get(rest)
    return f"{block_list}.{index}.{found}" if found else None
