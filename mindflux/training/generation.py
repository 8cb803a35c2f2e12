"""Images made during training, all through FluxPipeline: class images for prior preservation and
validation images. There is no second denoising loop here; the pipeline's numbers are the numbers."""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

from .dataset import list_images

logger = logging.getLogger(__name__)


def generate_images(pipeline, num_images: int, prompt: str | None = None, prompt_embeds=None,
                    pooled_prompt_embeds=None, generator: np.random.Generator | None = None, batch_size: int = 1,
                    **call_kwargs) -> list:
    """`num_images` PIL images of one prompt (or its embeddings), `batch_size` per pipeline call.

    One generator serves every call and advances, as diffusers' validation does with its torch
    generator; `call_kwargs` go to the pipeline (height, width, num_inference_steps, ...).
    """
    images = []
    while len(images) < num_images:
        n = min(batch_size, num_images - len(images))
        if prompt_embeds is not None:
            out = pipeline(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                           num_images_per_prompt=n, generator=generator, **call_kwargs)
        else:
            out = pipeline(prompt=[prompt] * n, generator=generator, **call_kwargs)
        images += list(out.images)
    return images


def count_class_images(class_data_dir: str) -> int:
    os.makedirs(class_data_dir, exist_ok=True)
    return len(list_images(class_data_dir))


def generate_class_images(pipeline_factory, class_data_dir: str, class_prompt: str, num_class_images: int,
                          sample_batch_size: int, seed: int | None, rank: int = 0, world_size: int = 1,
                          existing: int | None = None, **call_kwargs) -> int:
    """Fill `class_data_dir` up to `num_class_images` images of `class_prompt`, as diffusers does
    (`<index>-<sha1>.jpg`); under msrun each process makes every world_size-th image, all counting from
    the same `existing` (counted before any process started writing). Returns how many this process
    made. `pipeline_factory()` builds the pipeline only when images are missing."""
    if existing is None:
        existing = count_class_images(class_data_dir)
    missing = num_class_images - existing
    if missing <= 0:
        return 0
    mine = list(range(rank, missing, world_size))
    logger.info("Number of class images to sample: %d (%d in this process)", missing, len(mine))
    pipeline = pipeline_factory()
    pipeline.set_progress_bar_config(disable=True)
    generator = np.random.default_rng(None if seed is None else [seed, rank])
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(mine), sample_batch_size), desc="Generating class images", disable=rank != 0):
        indices = mine[start:start + sample_batch_size]
        images = generate_images(pipeline, len(indices), prompt=class_prompt, generator=generator,
                                 batch_size=len(indices), **call_kwargs)
        for index, image in zip(indices, images):
            digest = hashlib.sha1(image.tobytes()).hexdigest()
            path = os.path.join(class_data_dir, f"{existing + index}-{digest}.jpg")
            tmp = f"{path}.tmp-{os.getpid()}"  # not an image extension: never listed as a class image
            image.save(tmp, format="JPEG")
            os.replace(tmp, path)  # a killed job leaves no half image for the next run to trip on
    del pipeline
    return len(mine)
