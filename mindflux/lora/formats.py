"""LoRA file formats for FLUX: which format a file is in, and its keys mapped to diffusers modules.

Accepted formats (`FORMATS`), each key ending in the LoRA down (A) / up (B) matrix or alpha:

    diffusers  transformer.<module>.lora_A.weight / .lora_B.weight (+ .alpha), text_encoder.<module>...;
               keys without the component prefix (PEFT's get_peft_model_state_dict) are the transformer's
    kohya      lora_unet_<BFL module, dots as underscores>.lora_down.weight / .lora_up.weight / .alpha,
               lora_te1_<CLIP module, dots as underscores>... (sd-scripts, musubi-tuner, ComfyUI's loader)
    comfyui    diffusion_model.<BFL module>.lora_down.weight / .lora_up.weight (or lora_A / lora_B) / .alpha,
               text_encoders.clip_l.transformer.<CLIP module>... (files ComfyUI writes)
    bfl        <BFL module>.lora_A.weight / .lora_B.weight, plus full `.scale` values of the q/k RMS norms
               (black-forest-labs' control LoRAs)
    xlabs      double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight,
               single_blocks.N.processor.{qkv,proj}_lora.{down,up}.weight (XLabs-AI)
    mixture    lora_transformer_<diffusers module, dots as underscores>.lora_down.weight / .lora_up.weight /
               .alpha, lora_te1_<CLIP module>... (diffusers' "mixture" branch: some trainers write it)
    fal        base_model.model.<BFL module>.lora_A.weight / .lora_B.weight (PEFT on BFL modules: fal's and
               ostris' FLUX.1 Kontext LoRAs)
    lycoris    LyCORIS LoKr (lokr_w1, lokr_w1_a/_b, lokr_w2, lokr_w2_a/_b) and LoHa (hada_w1_a/_b, hada_w2_a/_b)
               with .alpha, under any of the module names above (lora_unet_, lycoris_, lora_transformer_,
               diffusion_model., transformer.): ai-toolkit, SimpleTuner, kohya-LyCORIS. Their ΔW (see
               lycoris.py) is merged into the base weights at load; deleting the adapter restores them.

BFL module names map to diffusers modules through `mindflux.key_conversion`'s table. A fused
BFL module (img_attn.qkv -> to_q/to_k/to_v; single-block linear1 -> to_q/to_k/to_v/proj_mlp) has
one down matrix and one up matrix: every target gets the whole down matrix and its rows of the up
matrix. When the targets use disjoint columns of the up matrix (a block-diagonal export of separate
q/k/v LoRAs, as mindflux and diffusers write), each target gets only its own columns, which gives
back the separate LoRAs. `final_layer.adaLN_modulation.1` has its output halves swapped.

Alpha is never folded into the weights: every module keeps the file's down/up values and its alpha
(scale = alpha / rank, alpha = rank when the file has none), and the adapter's LoraConfig carries it
as lora_alpha (per module through alpha_pattern). So a kohya file exported again is the same file.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..key_conversion import (
    SWAPPED_HALVES,
    bfl_module_from_kohya,
    bfl_module_targets,
    clip_module_from_kohya,
    diffusers_module_from_underscored,
    split_rows,
    strip_bfl_prefix,
    swap_halves,
)
from .lycoris import PARTS as LYCORIS_PARTS
from .lycoris import delta_weight

FORMATS = ("diffusers", "kohya", "comfyui", "bfl", "xlabs", "mixture", "fal", "lycoris")
COMPONENTS = ("transformer", "text_encoder")

# {component: {diffusers module: (in_features, out_features)}}: the models' linear layers.
Layouts = dict[str, dict[str, tuple[int, int]]]


class LoraFormatError(ValueError):
    """A LoRA file that is in none of the accepted formats."""


DORA_REFUSED = ("DoRA (weight-decomposed LoRA) is not supported: mindflux applies LoRA, LoKr and LoHa; without "
                "its magnitude vectors the rest of a DoRA file would give wrong outputs, so nothing is loaded")


class LoraShapeError(ValueError):
    """A LoRA tensor whose shape does not fit the model; the message names the key and both shapes."""


@dataclass
class LoraWeights:
    """One adapted linear layer: down (A, (r, in)) and up (B, (out, r)) in fp32; alpha None means alpha = r."""

    down: np.ndarray
    up: np.ndarray
    alpha: float | None
    source: str  # the file key of the up matrix, for messages

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class ConvertedLora:
    """A LoRA file in diffusers terms. `unmapped`: every key that did not load, with the reason."""

    format: str
    layers: dict[str, dict[str, LoraWeights]] = field(default_factory=dict)
    base_weights: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # {component: {diffusers module: ΔW (out, in)}}: LyCORIS modules, merged into the weights at load
    deltas: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)


# ---- one key -> (format, component, namespace, module, kind) ----------------------------------
_KINDS = {"lora_A.weight": "down", "lora_down.weight": "down", "down.weight": "down",
          "lora_B.weight": "up", "lora_up.weight": "up", "up.weight": "up", "alpha": "alpha", "scale": "scale"}
_KINDS.update({part: part for part in LYCORIS_PARTS})
_LORA_SUFFIX = (r"lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha|"
                + "|".join(sorted(LYCORIS_PARTS)))
_KOHYA = re.compile(rf"^lora_(unet|te\d?)_(\w+)\.({_LORA_SUFFIX})$")
_UNDERSCORED = re.compile(rf"^(lora_transformer|lycoris)_(\w+)\.({_LORA_SUFFIX})$")
_FAL = "base_model.model."
_XLABS = re.compile(r"^(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\."
                    r"(qkv_lora1|qkv_lora2|proj_lora1|proj_lora2|qkv_lora|proj_lora)\.(down\.weight|up\.weight)$")
_DOTTED = re.compile(rf"^(.+)\.({_LORA_SUFFIX}|scale)$")
_DIFFUSERS = re.compile(r"^(?:(transformer|text_encoder)\.)?(?:base_model\.model\.)?(.+)\."
                        rf"(lora_A\.weight|lora_B\.weight|alpha|{'|'.join(sorted(LYCORIS_PARTS))})$")
_DORA = ("lora_magnitude_vector", "dora_scale")
# Modules a LoRA may widen (more input features than the model's; BFL's Canny / Depth LoRAs on img_in).
WIDENABLE = frozenset({"x_embedder"})

# Full q/k norm weights that control LoRAs replace (diffusers' names for BFL's `.scale`).
_DIFFUSERS_NORM = re.compile(r"^transformer\.(.+\.(?:norm_q|norm_k|norm_added_q|norm_added_k))\.weight$")
_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
              "final_layer.")
_COMFY_CLIP = "text_encoders.clip_l.transformer."
# XLabs processor LoRA -> (BFL module suffix, how many of its targets it feeds: None = all).
_XLABS_MODULES = {"qkv_lora1": ("img_attn.qkv", None), "qkv_lora2": ("txt_attn.qkv", None),
                  "proj_lora1": ("img_attn.proj", None), "proj_lora2": ("txt_attn.proj", None),
                  "qkv_lora": ("linear1", 3), "proj_lora": ("linear2", None)}


@dataclass(frozen=True)
class _Key:
    format: str
    component: str | None  # None: a component mindflux does not load (T5)
    namespace: str  # "bfl" (BFL module names) or "diffusers"
    module: str  # BFL module, kohya underscored name, or diffusers module
    kind: str  # down / up / alpha / scale
    subset: int | None = None  # XLabs single-block qkv: only the first targets of linear1


def _classify(key: str) -> _Key | None:
    parsed = _classify_names(key)
    if parsed is not None and parsed.kind in LYCORIS_PARTS:  # a LyCORIS module under any naming
        return _Key("lycoris", parsed.component, parsed.namespace, parsed.module, parsed.kind, parsed.subset)
    return parsed


def _classify_names(key: str) -> _Key | None:
    if m := _KOHYA.match(key):
        prefix, name, suffix = m.groups()
        component = {"unet": "transformer", "te": "text_encoder", "te1": "text_encoder"}.get(prefix)
        return _Key("kohya", component, "kohya_unet" if prefix == "unet" else "kohya_te", name, _KINDS[suffix])
    if m := _UNDERSCORED.match(key):
        _, name, suffix = m.groups()
        return _Key("mixture", "transformer", "underscored", name, _KINDS[suffix])
    if key.startswith(_FAL) and key[len(_FAL):].startswith(_BFL_ROOTS) and (m := _DOTTED.match(key[len(_FAL):])):
        return _Key("fal", "transformer", "bfl", m.group(1), _KINDS[m.group(2)])
    if m := _XLABS.match(key):
        kind, index, lora, suffix = m.groups()
        module, subset = _XLABS_MODULES[lora]
        if (kind == "double_blocks") != lora.endswith(("1", "2")):
            return None
        return _Key("xlabs", "transformer", "bfl", f"{kind}.{index}.{module}", _KINDS[suffix], subset)
    stripped = strip_bfl_prefix(key)
    if stripped != key and (m := _DOTTED.match(stripped)):
        return _Key("comfyui", "transformer", "bfl", m.group(1), _KINDS[m.group(2)])
    if key.startswith(_COMFY_CLIP) and (m := _DOTTED.match(key[len(_COMFY_CLIP):])):
        return _Key("comfyui", "text_encoder", "diffusers", m.group(1), _KINDS[m.group(2)])
    if key.startswith(_BFL_ROOTS) and (m := _DOTTED.match(key)):
        return _Key("bfl", "transformer", "bfl", m.group(1), _KINDS[m.group(2)])
    if key.startswith("text_encoder_2.") and _DIFFUSERS.match(key):  # diffusers' name for FLUX's T5
        return _Key("diffusers", None, "diffusers", key, "down")
    if m := _DIFFUSERS_NORM.match(key):
        return _Key("diffusers", "transformer", "diffusers", m.group(1), "scale")
    if m := _DIFFUSERS.match(key):
        component, module, suffix = m.groups()
        return _Key("diffusers", component or "transformer", "diffusers", module, _KINDS[suffix])
    return None


def detect_format(state_dict: dict) -> str:
    """The format most of the file's keys are in (one of FORMATS); LoraFormatError if none is."""
    counts = Counter(k.format for k in map(_classify, state_dict) if k is not None)
    if not counts:
        example = next(iter(state_dict), "(no keys)")
        raise LoraFormatError(f"not a LoRA file in a known format (first key: {example}); accepted formats: "
                              f"{', '.join(FORMATS)}")
    return counts.most_common(1)[0][0]


# ---- conversion ----------------------------------------------------------------------------------
def _scalar(value: np.ndarray) -> float | None:
    array = np.asarray(value)
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _split_sizes(targets: tuple[str, ...], layout: dict[str, tuple[int, int]] | None, down: np.ndarray,
                 rows: int) -> list[int]:
    if layout is not None:
        return [layout[t][1] for t in targets]
    # Without a model: q/k/v outputs equal the block width, which is the fused layer's input width.
    if len(targets) == 4:
        width = down.shape[1]
        return [width, width, width, rows - 3 * width]
    return [rows // len(targets)] * len(targets)


def _split_fused(down: np.ndarray, pieces: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """(down, up) per target of a fused module; None for a target whose rows are all zero when the
    others use disjoint columns (a block-diagonal file: the target had no LoRA)."""
    support = [np.flatnonzero(np.any(p != 0, axis=0)) for p in pieces]
    used = [s for s in support if s.size]
    disjoint = len(used) > 0 and sum(s.size for s in used) == np.unique(np.concatenate(used)).size
    if len(pieces) == 1 or not disjoint:
        return [(down, p) for p in pieces]
    return [(down[s], p[:, s]) if s.size else None for s, p in zip(support, pieces)]


def _te_module(name: str, layout: dict[str, tuple[int, int]] | None) -> str | None:
    """kohya's underscored CLIP module name back to the dotted one."""
    if layout is not None:
        return {m.replace(".", "_"): m for m in layout}.get(name)
    return clip_module_from_kohya(name)


def convert_to_diffusers(state_dict: dict[str, np.ndarray], layouts: Layouts | None = None) -> ConvertedLora:
    """Map a LoRA state dict of any accepted format to diffusers modules.

    `layouts` (the models' linear layers) resolves kohya names, sizes fused splits and checks every
    shape: the first tensor that does not fit raises LoraShapeError naming it and both shapes.
    Keys that cannot be mapped are returned in `unmapped` with the reason; nothing is dropped silently.
    """
    result = ConvertedLora(format=detect_format(state_dict))
    groups: dict[tuple, dict[str, tuple[str, np.ndarray]]] = {}
    for key, value in state_dict.items():
        parsed = _classify(key)
        if parsed is None:
            result.unmapped[key] = _why_not(key)
            continue
        if parsed.component is None:
            result.unmapped[key] = "a T5 LoRA: mindflux loads LoRAs of the transformer and of CLIP only"
            continue
        # not by format: a LyCORIS module's .alpha key reads as kohya's
        group = groups.setdefault((parsed.component, parsed.namespace, parsed.module, parsed.subset), {})
        if parsed.kind in group:  # e.g. both lora_A and lora_down for one module
            result.unmapped[key] = f"a second {parsed.kind} of the module of {group[parsed.kind][0]}, which is loaded"
            continue
        group[parsed.kind] = (key, value)

    for (component, namespace, module, subset), parts in groups.items():
        keys = [key for key, _ in parts.values()]
        layout = layouts.get(component) if layouts is not None else None
        if layouts is not None and layout is None:
            _unmap(result, keys, f"LoRA for the {component}, which this pipeline does not have")
            continue
        if namespace == "kohya_unet":
            module, namespace = bfl_module_from_kohya(module), "bfl"
        elif namespace == "kohya_te":
            module, namespace = _te_module(module, layout), "diffusers"
        elif namespace == "underscored":
            module, namespace = _underscored_module(module, layout), "diffusers"
        if module is None:
            _unmap(result, keys, "no FLUX module has this kohya name")
            continue
        targets = bfl_module_targets(module) if namespace == "bfl" else (module,)
        if targets is None:
            _unmap(result, keys, f"{module} is not a module of the BFL FLUX layout")
            continue
        if subset is not None:
            targets = targets[:subset]
        if "scale" in parts:
            _add_scale(result, component, module, targets, parts.pop("scale"), layout)
        if not parts:
            continue
        if any(kind in LYCORIS_PARTS for kind in parts):
            _add_delta(result, component, module, targets, parts, layout)
            continue
        if "down" not in parts or "up" not in parts:
            missing = "up" if "down" in parts else "down"
            _unmap(result, [key for key, _ in parts.values()], f"its LoRA {missing} matrix is missing")
            continue
        missing_targets = [t for t in targets if layout is not None and t not in layout]
        if missing_targets:
            _unmap(result, [key for key, _ in parts.values()],
                   f"the {component} has no linear layer {missing_targets[0]}")
            continue
        _add_lora(result, component, module, targets, parts, layout)
    return result


def _underscored_module(name: str, layout: dict[str, tuple[int, int]] | None) -> str | None:
    if layout is not None:
        return {m.replace(".", "_"): m for m in layout}.get(name)
    return diffusers_module_from_underscored(name)


def _why_not(key: str) -> str:
    if key.endswith((".lora_B.bias", ".lora_up.bias")):
        return "LoRA biases (PEFT's lora_bias) are not supported"
    if any(d in key for d in _DORA):
        return DORA_REFUSED
    if key.endswith((".diff", ".diff_b")):
        return "full weight differences (.diff / .diff_b) are not supported"
    return "not a LoRA key of any accepted format"


def _unmap(result: ConvertedLora, keys: list[str], reason: str) -> None:
    for key in keys:
        result.unmapped[key] = reason


def _add_scale(result, component, module, targets, entry, layout) -> None:
    key, value = entry
    if len(targets) != 1 or not module.endswith(("query_norm", "key_norm", "norm_q", "norm_k", "norm_added_q",
                                                  "norm_added_k")):
        result.unmapped[key] = "full weights other than the q/k norm scales of a BFL control LoRA are not loaded"
        return
    param = f"{targets[0]}.weight"
    result.base_weights.setdefault(component, {})[param] = np.asarray(value, np.float32)


def _add_delta(result, component, module, targets, parts, layout) -> None:
    """A LyCORIS module: its ΔW, checked against the model and split over the targets of a fused module."""
    keys = {kind: key for kind, (key, _) in parts.items()}
    where = next(iter(keys.values())).rsplit(".", 1)[0]
    plain = sorted(set(parts) - LYCORIS_PARTS - {"alpha"})
    if plain:
        raise LoraShapeError(f"{where} mixes LyCORIS tensors with LoRA {plain[0]} matrices")
    alpha = None
    if "alpha" in parts:
        alpha = _scalar(parts["alpha"][1])
        if alpha is None:
            raise LoraShapeError(f"LoRA key {keys['alpha']} has shape {np.shape(parts['alpha'][1])}, alpha must be "
                                 "a single number")
    delta = delta_weight({k: v for k, (_, v) in parts.items() if k in LYCORIS_PARTS}, alpha, where)
    if layout is not None:
        expected = (sum(layout[t][1] for t in targets), layout[targets[0]][0])
        if delta.shape != expected:
            raise LoraShapeError(f"LyCORIS module {where} gives a weight difference of shape {delta.shape}, the model "
                                 f"expects {expected}")
    if module in SWAPPED_HALVES:
        delta = swap_halves(delta)
    sizes = [layout[t][1] for t in targets] if layout is not None else [delta.shape[0] // len(targets)] * len(targets)
    deltas = result.deltas.setdefault(component, {})
    for target, piece in zip(targets, split_rows(delta, sizes) if len(targets) > 1 else [delta]):
        if target in deltas or target in result.layers.get(component, {}):
            raise ValueError(f"LyCORIS module {where} adapts {target}, which another module of the file adapts too")
        deltas[target] = np.ascontiguousarray(piece)


def _add_lora(result, component, module, targets, parts, layout) -> None:
    down_key, down = parts["down"]
    up_key, up = parts["up"]
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    alpha = None
    if "alpha" in parts:
        alpha = _scalar(parts["alpha"][1])
        if alpha is None:
            raise LoraShapeError(f"LoRA key {parts['alpha'][0]} has shape {np.shape(parts['alpha'][1])}, "
                                 f"alpha must be a single number")
    if down.ndim != 2:
        raise LoraShapeError(f"LoRA key {down_key} has shape {down.shape}, expected a matrix (rank, in_features)")
    rank = down.shape[0]
    if layout is not None:
        in_features = layout[targets[0]][0]
        # control LoRAs read more inputs on x_embedder: the loader widens it (mindflux/lora/expand.py)
        if down.shape[1] != in_features and not (targets[0] in WIDENABLE and down.shape[1] > in_features):
            raise LoraShapeError(f"LoRA key {down_key} has shape {down.shape}, "
                                 f"the model expects ({rank}, {in_features})")
    sizes = _split_sizes(targets, layout, down, up.shape[0] if up.ndim == 2 else 0)
    expected = (sum(sizes), rank)
    if up.shape != expected:
        raise LoraShapeError(f"LoRA key {up_key} has shape {up.shape}, the model expects {expected}")
    if module in SWAPPED_HALVES:
        up = swap_halves(up)
    pieces = split_rows(up, sizes) if len(targets) > 1 else [up]
    layers = result.layers.setdefault(component, {})
    for target, piece in zip(targets, _split_fused(down, pieces)):
        if piece is None:
            continue
        if target in layers:
            raise ValueError(f"LoRA keys {layers[target].source} and {up_key} both adapt {target}")
        part_down, part_up = piece
        part_alpha = alpha
        if part_down.shape[0] != rank:  # a target using only some of the rank keeps the scale alpha / rank
            part_alpha = (rank if alpha is None else alpha) * part_down.shape[0] / rank
        layers[target] = LoraWeights(np.ascontiguousarray(part_down), np.ascontiguousarray(part_up), part_alpha, up_key)
