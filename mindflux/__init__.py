"""mindflux: the FLUX.1 image-generation stack (diffusers names and numbers) on MindSpore."""

import os

# mindflux uses transformers for its tokenizers only. With torch installed, importing transformers
# would import torch too (seconds, and torch and MindSpore sharing a process is asking for trouble);
# this keeps it out unless the user asks for it. It must be set before transformers is imported.
os.environ.setdefault("USE_TORCH", "0")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "None of PyTorch ... have been found"
# MindSpore's C++ log: errors only, before MindSpore loads (its warnings would bury progress bars; GLOG_v=2 shows them)
os.environ.setdefault("GLOG_v", "3")

from .device import get_device, set_device  # noqa: E402
from .modeling_utils import ModelMixin, WeightsLoadingError  # noqa: E402
from .models import (  # noqa: E402
    AutoencoderKL,
    CLIPTextModel,
    FirstBlockCacheConfig,
    FluxTransformer2DModel,
    T5EncoderModel,
    TeaCacheConfig,
)
from .pipelines import (  # noqa: E402
    DiffusionPipeline,
    FluxControlPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxPipelineOutput,
)
from .schedulers import FlowMatchEulerDiscreteScheduler  # noqa: E402

__version__ = "0.1.0"

__all__ = ["AutoencoderKL", "CLIPTextModel", "DiffusionPipeline", "FirstBlockCacheConfig",
           "FlowMatchEulerDiscreteScheduler", "FluxControlPipeline", "FluxFillPipeline", "FluxImg2ImgPipeline",
           "FluxInpaintPipeline", "FluxKontextPipeline", "FluxPipeline", "FluxPipelineOutput",
           "FluxTransformer2DModel", "ModelMixin", "T5EncoderModel", "TeaCacheConfig", "WeightsLoadingError",
           "get_device", "set_device"]
