from .layer import LoraConfig, LoraLinear
from .peft_mixin import PeftAdapterMixin

__all__ = ["LoraConfig", "LoraLinear", "PeftAdapterMixin"]
