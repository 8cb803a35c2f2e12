from .flux import FluxPipeline, FluxPipelineOutput
from .pipeline_utils import DiffusionPipeline

__all__ = ["DiffusionPipeline", "FluxPipeline", "FluxPipelineOutput"]
