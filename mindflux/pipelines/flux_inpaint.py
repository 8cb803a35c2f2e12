"""FluxInpaintPipeline: repaint the masked part of an image with FLUX.1-dev / schnell (diffusers' class and numbers).

Over Img2Img (mindflux/pipelines/strength.py) it adds a mask and a blend after every step:
    mask_image --greyscale, resize, >= 0.5--> (B, 1, H, W) --nearest to H/8 x W/8, 16 channels, pack--> m (B*n, N, 64)
    after step i:  latents = (1 - m) * image latents noised to timestep i+1  +  m * latents
so outside the mask the result follows the image; the last step keeps the image's own latents there.
`padding_mask_crop` works on a crop around the mask (grown to the output's aspect ratio) and pastes
the result back into the original image (PIL output only).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor

from .. import image_processor
from ..latents import latent_size, pack_latents, prepare_latent_image_ids
from .denoise import Conditioning
from .flux import FluxPipeline
from .strength import StrengthMixin


class FluxInpaintPipeline(StrengthMixin, FluxPipeline):
    """Inpainting. `image` as in FluxImg2ImgPipeline; `mask_image` (same size as `image`): white = repaint,
    black = keep. `strength` (default 0.6): 1 repaints the masked region from pure noise.
    `padding_mask_crop`: pixels of margin around the mask's box; the crop is generated and pasted back.
    `latents`: the starting noise, unpacked (B, 16, H/8, W/8) as diffusers takes it, or packed.
    `masked_image_latents` is accepted for diffusers' signature; the 64-channel transformer does not use it.
    Other arguments are FluxPipeline's."""

    def __call__(self, prompt=None, image=None, mask_image=None, masked_image_latents=None,
                 strength: float = 0.6, padding_mask_crop: int | None = None, guidance_scale: float = 7.0,
                 **kwargs: Any):
        return self.generate(prompt=prompt, image=image, mask_image=mask_image,
                             masked_image_latents=masked_image_latents, strength=strength,
                             padding_mask_crop=padding_mask_crop, guidance_scale=guidance_scale, **kwargs)

    def prepare_inputs(self, c: SimpleNamespace) -> None:
        if c.mask_image is None:
            raise ValueError("FluxInpaintPipeline needs `mask_image`")
        image_processor.check_mask_size(c.image, c.mask_image)
        c.crops_coords, c.resize_mode = None, "default"
        if c.padding_mask_crop is not None:
            if c.output_type != "pil":
                raise ValueError(f"`padding_mask_crop` needs output_type 'pil'; got {c.output_type!r}")
            masks = image_processor.as_image_list(c.mask_image, "mask_image")
            if not all(hasattr(m, "convert") for m in masks + image_processor.as_image_list(c.image, "image")):
                raise ValueError("`padding_mask_crop` needs `image` and `mask_image` as PIL images (or files)")
            c.height = c.height or self.default_sample_size * self.vae_scale_factor
            c.width = c.width or self.default_sample_size * self.vae_scale_factor
            c.crops_coords = image_processor.crop_region(masks[0], c.width, c.height, pad=c.padding_mask_crop)
            c.resize_mode = "fill"
        self.check_image_and_strength(c)
        c.mask = image_processor.preprocess(c.mask_image, c.height, c.width, name="mask_image", mask=True,
                                            resize_mode=c.resize_mode, crops_coords=c.crops_coords)

    def prepare_conditioning(self, c: SimpleNamespace, batch: int, dtype: ms.Type, timesteps: np.ndarray,
                             generator) -> tuple[Tensor, Conditioning]:
        h, w = latent_size(c.height, c.width, self.vae_scale_factor)
        if c.latents is None:
            image_latents, noise, latents = self.noised_start(c, batch, dtype, timesteps, generator)
            noise, latents = pack_latents(noise), pack_latents(latents)
        else:  # given noise is the start itself, not noised image latents (diffusers)
            image_latents = self.image_latents(c, batch, dtype, generator)
            noise = Tensor(c.latents) if isinstance(c.latents, np.ndarray) else c.latents
            noise = pack_latents(noise) if noise.ndim == 4 else noise
            expected = (batch, (h // 2) * (w // 2), 4 * self.latent_channels)
            if tuple(noise.shape) != expected:
                raise ValueError(f"`latents` must be {expected} packed or its unpacked (B, C, h, w); got "
                                 f"{tuple(c.latents.shape)}")
            noise = latents = noise.astype(dtype)
        image_latents = pack_latents(image_latents)
        mask = image_processor.tile_batch(image_processor.resize_nearest(c.mask, h, w), batch, "mask_image")
        mask = Tensor(image_processor.pack_array(np.repeat(mask, self.latent_channels, axis=1))).astype(dtype)
        scheduler = self.scheduler

        def blend(i: int, latents: Tensor) -> Tensor:
            known = image_latents
            if i < len(timesteps) - 1:  # noised to the next timestep (the scheduler's step index is there now)
                known = scheduler.scale_noise(image_latents, np.array([timesteps[i + 1]], np.float32), noise)
            return (1 - mask) * known + mask * latents

        return latents, Conditioning(img_ids=prepare_latent_image_ids(h // 2, w // 2), blend=blend)

    def finish(self, c: SimpleNamespace, image):
        if c.padding_mask_crop is None:
            return image
        masks = image_processor.as_image_list(c.mask_image, "mask_image")
        originals = image_processor.as_image_list(c.image, "image")
        return [image_processor.apply_overlay(masks[0], originals[0], i, c.crops_coords) for i in image]


__all__ = ["FluxInpaintPipeline"]
