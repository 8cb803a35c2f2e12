"""FluxLoraLoaderMixin: diffusers' pipeline-level LoRA API for any object with `.transformer` and `.text_encoder`.

    pipe.load_lora_weights("my_lora.safetensors", adapter_name="style")   # any format of FORMATS
    pipe.set_adapters(["style", "detail"], adapter_weights=[1.0, 0.5])
    pipe.fuse_lora(lora_scale=0.8); pipe.unfuse_lora()
    FluxLoraLoaderMixin.save_lora_weights("out", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                          transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict())
    pipe.save_lora_weights_kohya("out/my_lora_kohya.safetensors")            # for ComfyUI

Loading never drops a key silently: a key that cannot be mapped raises LoraKeyError listing every
such key with the reason, or with `strict=False` is skipped with one warning listing them.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import numpy as np

from ..adapters.layer import LoraConfig
from ..hub import resolve_lora
from .expand import widen_for_lora
from .formats import DORA_REFUSED, FORMATS, ConvertedLora, LoraFormatError, convert_to_diffusers
from .kohya import save_kohya_lora
from .loader import (
    LORA_WEIGHT_NAME_SAFE,
    add_lora_adapter,
    layouts_of,
    lora_config_for,
    pack_metadata,
    read_lora,
    split_metadata,
    write_lora,
)

logger = logging.getLogger(__name__)

# Hub arguments of diffusers' load_lora_weights: the first five fetch a repo id (mindflux.hub); the
# others change nothing here (downloads are resumed, only safetensors are read, loading is lean anyway).
_FETCH_KWARGS = ("cache_dir", "local_files_only", "token", "revision", "model_source")
_HUB_KWARGS = frozenset(_FETCH_KWARGS + ("force_download", "proxies", "use_safetensors", "low_cpu_mem_usage"))


class LoraKeyError(ValueError):
    """LoRA keys that cannot be mapped to the pipeline's models; the message lists each one and why."""


class _class_or_instance_method:
    """A method that gets the instance when called on one and the class otherwise (as lora_state_dict
    is a classmethod in diffusers, but mindflux sizes fused splits from the pipeline's models when it can)."""

    def __init__(self, func):
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj, cls):
        return functools.partial(self.func, obj if obj is not None else cls)


def _check_kwargs(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - _HUB_KWARGS)
    if unknown:
        raise TypeError(f"unexpected arguments {unknown}")


def _read(source, weight_name: str | None, subfolder: str | None, kwargs: dict):
    """read_lora of a file, folder, dict, or a Hub / ModelScope repo id (fetched first)."""
    if isinstance(source, (str, os.PathLike)):
        source = resolve_lora(source, weight_name, subfolder, **{k: kwargs[k] for k in _FETCH_KWARGS if k in kwargs})
    return read_lora(source, weight_name, subfolder)


def report_unmapped(converted: ConvertedLora, strict: bool, source: str = "LoRA") -> None:
    """Every key that did not map: one error listing them, or (strict=False) one warning."""
    if not converted.unmapped:
        return
    lines = [f"  {key}: {why}" for key, why in converted.unmapped.items()]
    message = (f"{source} ({converted.format} format): {len(lines)} keys cannot be loaded:\n" + "\n".join(lines))
    if DORA_REFUSED in converted.unmapped.values():  # the rest alone would be wrong: refused even with strict=False
        raise LoraKeyError(message)
    if strict:
        raise LoraKeyError(message + "\n(pass strict=False to load the rest and skip these with a warning)")
    logger.warning("%s\nThey were skipped (strict=False).", message)


class FluxLoraLoaderMixin:
    """LoRA loading, saving and switching for a FLUX pipeline (diffusers' FluxLoraLoaderMixin)."""

    _lora_loadable_modules = ["transformer", "text_encoder"]
    transformer_name = "transformer"
    text_encoder_name = "text_encoder"

    def _lora_models(self) -> dict:
        return {c: getattr(self, c, None) for c in self._lora_loadable_modules}

    # ---- reading ------------------------------------------------------------------------------
    @_class_or_instance_method
    def lora_state_dict(self, pretrained_model_name_or_path_or_dict, weight_name: str | None = None,
                        subfolder: str | None = None, return_lora_metadata: bool = False, strict: bool = True,
                        **kwargs):
        """A LoRA of any accepted format as a diffusers-format dict of fp32 arrays.

        Keys: `transformer.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<...>`, plus
        `<component>.<module>.alpha` for every module (diffusers folds kohya alphas into the weights
        instead; here the weights stay as in the file) and replaced norm weights of BFL control LoRAs.
        The dict loads with load_lora_weights and saves with save_lora_weights as it is. With
        return_lora_metadata=True also returns the file's lora_adapter_metadata (or None).
        Called on a pipeline, its models size fused splits and check shapes; on the class, FLUX's structure does.
        """
        _check_kwargs(kwargs)
        state, metadata = _read(pretrained_model_name_or_path_or_dict, weight_name, subfolder, kwargs)
        models = self._lora_models() if not isinstance(self, type) else {}
        converted = convert_to_diffusers(state, layouts_of(models) if models else None)
        report_unmapped(converted, strict)
        if any(converted.deltas.values()):
            raise LoraFormatError("LyCORIS (LoKr / LoHa) modules have no LoRA form to return: load the file with "
                                  "load_lora_weights, which merges their weight differences into the model")
        configs = split_metadata(metadata)
        out = {}
        for component, layers in converted.layers.items():
            config = lora_config_for(layers, configs.get(component))
            for module, w in layers.items():
                resolved = config.for_module(module)
                out[f"{component}.{module}.lora_A.weight"] = w.down
                out[f"{component}.{module}.lora_B.weight"] = w.up
                out[f"{component}.{module}.alpha"] = np.asarray(resolved.scaling * resolved.r, np.float32)
        for component, params in converted.base_weights.items():
            out.update({f"{component}.{name}": value for name, value in params.items()})
        return (out, metadata) if return_lora_metadata else out

    # ---- loading ------------------------------------------------------------------------------
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          hotswap: bool = False, *, weight_name: str | None = None, subfolder: str | None = None,
                          strict: bool = True, **kwargs) -> None:
        """Load a LoRA (a file, a folder with pytorch_lora_weights.safetensors or `weight_name`, or a
        state dict) into the transformer and the text encoder as adapter `adapter_name`.

        The format is detected (see `mindflux.lora.FORMATS`). Rank, alpha and targets come from the
        file: its lora_adapter_metadata if present, else the shapes, `.alpha` keys, and alpha = rank.
        The new adapter becomes the active one, as in diffusers. strict=False skips keys that cannot
        be mapped (with a warning listing them) instead of raising LoraKeyError.
        """
        _check_kwargs(kwargs)
        if hotswap:
            raise NotImplementedError("hotswap is not supported: delete the adapter and load the new one")
        state, metadata = _read(pretrained_model_name_or_path_or_dict, weight_name, subfolder, kwargs)
        source = "LoRA state dict" if isinstance(pretrained_model_name_or_path_or_dict, dict) \
            else os.fspath(pretrained_model_name_or_path_or_dict)
        models = {c: m for c, m in self._lora_models().items() if m is not None}
        converted = convert_to_diffusers(state, layouts_of(models))
        report_unmapped(converted, strict, str(source))
        if not any(converted.layers.values()) and not any(converted.deltas.values()):
            raise LoraKeyError(f"{source} holds no LoRA weights for {sorted(models)}; accepted formats: "
                               f"{', '.join(FORMATS)}")
        transformer = models.get(self.transformer_name)
        if adapter_name is None:
            adapter_name = f"default_{len(getattr(transformer, 'peft_config', {}) or {})}"
        for component, model in models.items():
            if adapter_name in (getattr(model, "peft_config", None) or {}):
                raise ValueError(f"adapter name {adapter_name!r} is already in use in the {component}; "
                                 f"pick another or delete_adapters({adapter_name!r}) first")
        configs = split_metadata(metadata)
        components = [c for c in models if converted.layers.get(c) or converted.deltas.get(c)]
        plans = []
        for c in components:
            layers, deltas = converted.layers.get(c, {}), converted.deltas.get(c)
            # a LyCORIS-only adapter has no LoRA layers: its config just names the merged modules
            config = (lora_config_for(layers, configs.get(c)) if layers else
                      LoraConfig(r=1, lora_alpha=1, target_modules=sorted(deltas)))
            plans.append((models[c], layers, config, converted.base_weights.get(c), deltas))
        for component in converted.base_weights:
            if component not in components:
                raise LoraKeyError(f"{source} replaces {component} weights but has no LoRA layers for it")
        if transformer is not None and converted.layers.get(self.transformer_name):
            widen_for_lora(transformer, converted.layers[self.transformer_name])  # control LoRAs: x_embedder 64 -> 128
        done = []
        try:
            for model, layers, config, base_weights, deltas in plans:
                add_lora_adapter(model, layers, adapter_name, config, base_weights, deltas)
                done.append(model)
        except Exception:
            for model in done:
                model.delete_adapters(adapter_name)
            raise

    # ---- saving ---------------------------------------------------------------------------------
    @classmethod
    def save_lora_weights(cls, save_directory: str, transformer_lora_layers: dict | None = None,
                          text_encoder_lora_layers: dict | None = None, is_main_process: bool = True,
                          weight_name: str | None = None, save_function: Callable | None = None,
                          safe_serialization: bool = True, transformer_lora_adapter_metadata: dict | None = None,
                          text_encoder_lora_adapter_metadata: dict | None = None) -> None:
        """Write `save_directory/pytorch_lora_weights.safetensors` (or `weight_name`) as diffusers does:
        PEFT keys prefixed `transformer.` / `text_encoder.`, fp32, and the adapters' LoraConfig dicts
        as `lora_adapter_metadata`. Without metadata, readers assume alpha = rank."""
        if not (transformer_lora_layers or text_encoder_lora_layers):
            raise ValueError("pass at least one of transformer_lora_layers and text_encoder_lora_layers")
        if not safe_serialization:
            raise ValueError("mindflux writes safetensors only (safe_serialization=True)")
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_lora_weights needs a directory")
        if not is_main_process:
            return
        tensors = {}
        for prefix, layers in ((cls.transformer_name, transformer_lora_layers),
                               (cls.text_encoder_name, text_encoder_lora_layers)):
            tensors.update({f"{prefix}.{k}": v for k, v in (layers or {}).items()})
        metadata = pack_metadata({cls.transformer_name: transformer_lora_adapter_metadata,
                                  cls.text_encoder_name: text_encoder_lora_adapter_metadata})
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, weight_name or LORA_WEIGHT_NAME_SAFE)
        if save_function is not None:
            save_function(tensors, path)
            return
        write_lora(path, tensors, metadata)
        logger.info("LoRA weights saved in %s", path)

    def save_lora_weights_kohya(self, save_path: str, adapter_name: str | None = None, dtype: str = "fp32",
                                text_encoder_prefix: str = "lora_te1_") -> None:
        """Write one adapter of the transformer (and CLIP) as a kohya-format file, for ComfyUI
        (see mindflux.lora.convert_to_kohya)."""
        models = {c: m for c, m in self._lora_models().items() if m is not None and getattr(m, "peft_config", None)}
        if adapter_name is None:
            names = sorted({n for m in models.values() for n in m.peft_config})
            if len(names) != 1:
                raise ValueError(f"pass adapter_name: the pipeline has adapters {names}")
            adapter_name = names[0]
        models = {c: m for c, m in models.items() if adapter_name in m.peft_config}
        if not models:
            raise ValueError(f"no model of the pipeline has an adapter {adapter_name!r}")
        save_kohya_lora(save_path, adapter_name=adapter_name, dtype=dtype, text_encoder_prefix=text_encoder_prefix,
                        **models)

    # ---- switching ----------------------------------------------------------------------------
    def _models_with_lora(self) -> dict:
        return {c: m for c, m in self._lora_models().items() if m is not None and hasattr(m, "set_adapters")}

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {c: list(getattr(m, "peft_config", None) or {}) for c, m in self._models_with_lora().items()
                if getattr(m, "peft_config", None)}

    def get_active_adapters(self) -> list[str]:
        active: list[str] = []
        for model in self._models_with_lora().values():
            active += [n for n in model.active_adapters if n not in active]
        return active

    def set_adapters(self, adapter_names: str | list[str], adapter_weights=None) -> None:
        """Activate adapters with weights; a weight may be a dict {"transformer": w, "text_encoder": w}."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
        listed = self.get_list_adapters()
        missing = sorted(set(names) - {n for ns in listed.values() for n in ns})
        if missing:
            raise ValueError(f"adapters {missing} are not loaded; loaded: {listed}")
        for component, model in self._models_with_lora().items():
            own = listed.get(component, [])
            pairs = [(n, w.get(component, 1.0) if isinstance(w, dict) else w) for n, w in zip(names, weights)
                     if n in own]
            model.set_adapters([n for n, _ in pairs], [1.0 if w is None else w for _, w in pairs])

    def enable_lora(self) -> None:
        for model in self._models_with_lora().values():
            model.enable_adapters()

    def disable_lora(self) -> None:
        for model in self._models_with_lora().values():
            model.disable_adapters()

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        listed = self.get_list_adapters()
        missing = sorted(set(names) - {n for ns in listed.values() for n in ns})
        if missing:
            raise ValueError(f"adapters {missing} are not loaded; loaded: {listed}")
        for component, model in self._models_with_lora().items():
            own = [n for n in names if n in listed.get(component, [])]
            if own:
                model.delete_adapters(own)

    def unload_lora_weights(self) -> None:
        """Remove every adapter and restore plain linear layers (and replaced norm weights)."""
        for model in self._models_with_lora().values():
            model.unload_lora()

    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None) -> None:
        """Fuse the active (or named) adapters into the weights of `components` (default: the transformer)."""
        for component in components or [self.transformer_name]:
            if component not in self._lora_loadable_modules:
                raise ValueError(f"{component} is not one of {self._lora_loadable_modules}")
            model = getattr(self, component, None)
            if model is None or not getattr(model, "peft_config", None):
                continue
            names = [n for n in adapter_names if n in model.peft_config] if adapter_names else None
            if adapter_names and not names:
                continue
            model.fuse_lora(lora_scale, safe_fusing=safe_fusing, adapter_names=names)

    def unfuse_lora(self, components: list[str] | None = None) -> None:
        for component in components or list(self._lora_loadable_modules):
            model = getattr(self, component, None)
            if model is not None and hasattr(model, "unfuse_lora"):
                model.unfuse_lora()


def get_peft_model_state_dict(model, adapter_name: str | None = None) -> dict[str, np.ndarray]:
    """PEFT's function: an adapter's weights as {"<module>.lora_A.weight": ..., ...} (fp32), for save_lora_weights.
    adapter_name None: the model's only adapter, or its first active one."""
    if adapter_name is None:
        names = model.active_adapters or list(model.peft_config)
        if not names:
            raise ValueError(f"{type(model).__name__} has no LoRA adapter")
        adapter_name = names[0]
    return model.get_adapter_state_dict(adapter_name)
