"""LoRA for mindflux: adapters (PEFT semantics), file formats, and diffusers' pipeline-level loader API."""

from ..adapters.layer import LoraConfig, LoraLinear
from ..adapters.peft_mixin import PeftAdapterMixin
from .formats import (
           FORMATS,
           ConvertedLora,
           LoraFormatError,
           LoraShapeError,
           LoraWeights,
           convert_to_diffusers,
           detect_format,
)
from .kohya import convert_to_kohya, save_kohya_lora
from .loader import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE, read_lora
from .pipeline_mixin import FluxLoraLoaderMixin, LoraKeyError, get_peft_model_state_dict

__all__ = ["FORMATS", "LORA_ADAPTER_METADATA_KEY", "LORA_WEIGHT_NAME_SAFE", "ConvertedLora", "FluxLoraLoaderMixin",
           "LoraConfig", "LoraFormatError", "LoraKeyError", "LoraLinear", "LoraShapeError", "LoraWeights",
           "PeftAdapterMixin", "convert_to_diffusers", "convert_to_kohya", "detect_format",
           "get_peft_model_state_dict", "read_lora", "save_kohya_lora"]
