from .autoencoder_kl import AutoencoderKL, AutoencoderKLOutput, DecoderOutput, DiagonalGaussianDistribution
from .cache_utils import FirstBlockCacheConfig, TeaCacheConfig
from .clip import CLIPTextModel
from .t5 import T5EncoderModel
from .transformer_flux import FluxTransformer2DModel, Transformer2DModelOutput

__all__ = ["AutoencoderKL", "AutoencoderKLOutput", "CLIPTextModel", "DecoderOutput", "DiagonalGaussianDistribution",
           "FirstBlockCacheConfig", "FluxTransformer2DModel", "T5EncoderModel", "TeaCacheConfig",
           "Transformer2DModelOutput"]
