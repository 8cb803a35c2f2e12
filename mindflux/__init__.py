"""mindflux: the FLUX.1 image-generation stack (diffusers names and numbers) on MindSpore."""

from .device import get_device, set_device
from .modeling_utils import ModelMixin, WeightsLoadingError
from .models import AutoencoderKL, FluxTransformer2DModel
from .pipelines import DiffusionPipeline, FluxPipeline, FluxPipelineOutput
from .schedulers import FlowMatchEulerDiscreteScheduler

__version__ = "0.1.0"

__all__ = ["AutoencoderKL", "DiffusionPipeline", "FlowMatchEulerDiscreteScheduler", "FluxPipeline", "FluxPipelineOutput",
           "FluxTransformer2DModel", "ModelMixin", "WeightsLoadingError", "get_device", "set_device"]
