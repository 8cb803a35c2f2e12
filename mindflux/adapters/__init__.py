"""LoRA adapters on MindSpore layers (PEFT semantics): below the models, which mix them in.

They depend on MindSpore only; LoRA file formats and the pipeline loader live above the models in
`mindflux.lora`.
"""

from .layer import LoraConfig, LoraLinear
from .peft_mixin import PeftAdapterMixin

__all__ = ["LoraConfig", "LoraLinear", "PeftAdapterMixin"]
