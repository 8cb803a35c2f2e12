"""FluxImg2ImgPipeline: FLUX.1-dev / schnell from an image instead of pure noise (diffusers' class and numbers).

What it changes in FluxPipeline's call (mindflux/pipelines/strength.py does the work):
    image --resize (Lanczos) to height x width, [-1, 1]--> VAE encode, posterior sample --(z - shift) * scale-->
    image latents (B*n, 16, H/8, W/8) --scale_noise to the first kept timestep, pack--> starting latents
    timesteps: the last int(steps * strength) of the schedule
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from .flux import FluxPipeline
from .strength import StrengthMixin


class FluxImg2ImgPipeline(StrengthMixin, FluxPipeline):
    """Image to image. `image`: a path, PIL image, (H, W, 3) / (B, H, W, 3) numpy array in [0, 1] or
    (B, 3, H, W) Tensor, or a list; it is resized to height x width (default: 1024 x 1024, as
    diffusers, not the image's size). `strength` (default 0.6): how much of the schedule runs, so
    how far from the image the result may go; 1 ignores the image. `latents`, when given, are the
    packed starting latents (the image is then not used). Other arguments are FluxPipeline's."""

    def __call__(self, prompt=None, image=None, strength: float = 0.6, guidance_scale: float = 7.0,
                 **kwargs: Any):
        return self.generate(prompt=prompt, image=image, strength=strength, guidance_scale=guidance_scale, **kwargs)

    def prepare_inputs(self, call: SimpleNamespace) -> None:
        self.check_image_and_strength(call)


__all__ = ["FluxImg2ImgPipeline"]
