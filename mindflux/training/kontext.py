"""FLUX.1 Kontext LoRA training (image editing): the run behind train/train_dreambooth_lora_flux_kontext.py.

The DreamBooth run on other parts, as diffusers' train_dreambooth_lora_flux_kontext.py does it:

    dataset folder/metadata.jsonl   {"image": "out/1.png", "cond_image": "in/1.png", "text": "make it blue"}
                                    (or a `datasets` dataset with those columns: data_source.py)
    target  --VAE, .mode() (or .sample())--> (z - shift) * scale --noised--> packed tokens (ids [0, row, col])
    reference --same VAE read-out, clean-------------------------> packed tokens appended (ids [1, row, col])
    the transformer sees [target; reference]; the loss covers the target's tokens only

Target and reference are resized and cropped together (the same crop, the same flip), so a pair
always shares one shape and one bucket. Prior preservation and text-encoder training are not
part of Kontext training, as in diffusers.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .batches import BatchBuilder, BatchDraws
from .data_source import DataSource
from .dataset import DataError, DreamBoothDataset, load_image, nearest_bucket, resize_and_crop, to_pixels
from .dreambooth import DEFAULT_LORA_LAYERS, DreamBoothTrainer, run_training
from .run_config import TrainingConfig, TrainingError

KONTEXT_LORA_LAYERS = DEFAULT_LORA_LAYERS + ["proj_mlp"]  # diffusers' Kontext script adds the single blocks' MLP


def crop_pair(target, reference, height: int, width: int, center_crop: bool, rng: np.random.Generator):
    """Both images resized and cropped to height x width with one crop: the reference first takes the target's
    size, then both get the same resize and the same crop offsets (drawn once from `rng`)."""
    from PIL import Image

    if reference.size != target.size:
        reference = reference.resize(target.size, Image.BILINEAR)
    state = rng.bit_generator.state
    cropped = resize_and_crop(target, height, width, center_crop, rng)
    twin = np.random.default_rng()
    twin.bit_generator.state = state  # the same draws: the same offsets on an image of the same size
    return cropped, resize_and_crop(reference, height, width, center_crop, twin)


class KontextDataset(DreamBoothDataset):
    """(target, reference, caption) triples of a data source (data_source.read_data_source with a
    --cond_image_column); an item is a target with its reference. The DreamBooth dataset's batching, buckets
    and per-step draws apply unchanged."""

    def __init__(self, source: DataSource, instance_prompt: str | None, resolution: int, center_crop: bool = False,
                 repeats: int = 1, buckets: list[tuple[int, int]] | None = None,
                 rng: np.random.Generator | None = None, num_workers: int = 0):
        rng = rng if rng is not None else np.random.default_rng()
        self.instance_prompt, self.class_prompt = instance_prompt, None
        self.resolution, self.center_crop = resolution, center_crop
        self.buckets = buckets or [(resolution, resolution)]
        paths, captions, references = source.images, source.captions, source.references
        if not paths:
            raise DataError(f"{source.name} lists no image pairs")
        self.custom_instance_prompts = any(captions)
        self.images, self.references = self._load_pairs(paths, references, rng, num_workers)
        self.image_paths = [str(p) for p in paths]
        self.item_image = [j for j in range(len(paths)) for _ in range(repeats)]
        self.captions = [captions[j] if captions[j] else instance_prompt for j in self.item_image]
        self.class_images = []
        self.length = len(self.item_image)

    def _load_pairs(self, paths: list[str], references: list[str], rng, num_workers: int):
        if num_workers > 0:
            with ThreadPoolExecutor(num_workers) as pool:
                decoded = list(pool.map(lambda pair: tuple(map(load_image, pair)), zip(paths, references)))
        else:
            decoded = [(load_image(p), load_image(r)) for p, r in zip(paths, references)]
        targets, conds = [], []
        for target, reference in decoded:  # crops drawn in file order whatever the thread count
            h, w = self.buckets[nearest_bucket(target.height, target.width, self.buckets)]
            a, b = crop_pair(target, reference, h, w, self.center_crop, rng)
            targets.append(a)
            conds.append(b)
        return targets, conds

    def reference_by_id(self, image_id: int, flip: bool = False) -> np.ndarray:
        """(3, H, W) float32 pixels in [-1, 1] of the reference of image `image_id`, mirrored with its target."""
        return to_pixels(self.references[image_id], flip)


class KontextBatchBuilder(BatchBuilder):
    """The DreamBooth inputs plus the reference latents (last input); img_ids cover target then reference."""

    def draw(self, size: int, latent_shape: tuple[int, ...]) -> BatchDraws:
        from ..latents import standard_normal

        draws = super().draw(size, latent_shape)
        draws.cond_eps = standard_normal(latent_shape, self.step_rng)
        return draws

    def build(self, batch: list[int], draws: BatchDraws, shape: tuple[int, ...]) -> list:
        import mindspore as ms

        from ..latents import prepare_latent_image_ids

        inputs = super().build(batch, draws, shape)
        rows = self.rows(len(batch))
        keys = [("reference", self.dataset.image_id(batch[r]), bool(draws.flips[r])) for r in rows]
        cond = self.normalized_latents(keys, draws.cond_eps[rows])
        reference_ids = prepare_latent_image_ids(shape[2] // 2, shape[3] // 2).asnumpy()
        reference_ids[:, 0] = 1  # the reference is a second "frame" at the same positions, as at inference
        inputs[6] = ms.Tensor(np.concatenate([inputs[6].asnumpy(), reference_ids]))
        return inputs + [cond]


class KontextTrainer(DreamBoothTrainer):
    """Kontext LoRA training: DreamBoothTrainer with pairs, reference tokens and FluxKontextPipeline."""

    default_lora_layers = KONTEXT_LORA_LAYERS
    batch_builder_class = KontextBatchBuilder

    def __init__(self, config: TrainingConfig):
        if config.with_prior_preservation:
            raise TrainingError("--with_prior_preservation is not supported with --cond_image_column (as in "
                                "diffusers' Kontext script)")
        if config.train_text_encoder:
            raise TrainingError("--train_text_encoder is not supported with --cond_image_column (as in diffusers' "
                                "Kontext script)")
        if config.validation_image is not None and not os.path.isfile(config.validation_image):
            raise TrainingError(f"--validation_image {config.validation_image} does not exist")
        super().__init__(config)
        if not self.transformer.config.guidance_embeds:
            raise TrainingError(f"{config.pretrained_model_name_or_path}: the transformer has no guidance embedding; "
                                "Kontext training expects FLUX.1-Kontext-dev")

    @property
    def pipeline_class(self):
        from ..pipelines.flux_kontext import FluxKontextPipeline

        return FluxKontextPipeline

    def load_dataset(self):
        c = self.config
        return KontextDataset(self.data_source, c.instance_prompt, c.resolution, c.center_crop, c.repeats,
                              self.buckets, rng=self.state.crop_rng, num_workers=c.dataloader_num_workers)

    def make_validator(self, **pipeline_kwargs):
        c = self.config
        if c.validation_resolution is not None:  # that many pixels, the reference at its own size (rounded to 16)
            pipeline_kwargs.update(max_area=c.validation_resolution ** 2, _auto_resize=False)
        image = load_image(c.validation_image) if c.validation_image is not None else None
        return super().make_validator(image=image, **pipeline_kwargs)

    def card_options(self) -> dict:
        return {"pipeline_class": "FluxKontextPipeline", "title": "FLUX Kontext LoRA"}


def train_kontext(config: TrainingConfig) -> str | None:
    """Run Kontext LoRA training; returns the LoRA file's path (rank 0)."""
    return run_training(KontextTrainer, config)
