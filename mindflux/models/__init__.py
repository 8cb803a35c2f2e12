from .clip import CLIPTextModel
from .t5 import T5EncoderModel
from .transformer_flux import FluxTransformer2DModel, Transformer2DModelOutput

__all__ = ["CLIPTextModel", "FluxTransformer2DModel", "T5EncoderModel", "Transformer2DModelOutput"]
