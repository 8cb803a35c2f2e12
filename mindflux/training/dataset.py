"""DreamBooth training data: images with captions, aspect-ratio buckets, and each epoch's batches.

A folder dataset is either

    instance_data_dir/                       instance_data_dir/
        dog1.jpg  dog1.txt                       metadata.jsonl    {"file_name": "a/dog1.jpg", "text": "..."}
        dog2.png  (no .txt: --instance_prompt)   a/dog1.jpg ...

With metadata.jsonl only the images it lists are used; `--image_column` names the image key
(HF imagefolder's "file_name" is accepted as well) and `--caption_column` the caption key
(default: "text", "caption" or "prompt", whichever is present). Without it every image directly
in the folder is used, captioned by the .txt file of the same name. An empty caption falls back
to `--instance_prompt`, as in diffusers.

Preprocessing happens once at load (EXIF orientation, RGB, resize of the shorter side, a centre
or random crop drawn from the caller's generator), and the result is kept as uint8. What varies
per step is drawn per step from the run's data generator (`draw_step`): the horizontal flip
(--random_flip) and caption dropout. That keeps a resumed run exact: the generator's state is
all there is to save.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import image_processor
from ..image_processor import resize_and_crop, to_pixels

if TYPE_CHECKING:
    from .data_source import DataSource

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
CAPTION_KEYS = ("text", "caption", "prompt")

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Training data that cannot be used; the message names the file or folder."""


def list_images(folder: str) -> list[str]:
    """The image files directly in `folder`, sorted by name."""
    if not os.path.isdir(folder):
        raise DataError(f"image folder {folder} does not exist")
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))]


def load_image(path: str):
    """A PIL RGB image with its EXIF orientation applied (16-bit greyscale scaled, transparency over white);
    DataError naming the file when it cannot be read."""
    try:
        return image_processor.load_image(path, None, alpha_over_white=True)
    except ValueError as err:
        raise DataError(str(err)) from None


def parse_buckets(spec: str | None, multiple: int = 16) -> list[tuple[int, int]] | None:
    """'h1,w1;h2,w2;...' -> [(h1, w1), ...]; each side a positive multiple of `multiple`."""
    if spec is None or not spec.strip():
        return None
    buckets = []
    for item in spec.split(";"):
        if not item.strip():
            continue
        try:
            h, w = (int(v) for v in item.split(","))
        except ValueError:
            raise DataError(f"--aspect_ratio_buckets: {item!r} is not 'height,width'") from None
        if h <= 0 or w <= 0 or h % multiple or w % multiple:
            raise DataError(f"--aspect_ratio_buckets: {h}x{w} must be positive multiples of {multiple}")
        buckets.append((h, w))
    if not buckets:
        raise DataError("--aspect_ratio_buckets lists no bucket")
    return buckets


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> int:
    """The bucket whose aspect ratio is closest to the image's (in log ratio: 2:1 and 1:2 are equally far from 1:1)."""
    ratio = np.log(height / width)
    return int(np.argmin([abs(np.log(h / w) - ratio) for h, w in buckets]))


def metadata_records(metadata: str) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) for each non-empty line of a metadata.jsonl file; DataError naming the line
    that is not a JSON object."""
    with open(metadata, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{metadata} line {number} is not JSON: {err}") from None
            if not isinstance(record, dict):
                raise DataError(f"{metadata} line {number} is not a JSON object")
            yield number, record


def read_folder_captions(folder: str, caption_column: str | None = None,
                         image_column: str = "image") -> tuple[list[str], list[str | None]]:
    """(image paths, captions or None) of a folder dataset (see the module doc)."""
    if not os.path.isdir(folder):
        raise DataError(f"instance data folder {folder} does not exist")
    metadata = os.path.join(folder, METADATA_FILE)
    if not os.path.isfile(metadata):
        if caption_column is not None:
            raise DataError(f"--caption_column {caption_column} needs {metadata}; for one caption per image put a "
                            ".txt file beside each image instead")
        if image_column != "image":
            raise DataError(f"--image_column {image_column} needs {metadata}")
        paths = list_images(folder)
        captions = []
        for path in paths:
            txt = os.path.splitext(path)[0] + ".txt"
            captions.append(_read_text(txt) if os.path.isfile(txt) else None)
        return paths, captions
    paths, captions = [], []
    for number, record in metadata_records(metadata):
        key = image_column if image_column in record else "file_name" if "file_name" in record else None
        if key is None:
            raise DataError(f"{metadata} line {number} has no image column '{image_column}' (or 'file_name'); "
                            f"it has {', '.join(record)}")
        if caption_column is not None and caption_column not in record:
            raise DataError(f"--caption_column '{caption_column}' not found in {metadata} line {number}; it has "
                            f"{', '.join(record)}")
        caption_key = caption_column or next((k for k in CAPTION_KEYS if k in record), None)
        path = os.path.join(folder, str(record[key]))
        if not os.path.isfile(path):
            raise DataError(f"{metadata} line {number}: image {path} does not exist")
        paths.append(path)
        caption = record.get(caption_key) if caption_key else None
        captions.append(str(caption) if caption is not None else None)
    return paths, captions


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read caption {path}: {err}") from None


@dataclass
class StepDraw:
    """The per-step randomness of a batch: which samples are flipped and whose caption is dropped."""

    flips: np.ndarray          # (n,) bool
    drop_captions: np.ndarray  # (n,) bool


class DreamBoothDataset:
    """Instance images with their captions (each repeated `repeats` times) and optional class images.

    Item i pairs instance image i % n_instance with class image i % n_class, as diffusers'
    dataset; the length is the larger count. With `buckets` each image is resized and cropped to
    the bucket nearest its aspect ratio, and batches only mix images of one bucket.
    """

    def __init__(self, instance_data_dir: str, instance_prompt: str, resolution: int, center_crop: bool = False,
                 repeats: int = 1, buckets: list[tuple[int, int]] | None = None, caption_column: str | None = None,
                 image_column: str = "image", class_data_dir: str | None = None, class_prompt: str | None = None,
                 num_class_images: int | None = None, rng: np.random.Generator | None = None, num_workers: int = 0,
                 source: DataSource | None = None):
        rng = rng if rng is not None else np.random.default_rng()
        if buckets is not None and class_data_dir is not None:
            raise DataError("--aspect_ratio_buckets cannot be combined with --with_prior_preservation: instance and "
                            "class images of one batch must share a shape")
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt
        self.resolution, self.center_crop = resolution, center_crop
        self.buckets = buckets or [(resolution, resolution)]
        # `source`: rows read already (data_source.read_data_source; --dataset_name); instance_data_dir names them
        paths, captions = ((source.images, source.captions) if source is not None
                           else read_folder_captions(instance_data_dir, caption_column, image_column))
        if not paths:
            raise DataError(f"instance data folder {instance_data_dir} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.custom_instance_prompts = any(c for c in captions)
        self.images = self._load(paths, rng, num_workers)  # one (H, W, 3) uint8 crop per file
        self.image_paths = [str(p) for p in paths]  # names only: a dataset's in-memory files are dropped once decoded
        self.item_image = [j for j in range(len(paths)) for _ in range(repeats)]  # item -> image, as diffusers repeats
        self.captions = [captions[j] if captions[j] else instance_prompt for j in self.item_image]
        self.class_images: list[np.ndarray] = []
        if class_data_dir is not None:
            class_paths = list_images(class_data_dir)
            if num_class_images is not None:
                class_paths = class_paths[:num_class_images]
            if not class_paths:
                raise DataError(f"class data folder {class_data_dir} has no images")
            self.class_images = self._load(class_paths, rng, num_workers)
        self.length = max(len(self.item_image), len(self.class_images))

    def _load(self, paths: list[str], rng: np.random.Generator, num_workers: int) -> list[np.ndarray]:
        # Crops are drawn in file order from `rng` whatever the thread count, so the data is reproducible.
        def decode(path):
            return load_image(path)

        if num_workers > 0:
            with ThreadPoolExecutor(num_workers) as pool:
                decoded = list(pool.map(decode, paths))
        else:
            decoded = [decode(p) for p in paths]
        out, tiny = [], []
        for path, image in zip(paths, decoded):
            h, w = self.buckets[nearest_bucket(image.height, image.width, self.buckets)]
            if image.height * 2 < h or image.width * 2 < w:
                tiny.append(f"{path} ({image.width}x{image.height})")
            out.append(resize_and_crop(image, h, w, self.center_crop, rng))
        if tiny:  # scaled up this far they train blur
            logger.warning("%d image(s) are smaller than half the training size %s and are scaled up: %s%s",
                           len(tiny), "x".join(map(str, self.buckets[0][::-1])) if len(self.buckets) == 1
                           else "(their bucket)", ", ".join(tiny[:3]), " ..." if len(tiny) > 3 else "")
        return out

    def __len__(self) -> int:
        return self.length

    @property
    def num_instance_images(self) -> int:
        """Instance items, repeats included."""
        return len(self.item_image)

    def image_id(self, index: int) -> int:
        """The image file behind item `index` (items repeat images)."""
        return self.item_image[index % len(self.item_image)]

    def shape_of(self, index: int) -> tuple[int, int]:
        return self.images[self.image_id(index)].shape[:2]

    def instance(self, index: int, flip: bool = False) -> np.ndarray:
        """(3, H, W) float32 pixels in [-1, 1] of item `index`."""
        return to_pixels(self.images[self.image_id(index)], flip)

    def instance_by_id(self, image_id: int, flip: bool = False) -> np.ndarray:
        return to_pixels(self.images[image_id], flip)

    def caption(self, index: int) -> str:
        return self.captions[index % len(self.captions)]

    def class_image(self, index: int, flip: bool = False) -> np.ndarray:
        return to_pixels(self.class_images[index % len(self.class_images)], flip)

    def epoch_batches(self, batch_size: int, rng: np.random.Generator, num_replicas: int = 1) -> list[list[int]]:
        """One shuffled epoch as global batches of item indices, each `batch_size * num_replicas` long.

        One process keeps diffusers' order (a permutation cut into batches, the last one possibly
        shorter). Several processes need equal shares, so a short last batch is filled up from the
        start of the epoch's order, as accelerate's even_batches does. With buckets, batches are
        cut within each bucket and then shuffled.
        """
        global_size = batch_size * num_replicas
        order = rng.permutation(self.length)
        groups: dict[tuple[int, int], list[int]] = {}
        for index in order:
            groups.setdefault(self.shape_of(int(index)), []).append(int(index))
        batches = []
        for members in groups.values():
            for start in range(0, len(members), global_size):
                batch = members[start:start + global_size]
                if len(batch) < global_size and num_replicas > 1:
                    batch += [members[i % len(members)] for i in range(global_size - len(batch))]
                batches.append(batch)
        if len(groups) > 1:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def draw_step(self, size: int, rng: np.random.Generator, random_flip: bool, caption_dropout: float) -> StepDraw:
        """Per-sample flips and caption drops for a global batch of `size`, from the data generator."""
        flips = rng.random(size) < 0.5 if random_flip else np.zeros(size, bool)
        drops = rng.random(size) < caption_dropout if caption_dropout > 0 else np.zeros(size, bool)
        return StepDraw(flips=flips, drop_captions=drops)
