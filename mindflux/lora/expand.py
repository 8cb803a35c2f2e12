"""Control LoRAs widen the transformer's input layer, as diffusers does.

BFL's FLUX.1-Canny-dev-lora and Depth-dev-lora train FLUX.1-dev to take the control image's latents
next to its own: their x_embedder adapter reads 128 channels where FLUX.1-dev's x_embedder reads 64.
Loading one replaces x_embedder by a 128-input layer whose extra columns are zero (the base model
ignores them) and sets the transformer's config in_channels to 128, so FluxControlPipeline feeds it.
"""

from __future__ import annotations

import logging

import numpy as np
from mindspore import Parameter, Tensor, nn

from ..configuration_utils import FrozenConfig

logger = logging.getLogger(__name__)

# modules whose input width is a config attribute (diffusers' _MODULE_NAME_TO_ATTRIBUTE_MAP_FLUX)
_CONFIG_ATTRIBUTE = {"x_embedder": "in_channels"}


def widen_for_lora(model, layers: dict) -> list[str]:
    """Widen every top-level nn.Dense of `model` whose adapter in `layers` ({module: LoraWeights}) reads more
    inputs than it has; returns the widened module names."""
    widened = []
    for module_name, weights in layers.items():
        if "." in module_name or not hasattr(model, module_name):
            continue
        layer = getattr(model, module_name)
        wanted = int(weights.down.shape[1])
        if not isinstance(layer, nn.Dense) or wanted <= layer.in_channels:
            continue
        if hasattr(layer, "lora_A"):  # a LoraLinear: its adapters read the old width
            raise ValueError(f"the LoRA widens {module_name} from {layer.in_channels} to {wanted} inputs, which "
                             "cannot be done under adapters already loaded: load the control LoRA first")
        weight = layer.weight.asnumpy()
        wide = np.zeros((weight.shape[0], wanted), weight.dtype)
        wide[:, :weight.shape[1]] = weight
        new = nn.Dense(wanted, layer.out_channels, has_bias=layer.has_bias)
        new.weight = Parameter(Tensor(wide).astype(layer.weight.dtype), name=layer.weight.name)
        if layer.has_bias:
            new.bias = layer.bias
        setattr(model, module_name, new)
        attribute = _CONFIG_ATTRIBUTE.get(module_name)
        if attribute is not None and hasattr(model, "_internal_dict"):
            object.__setattr__(model, "_internal_dict", FrozenConfig({**model.config, attribute: wanted}))
        logger.info("widened %s from %d to %d inputs for the LoRA (extra columns zero)", module_name,
                    weight.shape[1], wanted)
        widened.append(module_name)
    return widened


__all__ = ["widen_for_lora"]
