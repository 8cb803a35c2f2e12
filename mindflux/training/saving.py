"""Writing the trained LoRA in diffusers' file format (pytorch_lora_weights.safetensors).

A stand-in until the LoRA file-format work lands its save_lora_weights: keys are
"transformer.<module>.lora_A.weight" / "...lora_B.weight" (PEFT names under the pipeline's
component prefix), metadata {"format": "pt"} plus the adapter config under
"lora_adapter_metadata", as FluxPipeline.save_lora_weights writes them.
"""

from __future__ import annotations

import json
import os

import mindspore as ms
import numpy as np

from ..safetensors_io import float32_to_bf16_bits, save_file

LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"


def save_lora_weights(save_directory: str, transformer_lora_layers: dict[str, np.ndarray],
                      transformer_lora_adapter_metadata: dict | None = None, dtype: ms.Type = ms.float32,
                      weight_name: str = LORA_WEIGHT_NAME_SAFE) -> str:
    """Write the transformer's LoRA arrays (fp32, PEFT names) as `dtype`; returns the file path."""
    os.makedirs(save_directory, exist_ok=True)
    tensors = {}
    for key, value in transformer_lora_layers.items():
        value = np.asarray(value, np.float32)
        if dtype == ms.bfloat16:
            tensors[f"transformer.{key}"] = (float32_to_bf16_bits(value), "BF16")
        elif dtype == ms.float16:
            tensors[f"transformer.{key}"] = (value.astype(np.float16), "F16")
        else:
            tensors[f"transformer.{key}"] = (value, "F32")
    metadata = {"format": "pt"}
    if transformer_lora_adapter_metadata:
        packed = {f"transformer.{k}": (sorted(v) if isinstance(v, set) else v)
                  for k, v in transformer_lora_adapter_metadata.items()}
        metadata["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True)
    path = os.path.join(save_directory, weight_name)
    save_file(tensors, path, metadata=metadata)
    return path
