from .transformer_flux import FluxTransformer2DModel, Transformer2DModelOutput

__all__ = ["FluxTransformer2DModel", "Transformer2DModelOutput"]
