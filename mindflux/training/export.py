"""What a training run leaves behind: the LoRA file (diffusers' layout), a kohya copy, and README.md.

pytorch_lora_weights.safetensors holds `transformer.<module>.lora_A/B.weight` (and `text_encoder.`
keys when CLIP trained) with the adapter configs in its metadata, as diffusers'
save_lora_weights writes it: the transformer's weights in the run's precision unless
--upcast_before_saving, CLIP's in fp32.
"""

from __future__ import annotations

import os

import numpy as np

KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"


def saving_dtype(weight_dtype, upcast_before_saving: bool) -> str:
    """"fp32", "bf16" or "fp16": the transformer LoRA's dtype in the final file (diffusers casts it to the
    weight dtype unless --upcast_before_saving)."""
    import mindspore as ms

    if upcast_before_saving:
        return "fp32"
    return {ms.bfloat16: "bf16", ms.float16: "fp16"}.get(weight_dtype, "fp32")


class LoraExport:
    """Writes the run's adapters: the transformer's (config `lora_config`) and CLIP's when it trains."""

    def __init__(self, transformer, lora_config, text_encoder=None, text_lora_config=None):
        self.transformer, self.lora_config = transformer, lora_config
        self.text_encoder, self.text_lora_config = text_encoder, text_lora_config

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        from ..lora import get_peft_model_state_dict

        state = {"transformer": get_peft_model_state_dict(self.transformer)}
        if self.text_encoder is not None:
            state["text_encoder"] = get_peft_model_state_dict(self.text_encoder)
        return state

    def write_lora(self, folder: str, dtype: str = "fp32") -> str:
        """folder/pytorch_lora_weights.safetensors; the transformer's weights in `dtype`, CLIP's in fp32."""
        from ..lora import LORA_WEIGHT_NAME_SAFE
        from ..lora.loader import pack_metadata, write_lora

        path = os.path.join(folder, LORA_WEIGHT_NAME_SAFE)
        tensors = {f"{component}.{key}": value for component, layers in self.state().items()
                   for key, value in layers.items()}
        metadata = pack_metadata({"transformer": self.lora_config, "text_encoder": self.text_lora_config})
        os.makedirs(folder, exist_ok=True)
        write_lora(path, tensors, metadata, dtype, fp32_prefixes=("text_encoder.",))
        return path

    def write_kohya(self, output_dir: str, dtype: str) -> str:
        """output_dir/pytorch_lora_weights_kohya.safetensors (for ComfyUI); returns the file name."""
        from ..lora import save_kohya_lora

        save_kohya_lora(os.path.join(output_dir, KOHYA_WEIGHT_NAME), transformer=self.transformer,
                        text_encoder=self.text_encoder, dtype=dtype)
        return KOHYA_WEIGHT_NAME

