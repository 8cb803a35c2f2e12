"""FluxKontextPipeline: edit an image with FLUX.1-Kontext-dev (diffusers' class and numbers).

Over FluxPipeline it adds the image to edit as reference tokens in the same sequence:
    height x width --scaled to max_area pixels at the same aspect ratio, multiples of 16--> the output size
    image --[_auto_resize: the preferred Kontext resolution nearest in aspect ratio]--> resize (Lanczos), [-1, 1]
          --VAE encode, posterior mean, (z - shift) * scale, pack--> reference (B*n, M, 64), ids [1, row, column]
    per step the transformer sees [latents; reference] with ids [img_ids; reference ids] and only the first N
    outputs (the latents' velocity) are kept. Without `image` it is text to image.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor

from .. import image_processor
from ..latents import pack_latents, prepare_latent_image_ids
from .denoise import Conditioning
from .flux import FluxPipeline, logger

# (width, height) of the resolutions FLUX.1-Kontext was trained at (BFL's list, as diffusers')
PREFERRED_KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]


def preferred_kontext_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of the preferred Kontext resolution whose aspect ratio is nearest the image's."""
    ratio = width / height
    _, w, h = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return h, w


def fit_to_area(height: int, width: int, max_area: int, multiple: int = 16) -> tuple[int, int]:
    """height x width scaled to about `max_area` pixels at the same aspect ratio, each side rounded down to
    `multiple`."""
    ratio = width / height
    w, h = round((max_area * ratio) ** 0.5), round((max_area / ratio) ** 0.5)
    return h // multiple * multiple, w // multiple * multiple


def kontext_sizes(height: int, width: int, max_area: int, image_size: tuple[int, int] | None = None,
                  auto_resize: bool = True, multiple: int = 16) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """((height, width) of the output, (height, width) the reference image is resized to, or None without one)."""
    size = fit_to_area(height, width, max_area, multiple)
    if image_size is None:
        return size, None
    h, w = (s - s % multiple for s in image_size)
    if auto_resize:
        h, w = preferred_kontext_size(h, w)
    return size, (h // multiple * multiple, w // multiple * multiple)


class FluxKontextPipeline(FluxPipeline):
    """Image editing with FLUX.1-Kontext-dev. `image`: the picture to edit (a path, PIL image, numpy array in
    [0, 1], Tensor, or a list), or None for text to image. `max_area` (default 1024^2): the output's pixel count;
    height / width (default 1024 x 1024) only give its aspect ratio. `_auto_resize` (default True): the image is
    resized to the Kontext resolution nearest its aspect ratio; otherwise it keeps its size (rounded down to 16).
    Other arguments are FluxPipeline's (guidance_scale 3.5, true CFG with a negative prompt)."""

    def __call__(self, prompt=None, image=None, max_area: int = 1024 ** 2, _auto_resize: bool = True,
                 guidance_scale: float = 3.5, **kwargs: Any):
        return self.generate(prompt=prompt, image=image, max_area=max_area, _auto_resize=_auto_resize,
                             guidance_scale=guidance_scale, **kwargs)

    def prepare_inputs(self, c: SimpleNamespace) -> None:
        default = self.default_sample_size * self.vae_scale_factor
        height, width = c.height or default, c.width or default
        images = None if c.image is None else image_processor.as_image_list(c.image, "image")
        image_size = None if images is None else image_processor.image_size(images)
        (c.height, c.width), reference_size = kontext_sizes(height, width, c.max_area, image_size, c._auto_resize,
                                                            self.vae_scale_factor * 2)
        if (c.height, c.width) != (height, width):
            logger.warning("Generation `height` and `width` have been adjusted to %d and %d to fit the model "
                           "requirements.", c.height, c.width)
        c.pixels = None if images is None else image_processor.preprocess(images, *reference_size, name="image")

    def prepare_conditioning(self, c: SimpleNamespace, batch: int, dtype: ms.Type, timesteps: np.ndarray,
                             generator) -> tuple[Tensor, Conditioning]:
        reference = reference_ids = None
        if c.pixels is not None:  # encoded first, as diffusers; the mean needs no draw
            rows = c.pixels.shape[0]
            if batch % rows:
                raise ValueError(f"Cannot duplicate `image` of batch size {rows} to {batch} text prompts.")
            image_latents = image_processor.tile_batch(self.encode_image(c.pixels, sample=False).astype(dtype),
                                                       batch, "image")
            reference = pack_latents(image_latents)
            ids = prepare_latent_image_ids(image_latents.shape[2] // 2, image_latents.shape[3] // 2).asnumpy()
            ids[:, 0] = 1  # the reference is a second "frame" of the same positions
            reference_ids = Tensor(ids)
        latents, img_ids = self.prepare_latents(batch, self.latent_channels, c.height, c.width, dtype, generator,
                                                c.latents)
        return latents, Conditioning(img_ids=img_ids, reference=reference, reference_ids=reference_ids)


__all__ = ["FluxKontextPipeline", "PREFERRED_KONTEXT_RESOLUTIONS", "fit_to_area", "kontext_sizes",
           "preferred_kontext_size"]
