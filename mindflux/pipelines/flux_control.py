"""FluxControlPipeline: FLUX.1-Canny-dev / Depth-dev, or FLUX.1-dev with BFL's Canny / Depth LoRA.

The control image enters as extra channels of every token (x_embedder 128 = 64 latent + 64 control):
    control_image --resize (Lanczos), [-1, 1]--> VAE encode, posterior sample, (z - shift) * scale, pack
                  --> (B*n, N, 64) next to the latents at every step
Loading a control LoRA into FLUX.1-dev widens its x_embedder from 64 to 128 inputs (mindflux/lora).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor

from .. import image_processor
from ..latents import pack_latents
from .denoise import Conditioning
from .flux import FluxPipeline


class FluxControlPipeline(FluxPipeline):
    """Structure-conditioned generation. `control_image`: a Canny edge map or depth map (a path, PIL image,
    numpy array in [0, 1], Tensor, or a list), resized to height x width; one image serves the whole batch,
    several are repeated per prompt. Other arguments are FluxPipeline's (guidance_scale 3.5; FLUX.1-Canny-dev
    is usually run at 30, Depth at 10)."""

    def __call__(self, prompt=None, control_image=None, guidance_scale: float = 3.5, **kwargs: Any):
        return self.generate(prompt=prompt, control_image=control_image, guidance_scale=guidance_scale, **kwargs)

    @classmethod
    def in_channels_for(cls, latent_channels: int = 16, vae_scale_factor: int = 8) -> int:
        return 8 * latent_channels

    def check_transformer(self) -> None:
        if self.transformer.config.in_channels == 4 * self.latent_channels:
            raise ValueError("`control_image` needs a control transformer (x_embedder 128 wide: FLUX.1-Canny-dev or "
                             "Depth-dev) or FLUX.1-dev with a Canny / Depth control LoRA loaded; this transformer's "
                             f"x_embedder takes {self.transformer.config.in_channels} channels")
        super().check_transformer()

    def prepare_inputs(self, c: SimpleNamespace) -> None:
        if c.control_image is None:
            raise ValueError("FluxControlPipeline needs `control_image`")
        c.height = c.height or self.default_sample_size * self.vae_scale_factor
        c.width = c.width or self.default_sample_size * self.vae_scale_factor
        c.pixels = image_processor.preprocess(c.control_image, c.height, c.width, name="control_image")

    def prepare_conditioning(self, c: SimpleNamespace, batch: int, dtype: ms.Type, timesteps: np.ndarray,
                             generator) -> tuple[Tensor, Conditioning]:
        pixels = c.pixels
        # one image for everything, or each image once per prompt's images (diffusers' repeat_interleave)
        pixels = np.repeat(pixels, batch if pixels.shape[0] == 1 else c.num_images_per_prompt, axis=0)
        if pixels.shape[0] != batch:
            raise ValueError(f"{c.pixels.shape[0]} `control_image` images for {batch // c.num_images_per_prompt} "
                             "prompts: give one, or one per prompt")
        control = pack_latents(self.encode_image(pixels, generator).astype(dtype))  # drawn before the noise
        latents, img_ids = self.prepare_latents(batch, self.latent_channels, c.height, c.width, dtype, generator,
                                                c.latents)
        return latents, Conditioning(img_ids=img_ids, extra_channels=control)


__all__ = ["FluxControlPipeline"]
