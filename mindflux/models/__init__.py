from .autoencoder_kl import AutoencoderKL, AutoencoderKLOutput, DecoderOutput, DiagonalGaussianDistribution
from .transformer_flux import FluxTransformer2DModel, Transformer2DModelOutput

__all__ = ["AutoencoderKL", "AutoencoderKLOutput", "DecoderOutput", "DiagonalGaussianDistribution",
           "FluxTransformer2DModel", "Transformer2DModelOutput"]
