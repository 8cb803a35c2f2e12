"""DreamBooth images: a folder of instance images (and class images for prior preservation).

Preprocessing follows diffusers' DreamBoothDataset: EXIF orientation, RGB, resize of the shorter
side to `resolution` (bilinear), a center or random square crop, an optional horizontal flip, and
values in [-1, 1], as (3, resolution, resolution) float32. Instance images are preprocessed once
at start (so their random crop and flip are drawn once, as in diffusers); class images on every
use. Randomness comes from a numpy Generator the caller owns.
"""

from __future__ import annotations

import os

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: str) -> list[str]:
    """The image files directly in `folder`, sorted by name."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.lower().endswith(IMAGE_EXTENSIONS)]


def preprocess_image(path: str, resolution: int, center_crop: bool, flip: bool,
                     rng: np.random.Generator) -> np.ndarray:
    """One image file -> (3, resolution, resolution) float32 in [-1, 1]."""
    from PIL import Image
    from PIL.ImageOps import exif_transpose

    with Image.open(path) as opened:
        image = exif_transpose(opened).convert("RGB")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    scaled_long = int(resolution * long / short)  # torchvision's Resize(int) rounding
    size = (resolution, scaled_long) if w <= h else (scaled_long, resolution)
    image = image.resize(size, Image.BILINEAR)
    w, h = image.size
    if center_crop:
        top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    else:
        top, left = int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
    return pixels * 2.0 - 1.0


class DreamBoothImages:
    """Instance images (repeated `repeats` times) and optional class images, indexed like diffusers'
    dataset: item i is instance i % n_instance (and class i % n_class); the length is the larger count."""

    def __init__(self, instance_data_dir: str, resolution: int, center_crop: bool = False,
                 random_flip: bool = False, repeats: int = 1, class_data_dir: str | None = None,
                 num_class_images: int | None = None, rng: np.random.Generator | None = None):
        self.rng = rng if rng is not None else np.random.default_rng()
        self.resolution, self.center_crop = resolution, center_crop
        paths = list_images(instance_data_dir)
        if not paths:
            raise ValueError(f"--instance_data_dir {instance_data_dir} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths = [p for p in paths for _ in range(repeats)]
        self.instance_pixels = [preprocess_image(p, resolution, center_crop, random_flip and self.rng.random() < 0.5,
                                                 self.rng) for p in paths]
        self.class_paths: list[str] = []
        if class_data_dir is not None:
            self.class_paths = list_images(class_data_dir)
            if num_class_images is not None:
                self.class_paths = self.class_paths[:num_class_images]
        self.length = max(len(self.instance_pixels), len(self.class_paths))

    def __len__(self) -> int:
        return self.length

    def instance(self, index: int) -> np.ndarray:
        return self.instance_pixels[index % len(self.instance_pixels)]

    def class_image(self, index: int) -> np.ndarray:
        path = self.class_paths[index % len(self.class_paths)]
        return preprocess_image(path, self.resolution, self.center_crop, False, self.rng)

    def epoch_batches(self, batch_size: int) -> list[np.ndarray]:
        """A shuffled epoch as lists of indices; the last batch may be smaller (no drop_last, as diffusers)."""
        order = self.rng.permutation(self.length)
        return [order[i:i + batch_size] for i in range(0, self.length, batch_size)]
