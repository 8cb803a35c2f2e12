"""The FLUX.1 pipelines; importing this module registers each for DiffusionPipeline.from_pretrained."""

from .flux import FluxPipeline, FluxPipelineOutput
from .flux_control import FluxControlPipeline
from .flux_fill import FluxFillPipeline
from .flux_img2img import FluxImg2ImgPipeline
from .flux_inpaint import FluxInpaintPipeline
from .flux_kontext import FluxKontextPipeline
from .pipeline_utils import DiffusionPipeline

__all__ = ["DiffusionPipeline", "FluxControlPipeline", "FluxFillPipeline", "FluxImg2ImgPipeline",
           "FluxInpaintPipeline", "FluxKontextPipeline", "FluxPipeline", "FluxPipelineOutput"]
