"""Starting from an image: the part Img2Img, Inpaint and Fill share.

`strength` in [0, 1] picks where on the schedule the loop starts: the first
int(steps * (1 - strength)) timesteps are skipped, and the image's latents are noised to the first
kept one, sigma * noise + (1 - sigma) * image (the scheduler's scale_noise). strength 1 starts from
pure noise; a strength that leaves no step is an error, found before any model work.
"""

from __future__ import annotations

from types import SimpleNamespace

import mindspore as ms
import numpy as np
from mindspore import Tensor

from .. import image_processor
from ..latents import latent_size, pack_latents, prepare_latent_image_ids


def steps_kept(num_inference_steps: int, strength: float) -> tuple[int, int]:
    """(index of the first timestep run, number of steps run) for `strength`, as diffusers' get_timesteps."""
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    t_start = int(max(num_inference_steps - init_timestep, 0))
    return t_start, num_inference_steps - t_start


class StrengthMixin:
    """For pipelines whose call has `image` and `strength`; mixed into a FluxPipeline subclass."""

    def check_image_and_strength(self, c: SimpleNamespace) -> None:
        """`image` read and resized to the call's size (c.pixels, (B, 3, H, W) in [-1, 1]); strength checked."""
        if not 0 <= c.strength <= 1:
            raise ValueError(f"The value of strength should in [0.0, 1.0] but is {c.strength}")
        steps = len(c.sigmas) if c.sigmas is not None else c.num_inference_steps
        if steps_kept(steps, c.strength)[1] < 1:
            raise ValueError(f"strength {c.strength} with {steps} steps leaves no denoising step (it runs "
                             f"int(steps * strength) of them); raise num_inference_steps or strength")
        if c.image is None:
            raise ValueError(f"{type(self).__name__} needs `image`")
        c.height = c.height or self.default_sample_size * self.vae_scale_factor
        c.width = c.width or self.default_sample_size * self.vae_scale_factor
        c.pixels = image_processor.preprocess(c.image, c.height, c.width, name="image",
                                              resize_mode=getattr(c, "resize_mode", "default"),
                                              crops_coords=getattr(c, "crops_coords", None))

    def schedule(self, c: SimpleNamespace, timesteps: np.ndarray) -> np.ndarray:
        t_start, _ = steps_kept(len(timesteps), c.strength)
        self.scheduler.set_begin_index(t_start)
        return timesteps[t_start:]

    def image_latents(self, c: SimpleNamespace, batch: int, dtype: ms.Type, generator) -> Tensor:
        """The image's latents (B, C, h, w), a posterior sample each, repeated to the batch as a whole."""
        rows = c.pixels.shape[0]
        if batch % rows:
            raise ValueError(f"Cannot duplicate `image` of batch size {rows} to {batch} text prompts.")
        generators = generator[:rows] if isinstance(generator, (list, tuple)) else generator
        return image_processor.tile_batch(self.encode_image(c.pixels, generators).astype(dtype), batch, "image")

    def noised_start(self, c: SimpleNamespace, batch: int, dtype: ms.Type, timesteps: np.ndarray,
                     generator) -> tuple[Tensor, Tensor, Tensor]:
        """(image latents, noise, noised latents), all unpacked (B, C, h, w): the image at the first timestep."""
        image_latents = self.image_latents(c, batch, dtype, generator)
        noise = Tensor(self.randn(image_latents.shape, generator)).astype(dtype)
        start = self.scheduler.scale_noise(image_latents, np.full((batch,), timesteps[0], np.float32), noise)
        return image_latents, noise, start

    def prepare_conditioning(self, c: SimpleNamespace, batch: int, dtype: ms.Type, timesteps: np.ndarray,
                             generator):
        """Img2Img and Fill: the noised image, packed; given `latents` are used as they are (packed)."""
        h, w = latent_size(c.height, c.width, self.vae_scale_factor)
        ids = prepare_latent_image_ids(h // 2, w // 2)
        if c.latents is not None:
            latents, ids = self.prepare_latents(batch, self.latent_channels, c.height, c.width, dtype, None, c.latents)
        else:
            latents = pack_latents(self.noised_start(c, batch, dtype, timesteps, generator)[2])
        return latents, self.conditioning(c, batch, dtype, generator, ids)

    def conditioning(self, c: SimpleNamespace, batch: int, dtype: ms.Type, generator, img_ids: Tensor):
        from .denoise import Conditioning

        return Conditioning(img_ids=img_ids)


__all__ = ["StrengthMixin", "steps_kept"]
