"""The black-forest-labs (BFL) checkpoint layout of the FLUX transformer, mapped to diffusers names.

The key tables (BFL module -> diffusers modules, split/swap rules) live in `key_conversion`; this
module reads a checkpoint's config off its shapes and loads it through them.
"""

from __future__ import annotations

import os

from ..key_conversion import BFL_BLOCK as _BLOCK  # the name infer_config uses
from ..key_conversion import bfl_to_diffusers_converter, strip_bfl_prefix


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
    """FluxTransformer2DModel.from_single_file: build from a BFL-layout file (safetensors, fp8 included, or GGUF).

    The config comes from the checkpoint's shapes; `config` (a dict or a diffusers transformer
    folder) and keyword overrides take precedence, e.g. `axes_dims_rope` for non-FLUX.1 sizes.
    """
    import mindspore as ms
    from mindspore.nn.utils import no_init_parameters

    from ..checkpoints import open_checkpoint
    from ..modeling_utils import resolve_dtype

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    st = open_checkpoint(path)  # safetensors (fp8 too) or GGUF
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
