"""PeftAdapterMixin: diffusers' adapter API (add_adapter, set_adapters, fuse_lora, ...) for ModelMixin models."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn

from .layer import LoraConfig, LoraLinear

logger = logging.getLogger(__name__)


def _parent_and_attr(root: nn.Cell, name: str) -> tuple[nn.Cell, str]:
    *path, attr = name.split(".")
    parent = root
    for part in path:
        parent = parent[int(part)] if isinstance(parent, (nn.CellList, nn.SequentialCell)) else getattr(parent, part)
    return parent, attr


def _replace_child(parent: nn.Cell, attr: str, cell: nn.Cell) -> None:
    if isinstance(parent, (nn.CellList, nn.SequentialCell)):
        parent[int(attr)] = cell
    else:
        setattr(parent, attr, cell)


class PeftAdapterMixin:
    """LoRA adapters on a model's nn.Dense layers, named and switched the way diffusers/PEFT do."""

    def __init_adapter_state(self) -> None:
        if "peft_config" not in self.__dict__:
            object.__setattr__(self, "peft_config", {})
            object.__setattr__(self, "_adapter_weights", {})
            object.__setattr__(self, "_active_adapters", [])
            object.__setattr__(self, "_adapters_enabled", True)
            object.__setattr__(self, "_lora_scale", 1.0)
            object.__setattr__(self, "_overwritten_params", {})

    # ---- queries ----------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLinear]]:
        for name, cell in self.cells_and_names():
            if isinstance(cell, LoraLinear):
                yield name, cell

    @property
    def active_adapters(self) -> list[str]:
        self.__init_adapter_state()
        return list(self._active_adapters) if self._adapters_enabled else []

    def lora_parameters(self, adapter_name: str | None = None) -> list[Parameter]:
        """The lora_A / lora_B Parameters (of one adapter, or all), in module order."""
        params = []
        for _, layer in self.lora_layers():
            for name in layer.adapter_config:
                if adapter_name in (None, name):
                    params += [layer.lora_A[name].weight, layer.lora_B[name].weight]
        return params

    # ---- structure --------------------------------------------------------------------------
    def add_adapter(self, adapter_config: LoraConfig, adapter_name: str = "default",
                    modules: list[str] | None = None) -> None:
        """Wrap every nn.Dense that `adapter_config.target_modules` names; the new adapter becomes active.

        `modules`: exact module names to wrap instead of matching target_modules (a LoRA file's
        modules, as PEFT injects from a state dict). Each layer gets `adapter_config.for_module`,
        so rank_pattern / alpha_pattern give per-module ranks and alphas.
        """
        self.__init_adapter_state()
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
        linear = {name: cell for name, cell in self.cells_and_names()
                  if isinstance(cell, nn.Dense) and name and ".lora_" not in name}
        if modules is None:
            targets = [name for name in linear if adapter_config.matches(name)]
        else:
            missing = [name for name in modules if name not in linear]
            if missing:
                raise ValueError(f"{type(self).__name__} has no linear layer {missing[0]}"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            targets = list(modules)
        if not targets and modules is None:  # modules=[]: an adapter that only replaces base weights (LyCORIS)
            raise ValueError(f"target_modules {adapter_config.target_modules} match no linear layer of "
                             f"{type(self).__name__}")
        for name in targets:
            parent, attr = _parent_and_attr(self, name)
            layer = linear[name]
            if not isinstance(layer, LoraLinear):
                layer = LoraLinear(layer)
                _replace_child(parent, attr, layer)
            layer.add_adapter(adapter_name, adapter_config.for_module(name))
        self.peft_config[adapter_name] = adapter_config
        self._rename_parameters()
        self.set_adapters([adapter_name])

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Remove adapters; base weights that an adapter's file replaced (BFL norm scales) are restored."""
        self.__init_adapter_state()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        for _, layer in self.lora_layers():
            for name in names:
                if name in layer.adapter_config:
                    layer.delete_adapter(name)
        params = self.state_dict()
        for name in names:
            del self.peft_config[name]
            self._adapter_weights.pop(name, None)
            for key, original in self._overwritten_params.pop(name, {}).items():
                params[key].set_data(ms.Tensor(original).astype(params[key].dtype))
        self._active_adapters = [n for n in self._active_adapters if n not in names]
        self._rename_parameters()
        self._apply()

    def unload_lora(self) -> None:
        """Delete every adapter and put plain nn.Dense layers back (diffusers' unload_lora)."""
        self.__init_adapter_state()
        if self.peft_config:
            self.delete_adapters(list(self.peft_config))
        for name, layer in list(self.lora_layers()):
            layer.unmerge()
            parent, attr = _parent_and_attr(self, name)
            _replace_child(parent, attr, layer.to_dense())
        self._rename_parameters()
        self._apply()

    def overwrite_base_weights(self, adapter_name: str, weights: dict[str, np.ndarray]) -> None:
        """Replace base parameters for an adapter (a BFL control LoRA's norm scales, as diffusers
        loads them); the originals come back when the adapter is deleted."""
        self._check_names([adapter_name])
        params = self.state_dict()
        saved = self._overwritten_params.setdefault(adapter_name, {})
        for key, value in weights.items():
            if key not in params:
                raise ValueError(f"{type(self).__name__} has no parameter {key}")
            if tuple(params[key].shape) != tuple(value.shape):
                raise ValueError(f"{key} has shape {tuple(value.shape)}, the model expects {tuple(params[key].shape)}")
            saved.setdefault(key, params[key].astype(ms.float32).asnumpy())
            params[key].set_data(ms.Tensor(np.asarray(value, np.float32)).astype(params[key].dtype))

    def set_adapters(self, adapter_names: str | list[str], weights: float | list[float] | None = None) -> None:
        """Make these adapters active, each with its weight (default 1.0), as diffusers' set_adapters."""
        self.__init_adapter_state()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        if weights is None:
            weights = [1.0] * len(names)
        elif not isinstance(weights, (list, tuple)):
            weights = [weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
        self._active_adapters = names
        self._adapter_weights.update({n: float(w) for n, w in zip(names, weights)})
        self._apply()

    set_adapter = set_adapters

    def enable_adapters(self) -> None:
        self.__init_adapter_state()
        self._adapters_enabled = True
        self._apply()

    def disable_adapters(self) -> None:
        self.__init_adapter_state()
        self._adapters_enabled = False
        self._apply()

    def set_lora_scale(self, scale: float) -> float:
        """Multiply every active adapter's output by `scale` (joint_attention_kwargs["scale"]);
        returns the previous scale. Changes Parameter data only: no recompilation."""
        self.__init_adapter_state()
        previous = self._lora_scale
        if not self.peft_config and scale != 1.0:
            logger.warning("a LoRA scale of %s has no effect: %s has no LoRA adapters", scale, type(self).__name__)
        self._lora_scale = float(scale)
        self._update_scalings()
        return previous

    # ---- fusing -----------------------------------------------------------------------------
    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None) -> None:
        """Add the active (or named) adapters into the base weights; their LoRA branches switch off.

        safe_fusing: check every fused weight for NaN/inf first and raise, naming the layer, instead of fusing.
        """
        self.__init_adapter_state()
        names = adapter_names or self.active_adapters
        self._check_names(names)
        plans = []
        for module, layer in self.lora_layers():
            scalings = {n: lora_scale * self._adapter_weights.get(n, 1.0) * layer.adapter_config[n].scaling
                        for n in names if n in layer.adapter_config and n not in layer.merged_adapters}
            if scalings:
                if safe_fusing and not np.all(np.isfinite(layer.merged_weight(scalings))):
                    raise ValueError(f"fusing {sorted(scalings)} into {module} gives NaN or inf; nothing was fused")
                plans.append((layer, scalings))
        for layer, scalings in plans:
            layer.merge(scalings)
        self._apply()

    def unfuse_lora(self) -> None:
        """Restore the base weights exactly as they were before fuse_lora."""
        for _, layer in self.lora_layers():
            layer.unmerge()
        self._apply()

    # ---- adapter weights as a flat dict (PEFT's names, without the adapter name) ---------------
    def get_adapter_state_dict(self, adapter_name: str = "default") -> dict[str, np.ndarray]:
        """{"<module>.lora_A.weight": (r, in), "<module>.lora_B.weight": (out, r)} as fp32 numpy arrays."""
        self._check_names([adapter_name])
        state = {}
        for module, layer in self.lora_layers():
            if adapter_name in layer.adapter_config:
                state[f"{module}.lora_A.weight"] = layer.lora_A[adapter_name].weight.asnumpy()
                state[f"{module}.lora_B.weight"] = layer.lora_B[adapter_name].weight.asnumpy()
        return state

    def set_adapter_state_dict(self, state: dict[str, np.ndarray], adapter_name: str = "default") -> None:
        """Fill an existing adapter from PEFT-named arrays; every key must fit, by name and shape."""
        self._check_names([adapter_name])
        params = {}
        for module, layer in self.lora_layers():
            if adapter_name in layer.adapter_config:
                params[f"{module}.lora_A.weight"] = layer.lora_A[adapter_name].weight
                params[f"{module}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        for key, value in state.items():
            if key not in params:
                raise ValueError(f"LoRA key {key} has no matching layer in {type(self).__name__} "
                                 f"(adapter {adapter_name!r} targets {len(params) // 2} layers)")
            if tuple(params[key].shape) != tuple(value.shape):
                raise ValueError(f"LoRA key {key} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(params[key].shape)}")
        missing = sorted(set(params) - set(state))
        if missing:
            raise ValueError(f"LoRA weights lack {len(missing)} keys of adapter {adapter_name!r}, e.g. {missing[0]}")
        for key, value in state.items():
            params[key].set_data(ms.Tensor(np.asarray(value, np.float32)))

    # ---- internals ----------------------------------------------------------------------------
    def _check_names(self, names: list[str]) -> None:
        self.__init_adapter_state()
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")

    def _target_dtype(self, name: str, dtype):
        # LoRA parameters stay fp32 whatever the model is cast to; the layers cast their computation.
        if ".lora_" in name:
            return ms.float32
        return super()._target_dtype(name, dtype)

    def to(self, dtype):
        super().to(dtype)
        for _, layer in self.lora_layers():
            layer.sync_compute_dtype()
        return self

    def _rename_parameters(self) -> None:
        # Cells added after the model was built carry short parameter names; graph compilation and
        # optimizers need them unique, so give every parameter its full path.
        for name, param in self.parameters_and_names():
            if param.name != name:
                param.name = name

    def _update_scalings(self) -> None:
        active = self.active_adapters
        for _, layer in self.lora_layers():
            layer.set_scalings({n: self._lora_scale * self._adapter_weights.get(n, 1.0) * config.scaling
                                for n, config in layer.adapter_config.items() if n in active})

    def _apply(self) -> None:
        """Push the active set into the layers and force recompilation of compiled graphs."""
        active = self.active_adapters
        for _, layer in self.lora_layers():
            layer.active_adapters = [n for n in active if n in layer.adapter_config and n not in layer.merged_adapters]
        self._update_scalings()
        stamp = time.time_ns()
        for _, cell in self.cells_and_names():
            object.__setattr__(cell, "_create_time", stamp)
