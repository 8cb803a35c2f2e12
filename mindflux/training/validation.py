"""Validation during and after training: --num_validation_images images of --validation_prompt.

The pipeline is built around the models being trained (no second copy of the base weights); the
prompt's embeddings come from the run's prompt table (or from CLIP when it trains). The final
validation loads the saved LoRA file through the pipeline's own LoRA API (as a second adapter,
active alone), as diffusers renders its final images from the saved file.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from ..device import pynative as _pynative

logger = logging.getLogger("train_dreambooth_lora_flux")


class Validator:
    """Renders and saves validation images; `pipeline_class` is FluxPipeline or FluxKontextPipeline, whose
    call also gets `pipeline_kwargs` (Kontext: the reference image)."""

    def __init__(self, folder: str, output_dir: str, prompt: str | None, num_images: int, seed: int | None,
                 resolution: int | None, num_inference_steps: int, guidance_scale: float, prompts, weight_dtype,
                 transformer, vae, text_encoder=None, clip_tokenizer=None, pipeline_class=None,
                 pipeline_kwargs: dict[str, Any] | None = None):
        self.folder, self.output_dir = folder, output_dir
        self.prompt, self.num_images, self.seed = prompt, num_images, seed
        self.resolution, self.num_inference_steps, self.guidance_scale = resolution, num_inference_steps, guidance_scale
        self.prompts, self.weight_dtype = prompts, weight_dtype
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.clip_tokenizer = text_encoder, clip_tokenizer
        self.pipeline_class = pipeline_class
        self.pipeline_kwargs = pipeline_kwargs or {}

    @property
    def enabled(self) -> bool:
        return self.prompt is not None and self.num_images > 0

    def pipeline(self):
        pipeline_class = self.pipeline_class
        if pipeline_class is None:
            from ..pipelines import FluxPipeline as pipeline_class
        pipeline = pipeline_class.from_pretrained(self.folder, vae=self.vae, transformer=self.transformer,
                                                  text_encoder=self.text_encoder, text_encoder_2=None,
                                                  tokenizer=None, tokenizer_2=None)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def embeddings(self):
        import mindspore as ms

        t5 = ms.Tensor(self.prompts.t5[self.prompt][None]).astype(self.weight_dtype)
        if self.text_encoder is not None:
            from ..text_encoding import encode_clip_pooled

            with _pynative():
                pooled = encode_clip_pooled(self.text_encoder, self.clip_tokenizer, [self.prompt])
        else:
            pooled = ms.Tensor(self.prompts.pooled[self.prompt][None])
        return t5, pooled.astype(self.weight_dtype)

    def render(self, pipeline) -> list:
        from .generation import generate_images

        t5, pooled = self.embeddings()
        generator = np.random.default_rng(self.seed) if self.seed is not None else None
        size = self.resolution
        self.transformer.set_train(False)  # LoRA dropout off
        try:
            return generate_images(pipeline, self.num_images, prompt_embeds=t5, pooled_prompt_embeds=pooled,
                                   generator=generator, height=size, width=size,
                                   num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                                   **self.pipeline_kwargs)
        finally:
            self.transformer.set_train(True)

    def save(self, images: list, step: int, epoch: int, final: bool, reporter) -> list[str]:
        if final:
            names = [f"image_{i}.png" for i in range(len(images))]
        else:
            names = [os.path.join("validation", f"step{step:06d}_epoch{epoch:04d}_{i}.png") for i in range(len(images))]
        for name, image in zip(names, images):
            path = os.path.join(self.output_dir, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            image.save(path)
        reporter.log_images("test" if final else "validation", images, step)
        reporter.log_event("validation", step, epoch=epoch, images=names, final=final)
        return names

    def validate(self, step: int, epoch: int, reporter) -> list[str]:
        """Images with the adapter being trained, saved as validation/step<step>_epoch<epoch>_<i>.png; returns their
        paths relative to output_dir."""
        if not self.enabled:
            return []
        logger.info("Running validation... Generating %d images with prompt: %s", self.num_images, self.prompt)
        return self.save(self.render(self.pipeline()), step, epoch, False, reporter)

    def validate_saved(self, lora_path: str, step: int, epoch: int, reporter) -> list[str]:
        """Images with the saved file loaded as adapter "saved", alone, saved as image_<i>.png."""
        if not self.enabled:
            return []
        logger.info("Running validation with %s... Generating %d images with prompt: %s", lora_path,
                    self.num_images, self.prompt)
        pipeline = self.pipeline()
        pipeline.load_lora_weights(lora_path, adapter_name="saved")
        pipeline.set_adapters(["saved"])
        try:
            return self.save(self.render(pipeline), step, epoch, True, reporter)
        finally:
            pipeline.delete_adapters("saved")
            pipeline.set_adapters(["default"])
