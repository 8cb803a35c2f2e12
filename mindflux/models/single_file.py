"""The black-forest-labs (BFL) checkpoint layout of the FLUX transformer, mapped to diffusers names.

BFL fuses what diffusers keeps apart: `img_attn.qkv` holds to_q/to_k/to_v stacked on the output
axis, and a single block's `linear1` holds q, k, v and the MLP input. One table, module to
modules, says it all; the same table maps LoRA files (kohya, BFL) in `mindflux.lora`.
Two more rules: BFL's RMS-norm parameter is `scale` (diffusers: `weight`), and the final
layer's modulation is (shift, scale) where diffusers has (scale, shift).
"""

from __future__ import annotations

import os
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
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def strip_bfl_prefix(key: str) -> str:
    for prefix in BFL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def bfl_module_targets(module: str) -> tuple[str, ...] | None:
    """The diffusers module(s) behind a BFL module name, in stacking order; None if unknown."""
    if module in _TOP_LEVEL:
        return _TOP_LEVEL[module]
    match = _BLOCK.match(module)
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


def infer_config(keys: dict[str, tuple[int, ...]]) -> dict:
    """A FluxTransformer2DModel config read off a BFL checkpoint's key names and shapes."""
    shapes = {strip_bfl_prefix(k): v for k, v in keys.items()}
    if "img_in.weight" not in shapes:
        raise ValueError("not a BFL FLUX transformer checkpoint: no img_in.weight")

    def count(kind: str) -> int:
        found = [int(m.group(2)) for k in shapes if (m := _BLOCK.match(k)) and m.group(1) == kind]
        return max(found) + 1 if found else 0

    inner, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0] if count("double_blocks") else \
        shapes["single_blocks.0.norm.query_norm.scale"][0]
    return {
        "in_channels": in_channels,
        "out_channels": shapes["final_layer.linear.weight"][0],
        "num_layers": count("double_blocks"),
        "num_single_layers": count("single_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
    }


def load_bfl_transformer(cls, path: str, config: dict | str | None = None, mindspore_dtype=None, **overrides):
    """FluxTransformer2DModel.from_single_file: build from a BFL-layout safetensors file.

    The config comes from the checkpoint's shapes; `config` (a dict or a diffusers transformer
    folder) and keyword overrides take precedence, e.g. `axes_dims_rope` for non-FLUX.1 sizes.
    """
    import mindspore as ms
    from mindspore.nn.utils import no_init_parameters

    from ..modeling_utils import resolve_dtype
    from ..safetensors_io import SafetensorsFile

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    st = SafetensorsFile(path)
    inferred = infer_config({k: st.shape(k) for k in st.keys()})
    if isinstance(config, str):
        config = cls.load_config(config)
    settings = {**inferred, **(config or {}), **overrides}
    with no_init_parameters():
        model = cls.from_config(settings)
    params = model.state_dict()
    convert = bfl_to_diffusers_converter(lambda module: params[f"{module}.weight"].shape[0])
    model.load_weights(path, dtype=resolve_dtype(mindspore_dtype) or ms.float32, convert=convert)
    model.set_train(False)
    return model
