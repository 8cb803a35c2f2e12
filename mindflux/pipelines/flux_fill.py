"""FluxFillPipeline: inpaint / outpaint with FLUX.1-Fill-dev (diffusers' class and numbers).

The Fill transformer sees the known pixels and the mask as extra channels of every token (x_embedder
384 = 64 latent + 64 masked-image latent + 256 mask channels), so no per-step blending is needed:
    masked image = image * (1 - mask) --VAE encode, posterior sample, (z - shift) * scale, pack--> (B*n, N, 64)
    mask (B, 1, H, W) --each 8x8 pixel block -> 64 channels of its latent pixel, pack--> (B*n, N, 256)
The starting latents are Img2Img's (mindflux/pipelines/strength.py; strength 1 by default: pure noise).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from .. import image_processor
from ..latents import pack_latents
from .denoise import Conditioning
from .flux import FluxPipeline
from .strength import StrengthMixin


class FluxFillPipeline(StrengthMixin, FluxPipeline):
    """FLUX.1-Fill-dev. `image` and `mask_image` (same size; white = fill in) as in FluxInpaintPipeline, or
    `masked_image_latents`: the packed (B, N, 320) masked-image latents and mask, used as they are.
    `strength` (default 1.0), `guidance_scale` (default 30, FLUX.1-Fill's). `latents`: packed starting
    latents. Other arguments are FluxPipeline's."""

    def __call__(self, prompt=None, image=None, mask_image=None, masked_image_latents=None, strength: float = 1.0,
                 guidance_scale: float = 30.0, **kwargs: Any):
        return self.generate(prompt=prompt, image=image, mask_image=mask_image,
                             masked_image_latents=masked_image_latents, strength=strength,
                             guidance_scale=guidance_scale, **kwargs)

    @classmethod
    def in_channels_for(cls, latent_channels: int = 16, vae_scale_factor: int = 8) -> int:
        return 8 * latent_channels + 4 * vae_scale_factor ** 2

    def prepare_inputs(self, c: SimpleNamespace) -> None:
        if c.masked_image_latents is None:
            if c.mask_image is None:
                raise ValueError("FluxFillPipeline needs `mask_image` (or `masked_image_latents`)")
            image_processor.check_mask_size(c.image, c.mask_image)
        self.check_image_and_strength(c)
        if c.masked_image_latents is None:
            c.mask = image_processor.preprocess(c.mask_image, c.height, c.width, name="mask_image", mask=True)

    def conditioning(self, c: SimpleNamespace, batch: int, dtype: ms.Type, generator, img_ids: Tensor) -> Conditioning:
        width = self.transformer.config.in_channels - 4 * self.latent_channels
        if c.masked_image_latents is not None:
            extra = Tensor(c.masked_image_latents) if isinstance(c.masked_image_latents, np.ndarray) \
                else c.masked_image_latents
            if tuple(extra.shape) != (batch, img_ids.shape[0], width):
                raise ValueError(f"`masked_image_latents` must be packed, {(batch, img_ids.shape[0], width)}; got "
                                 f"{tuple(extra.shape)}")
            return Conditioning(img_ids=img_ids, extra_channels=extra.astype(dtype))
        masked = c.pixels * (1 - c.mask)  # the region to fill becomes 0, mid-grey
        generators = generator[:masked.shape[0]] if isinstance(generator, (list, tuple)) else generator
        masked_latents = image_processor.tile_batch(self.encode_image(masked, generators).astype(dtype), batch,
                                                    "image")
        mask = image_processor.pack_mask(image_processor.tile_batch(c.mask, batch, "mask_image"),
                                         self.vae_scale_factor)
        extra = ops.concat([pack_latents(masked_latents), Tensor(mask).astype(dtype)], 2)
        return Conditioning(img_ids=img_ids, extra_channels=extra)


__all__ = ["FluxFillPipeline"]
