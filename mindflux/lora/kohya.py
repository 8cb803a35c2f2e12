"""Export to the kohya / sd-scripts FLUX LoRA format, which ComfyUI loads.

A kohya file adapts BFL modules: `lora_unet_<BFL module, dots as underscores>.lora_down.weight`
(rank, in), `.lora_up.weight` (out, rank) and `.alpha`, applied as W + up @ down * alpha / rank.
CLIP modules are `lora_te1_<module, dots as underscores>` (sd-scripts' FLUX spelling) or `lora_te_`.

diffusers modules fused in the BFL layout (to_q/to_k/to_v -> img_attn.qkv; to_q/to_k/to_v/proj_mlp
-> a single block's linear1) become one LoRA:
  - all targets adapted with the same down matrix and scale (a LoRA that came from a kohya file):
    down is shared and the up matrices are stacked, rank r;
  - otherwise block-diagonal: down stacks every target's down matrix, up puts each target's up
    matrix in its own rows and columns, so up @ down is exactly the stack of the targets' deltas.
    A target without LoRA gets a zero block.
Every block and every module is written at the adapter's largest rank (zero-padded): loaders that
give a whole file one rank (diffusers without metadata) then scale every module right, and
diffusers splits the block-diagonal qkv back into the separate LoRAs. Scales: a block module's
alpha is scale x rank (exact); within one fused module, targets whose scales differ have the ratio
folded into their up matrix; top-level modules (img_in, txt_in, time_in, vector_in, guidance_in,
final_layer) get no alpha and their scale folded into the up matrix, because diffusers refuses
alphas there.
"""

from __future__ import annotations

import numpy as np

from ..key_conversion import SWAPPED_HALVES, bfl_module_of, bfl_module_targets, swap_halves
from .formats import Layouts, LoraWeights

KOHYA_METADATA = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"}


def _pad(w: LoraWeights, rank: int, up_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) of one LoRA at `rank`: extra rank rows/columns are zero, so up @ down is unchanged."""
    down = np.zeros((rank, w.down.shape[1]), np.float32)
    up = np.zeros((w.up.shape[0], rank), np.float32)
    down[: w.rank] = w.down
    up[:, : w.rank] = w.up * np.float32(up_scale) if up_scale != 1.0 else w.up
    return down, up


def _scale(w: LoraWeights) -> float:
    return w.lora_alpha / w.rank


def _write(out: dict, name: str, down: np.ndarray, up: np.ndarray, scale: float, alpha: bool = True) -> None:
    if not alpha and scale != 1.0:
        up = (up * np.float32(scale)).astype(np.float32)
    out[f"{name}.lora_down.weight"] = down
    out[f"{name}.lora_up.weight"] = up
    if alpha:
        out[f"{name}.alpha"] = np.asarray(scale * down.shape[0], np.float32)


def _fused(weights: list[LoraWeights | None], rank: int, out_rows: list[int], in_features: int):
    """(down, up, scale) of a fused BFL module from its targets' LoRAs (None: not adapted)."""
    present = [w for w in weights if w is not None]
    scale = _scale(present[0])
    shared = len(present) == len(weights) and all(
        np.array_equal(w.down, present[0].down) and _scale(w) == scale for w in present)
    if shared:
        padded = [_pad(w, rank) for w in present]
        return padded[0][0], np.concatenate([up for _, up in padded], axis=0), scale
    blocks = len(weights)
    down = np.zeros((blocks * rank, in_features), np.float32)
    up = np.zeros((sum(out_rows), blocks * rank), np.float32)
    row = 0
    for i, (w, rows) in enumerate(zip(weights, out_rows)):
        if w is not None:
            block_down, block_up = _pad(w, rank, _scale(w) / scale)
            down[i * rank:(i + 1) * rank] = block_down
            up[row:row + rows, i * rank:(i + 1) * rank] = block_up
        row += rows
    return down, up, scale


def convert_to_kohya(layers: dict[str, dict[str, LoraWeights]], layouts: Layouts,
                     text_encoder_prefix: str = "lora_te1_") -> dict[str, np.ndarray]:
    """{component: {diffusers module: LoraWeights}} -> kohya keys (fp32 arrays, scalar alphas).

    `layouts` gives the output sizes of fused targets that have no LoRA (their zero rows).
    text_encoder_prefix: sd-scripts' FLUX spelling `lora_te1_` (ComfyUI reads it too), or `lora_te_`,
    the only one diffusers 0.35 reads.
    """
    if text_encoder_prefix not in ("lora_te1_", "lora_te_"):
        raise ValueError(f"text_encoder_prefix must be 'lora_te1_' or 'lora_te_', not {text_encoder_prefix!r}")
    out: dict[str, np.ndarray] = {}
    transformer = layers.get("transformer", {})
    if transformer:
        rank = max(w.rank for w in transformer.values())
        layout = layouts["transformer"]
        modules: dict[str, None] = {}
        for module in transformer:
            found = bfl_module_of(module)
            if found is None:
                raise ValueError(f"{module} has no place in the BFL layout, so kohya has no name for it")
            modules.setdefault(found[0], None)
        for bfl in modules:
            targets = bfl_module_targets(bfl)
            name = "lora_unet_" + bfl.replace(".", "_")
            if len(targets) == 1:
                down, up = _pad(transformer[targets[0]], rank)
                scale = _scale(transformer[targets[0]])
            else:
                down, up, scale = _fused([transformer.get(t) for t in targets], rank,
                                         [layout[t][1] for t in targets], layout[targets[0]][0])
            if bfl in SWAPPED_HALVES:
                up = swap_halves(up)
            # diffusers (0.35) rejects alphas on top-level modules (img_in, final_layer, ...): their scale
            # goes into the up matrix instead, which every reader applies the same way.
            _write(out, name, down, up, scale, alpha=bfl.startswith(("double_blocks.", "single_blocks.")))
    text_encoder = layers.get("text_encoder", {})
    if text_encoder:
        rank = max(w.rank for w in text_encoder.values())
        for module, w in text_encoder.items():
            down, up = _pad(w, rank)
            _write(out, text_encoder_prefix + module.replace(".", "_"), down, up, _scale(w))
    unknown = sorted(set(layers) - {"transformer", "text_encoder"})
    if unknown:
        raise ValueError(f"kohya files hold the transformer and the CLIP text encoder only, not {unknown}")
    return out


def save_kohya_lora(save_path: str, transformer=None, text_encoder=None, adapter_name: str = "default",
                    dtype: str = "fp32", text_encoder_prefix: str = "lora_te1_") -> None:
    """Write an adapter of a transformer (and a CLIP text encoder) as a kohya-format safetensors file.

    `dtype` is the weights' storage (fp32, bf16, fp16); alphas stay fp32. See convert_to_kohya for
    text_encoder_prefix.
    """
    from .loader import adapter_lora_weights, layouts_of, write_lora

    models = {c: m for c, m in (("transformer", transformer), ("text_encoder", text_encoder)) if m is not None}
    if not models:
        raise ValueError("pass the transformer and/or the text encoder whose adapter to export")
    layers = {c: adapter_lora_weights(m, adapter_name) for c, m in models.items()}
    kohya = convert_to_kohya(layers, layouts_of(models), text_encoder_prefix)
    write_lora(save_path, kohya, KOHYA_METADATA, dtype=dtype)
