"""LoRA files on disk and adapters in models: reading, writing, and turning mapped weights into adapters.

A diffusers LoRA file is `pytorch_lora_weights.safetensors` with PEFT keys prefixed by component
(`transformer.`, `text_encoder.`) and, in the safetensors metadata, `lora_adapter_metadata`: the JSON
of each component's LoraConfig fields prefixed the same way (`"transformer.r": 4`, ...).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import replace

import mindspore as ms
import numpy as np
from mindspore import nn

from ..adapters.layer import LoraConfig
from ..safetensors_io import FP8_DTYPES, SafetensorsFile, float32_to_bf16_bits, save_file
from .formats import COMPONENTS, Layouts, LoraShapeError, LoraWeights

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_NOT_WEIGHTS = ("scheduler", "optimizer", "checkpoint")  # diffusers skips these names when guessing


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, ms.Tensor):
        return value.astype(ms.float32).asnumpy() if value.dtype == ms.bfloat16 else value.asnumpy()
    return np.asarray(value)


def lora_file_path(path: str, weight_name: str | None = None, subfolder: str | None = None) -> str:
    """The safetensors file a `load_lora_weights` argument means: a file, or a folder (+ weight_name)."""
    folder_or_file = os.path.join(path, subfolder) if subfolder else str(path)
    if os.path.isfile(folder_or_file):
        return folder_or_file
    if not os.path.isdir(folder_or_file):
        raise FileNotFoundError(f"LoRA {folder_or_file} does not exist (a Hub repo id is written org/name)")
    if weight_name is not None:
        file = os.path.join(folder_or_file, weight_name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{folder_or_file} has no {weight_name}")
        if not weight_name.endswith(".safetensors"):
            raise ValueError(f"{weight_name}: only .safetensors LoRA files are read (convert pickled .bin files)")
        return file
    if os.path.isfile(os.path.join(folder_or_file, LORA_WEIGHT_NAME_SAFE)):
        return os.path.join(folder_or_file, LORA_WEIGHT_NAME_SAFE)
    found = sorted(n for n in os.listdir(folder_or_file)
                   if n.endswith(".safetensors") and not any(s in n for s in _NOT_WEIGHTS))
    if len(found) != 1:
        raise FileNotFoundError(f"{folder_or_file} has no {LORA_WEIGHT_NAME_SAFE} and "
                                f"{'no' if not found else len(found)} other .safetensors files"
                                f"{': ' + ', '.join(found) if found else ''}; pass weight_name=")
    return os.path.join(folder_or_file, found[0])


def read_lora(pretrained_model_name_or_path_or_dict, weight_name: str | None = None,
              subfolder: str | None = None) -> tuple[dict[str, np.ndarray], dict | None]:
    """(state dict with fp32 arrays, lora_adapter_metadata or None) of a file, a folder or a dict."""
    if isinstance(pretrained_model_name_or_path_or_dict, dict):
        return {k: _to_numpy(v) for k, v in pretrained_model_name_or_path_or_dict.items()}, None
    st = SafetensorsFile(lora_file_path(str(pretrained_model_name_or_path_or_dict), weight_name, subfolder))
    state = {}
    for name in st.keys():
        array, dtype = st.get(name)
        # LoRA weights stay fp32 in mindflux whatever the file stores (BF16, F16 and fp8 widen exactly).
        if dtype in ("BF16", *FP8_DTYPES):
            state[name] = st.get_float32(name)
        elif dtype in ("F16", "F32", "F64"):
            state[name] = np.array(array, np.float32)
        else:
            state[name] = np.array(array)
    raw = st.metadata.get(LORA_ADAPTER_METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError as err:
        raise ValueError(f"{st.path}: {LORA_ADAPTER_METADATA_KEY} is not valid JSON ({err})") from None
    return state, metadata


def split_metadata(metadata: dict | None) -> dict[str, dict]:
    """{"transformer.r": 4, ...} -> {"transformer": {"r": 4, ...}}."""
    out: dict[str, dict] = {}
    for key, value in (metadata or {}).items():
        component, _, field_name = key.partition(".")
        out.setdefault(component, {})[field_name] = value
    return out


def pack_metadata(configs: dict[str, dict | LoraConfig | None]) -> dict[str, str]:
    """The safetensors metadata diffusers writes: `format` and the prefixed config JSON."""
    packed = {}
    for component, config in configs.items():
        if config is None:
            continue
        config = config.to_dict() if isinstance(config, LoraConfig) else dict(config)
        packed.update({f"{component}.{k}": sorted(v) if isinstance(v, (set, frozenset)) else v
                       for k, v in config.items()})
    metadata = {"format": "pt"}
    if packed:
        metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    return metadata


def write_lora(path: str, tensors: dict, metadata: dict[str, str] | None = None, dtype: str = "fp32",
               fp32_prefixes: tuple[str, ...] = ()) -> None:
    """A safetensors LoRA file, weights in `dtype` (fp32, fp16 or bf16), scalars (alphas) and the weights
    whose names start with one of `fp32_prefixes` (diffusers keeps a trained CLIP's in fp32) in fp32."""
    if dtype not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"LoRA files are written as fp32, fp16 or bf16, not {dtype!r}")
    out = {}
    for name, value in tensors.items():
        array = np.asarray(_to_numpy(value), np.float32)
        if fp32_prefixes and name.startswith(fp32_prefixes):
            out[name] = (array, "F32")
        elif dtype == "bf16" and array.ndim:
            out[name] = (float32_to_bf16_bits(array), "BF16")
        elif dtype == "fp16" and array.ndim:
            out[name] = (array.astype(np.float16), "F16")
        else:
            out[name] = (array, "F32")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(out, path, metadata=metadata)


# ---- models --------------------------------------------------------------------------------------
def linear_layout(model: nn.Cell) -> dict[str, tuple[int, int]]:
    """{module: (in_features, out_features)} of a model's linear layers (LoRA's own layers excluded)."""
    return {name: (cell.in_channels, cell.out_channels) for name, cell in model.cells_and_names()
            if isinstance(cell, nn.Dense) and name and ".lora_" not in name}


def layouts_of(models: dict[str, nn.Cell | None]) -> Layouts:
    return {component: linear_layout(model) for component, model in models.items() if model is not None}


def lora_config_for(layers: dict[str, LoraWeights], metadata: dict | None = None) -> LoraConfig:
    """The LoraConfig of an adapter loaded from `layers`.

    With the file's metadata: that config, whose rank for every module must match the file. Without:
    diffusers' derivation (the most common rank and alpha, rank_pattern / alpha_pattern for the
    others), except that a module without alpha gets alpha = its own rank (diffusers gives every
    module the first module's rank, which mis-scales files of mixed ranks).
    """
    explicit = {m: w.alpha for m, w in layers.items() if w.alpha is not None}
    if metadata is not None:
        config = LoraConfig.from_dict(metadata)
        for module, w in layers.items():
            expected = config.for_module(module).r
            if expected != w.rank:
                raise LoraShapeError(f"LoRA key {w.source} has rank {w.rank}, but the file's "
                                     f"{LORA_ADAPTER_METADATA_KEY} gives {module} r={expected}")
        overrides = {_exact(m): a for m, a in explicit.items() if config.for_module(m).lora_alpha != a}
        # Exact-name patterns go first: PEFT uses the first pattern that matches.
        return replace(config, alpha_pattern={**overrides, **config.alpha_pattern}) if overrides else config
    ranks = {m: w.rank for m, w in layers.items()}
    alphas = {m: w.lora_alpha for m, w in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=sorted(layers),
                      rank_pattern={_exact(m): v for m, v in ranks.items() if v != r},
                      alpha_pattern={_exact(m): v for m, v in alphas.items() if v != lora_alpha})


def _exact(module: str) -> str:
    return "^" + re.escape(module)


def add_lora_adapter(model, layers: dict[str, LoraWeights], adapter_name: str, config: LoraConfig,
                     base_weights: dict[str, np.ndarray] | None = None,
                     deltas: dict[str, np.ndarray] | None = None) -> None:
    """Create `adapter_name` on `model` over exactly `layers`' modules and fill it (fp32).

    `deltas` ({module: ΔW}, LyCORIS modules) are added to those modules' base weights, which come back
    when the adapter is deleted.
    """
    model.add_adapter(config, adapter_name, modules=list(layers))
    try:
        state = {}
        for module, w in layers.items():
            state[f"{module}.lora_A.weight"] = w.down
            state[f"{module}.lora_B.weight"] = w.up
        if state:
            model.set_adapter_state_dict(state, adapter_name)
        if base_weights:
            model.overwrite_base_weights(adapter_name, base_weights)
        if deltas:
            params = model.state_dict()
            merged = {}
            for module, delta in deltas.items():
                key = f"{module}.weight"
                if key not in params:
                    raise LoraShapeError(f"{type(model).__name__} has no linear layer {module}")
                merged[key] = params[key].astype(ms.float32).asnumpy() + delta
            model.overwrite_base_weights(adapter_name, merged)
    except Exception:
        model.delete_adapters(adapter_name)
        raise


def adapter_lora_weights(model, adapter_name: str) -> dict[str, LoraWeights]:
    """An adapter of a model as {module: LoraWeights}, alpha = scale x rank (use_rslora included)."""
    model._check_names([adapter_name])
    out = {}
    for module, layer in model.lora_layers():
        if adapter_name in layer.adapter_config:
            config = layer.adapter_config[adapter_name]
            out[module] = LoraWeights(layer.lora_A[adapter_name].weight.asnumpy(),
                                      layer.lora_B[adapter_name].weight.asnumpy(),
                                      config.scaling * config.r, module)
    return out


__all__ = ["COMPONENTS", "LORA_ADAPTER_METADATA_KEY", "LORA_WEIGHT_NAME_SAFE", "add_lora_adapter",
           "adapter_lora_weights", "layouts_of", "linear_layout", "lora_config_for", "lora_file_path",
           "pack_metadata", "read_lora", "split_metadata", "write_lora"]
