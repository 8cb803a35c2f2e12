"""Where a training run's rows come from: a local folder, or a dataset the `datasets` library reads.

    --instance_data_dir F   F's images with .txt captions, or F/metadata.jsonl   (dataset.read_folder_captions)
    --dataset_name F        F/metadata.jsonl: the same local reader; no extra package
    --dataset_name X        anything else goes to `datasets` (pip install datasets), as in diffusers'
                            scripts: a Hub id (its cache under HF_HUB_OFFLINE=1), a folder written by
                            Dataset.save_to_disk, a parquet / csv / imagefolder folder

A row is (image, caption) for DreamBooth and (image, reference, caption) for Kontext. Rows are read
and checked (columns, files) when the trainer starts, before any model is loaded; the pixels are
decoded later by the dataset classes, which open each image with dataset.load_image: a path, or an
EncodedImage (an image file held in memory: a `datasets` Image cell).
"""

from __future__ import annotations

import importlib.util
import io
import os
from dataclasses import dataclass
from typing import Union

from .dataset import CAPTION_KEYS, METADATA_FILE, DataError, metadata_records, read_folder_captions

SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")  # what Dataset(Dict).save_to_disk writes at the top


class EncodedImage(io.BytesIO):
    """An image file's bytes (a `datasets` Image cell): PIL opens it like a file; messages name its row."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


ImageRef = Union[str, EncodedImage]


@dataclass
class DataSource:
    """The rows of a training data set, checked; `name` is what messages call it (the folder or dataset)."""

    name: str
    images: list[ImageRef]
    captions: list[str | None]
    references: list[ImageRef] | None = None  # Kontext: the image each target was edited from


def datasets_available() -> bool:
    """Whether the `datasets` library can be imported (without importing it: that takes seconds)."""
    try:
        return importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):  # ValueError: a stubbed-out sys.modules entry
        return False


def is_metadata_folder(name: str) -> bool:
    return os.path.isfile(os.path.join(name, METADATA_FILE))


def check_dataset_name(name: str, config_name: str | None = None) -> str | None:
    """The argument-time problem with --dataset_name / --dataset_config_name, or None (nothing is read here)."""
    if is_metadata_folder(name):
        if config_name is not None:
            return (f"--dataset_config_name {config_name}: {name} is a local {METADATA_FILE} folder, which has no "
                    "configs")
        return None
    if not datasets_available():
        what = "has no " + METADATA_FILE if os.path.isdir(name) else "is not a local folder"
        return (f"--dataset_name {name} {what}: reading it needs the datasets library (pip install datasets), or "
                f"give a local folder with {METADATA_FILE} (one JSON object a line, image paths relative to the "
                "folder)")
    return None


def read_data_source(instance_data_dir: str | None, dataset_name: str | None, image_column: str = "image",
                     caption_column: str | None = None, cond_image_column: str | None = None,
                     dataset_config_name: str | None = None, cache_dir: str | None = None,
                     instance_prompt: str | None = None) -> DataSource:
    """The run's rows: --dataset_name through the local reader or `datasets` (see the module doc), else
    --instance_data_dir. `cond_image_column` (Kontext) asks for each row's reference image too. A row
    without a caption needs `instance_prompt` to fall back on."""
    if dataset_name is not None and not is_metadata_folder(dataset_name):
        source = read_library_dataset(dataset_name, image_column, caption_column, cond_image_column,
                                      dataset_config_name, cache_dir)
    else:
        source = read_folder_source(dataset_name if dataset_name is not None else instance_data_dir, image_column,
                                    caption_column, cond_image_column)
    if instance_prompt is None and not all(source.captions):
        missing = source.images[[bool(c) for c in source.captions].index(False)]
        raise DataError(f"{missing} has no caption and there is no --instance_prompt to fall back on")
    return source


def read_folder_source(folder: str, image_column: str = "image", caption_column: str | None = None,
                       cond_image_column: str | None = None) -> DataSource:
    """Rows of a local folder: its images with .txt captions, or its metadata.jsonl (needed for pairs)."""
    if cond_image_column is not None and not is_metadata_folder(folder):
        if not os.path.isdir(folder):
            raise DataError(f"instance data folder {folder} does not exist")
        raise DataError(f"{folder} has no {METADATA_FILE}: Kontext training reads image pairs from it (one JSON object "
                        "a line with the --image_column and --cond_image_column files), or from --dataset_name")
    images, captions = read_folder_captions(folder, caption_column, image_column)
    references = read_reference_paths(folder, cond_image_column) if cond_image_column is not None else None
    return DataSource(folder, images, captions, references)


def read_reference_paths(folder: str, cond_image_column: str) -> list[str]:
    """The reference image of every metadata.jsonl line."""
    metadata = os.path.join(folder, METADATA_FILE)
    paths = []
    for number, record in metadata_records(metadata):
        if cond_image_column not in record:
            raise DataError(f"--cond_image_column '{cond_image_column}' not found in {metadata} line {number}; "
                            f"it has {', '.join(record)}")
        path = os.path.join(folder, str(record[cond_image_column]))
        if not os.path.isfile(path):
            raise DataError(f"{metadata} line {number}: reference image {path} does not exist")
        paths.append(path)
    return paths


def is_saved_dataset(name: str) -> bool:
    """A folder written by Dataset.save_to_disk / DatasetDict.save_to_disk (load_dataset refuses those)."""
    return os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f)) for f in SAVED_DATASET_FILES)


def load_library_dataset(name: str, config_name: str | None = None, cache_dir: str | None = None):
    """The "train" split of `name` as `datasets` loads it; DataError naming --dataset_name when it cannot."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"--dataset_name {name}: the datasets library cannot be imported ({err}); pip install "
                        f"datasets, or give a local folder with {METADATA_FILE}") from None
    try:
        if is_saved_dataset(name):
            if config_name is not None:
                raise DataError(f"--dataset_config_name {config_name}: {name} was written by save_to_disk and has "
                                "no configs")
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except DataError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:  # not found, offline, bad config
        raise DataError(f"--dataset_name {name}: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"--dataset_name {name} has no 'train' split; it has {', '.join(loaded)}")
        loaded = loaded["train"]
    return loaded


def read_library_dataset(name: str, image_column: str = "image", caption_column: str | None = None,
                         cond_image_column: str | None = None, config_name: str | None = None,
                         cache_dir: str | None = None) -> DataSource:
    """Rows of a `datasets` dataset; image columns hold images (an Image feature) or paths (strings, relative
    to `name` when it is a folder). A missing column is named with the columns there are, as in diffusers."""
    from datasets import Image

    table = load_library_dataset(name, config_name, cache_dir)
    columns = list(table.column_names)
    for option, column in (("--image_column", image_column), ("--cond_image_column", cond_image_column),
                           ("--caption_column", caption_column)):
        if column is not None and column not in columns:
            raise DataError(f"{option} '{column}' not found in --dataset_name {name}; its columns are "
                            f"{', '.join(columns)}")
    if not len(table):
        raise DataError(f"--dataset_name {name} has no rows")
    caption_key = caption_column or next((k for k in CAPTION_KEYS if k in columns), None)  # as metadata.jsonl

    def images_of(column: str, option: str) -> list[ImageRef]:
        if isinstance(table.features[column], Image):  # the encoded file, decoded later like a file on disk
            cells = table.cast_column(column, Image(decode=False))[column]
        else:
            cells = table[column]
        return [image_ref(cell, f"--dataset_name {name} row {row} column '{column}'", option, name)
                for row, cell in enumerate(cells)]

    images = images_of(image_column, "--image_column")
    references = images_of(cond_image_column, "--cond_image_column") if cond_image_column is not None else None
    captions = ([None if c is None else str(c) for c in table[caption_key]] if caption_key is not None
                else [None] * len(images))
    return DataSource(name, images, captions, references)


def image_ref(cell, where: str, option: str, name: str) -> ImageRef:
    """A path (str) or EncodedImage for one cell of an image column."""
    if isinstance(cell, dict) and cell.get("bytes") is not None:
        return EncodedImage(cell["bytes"], where)
    path = cell.get("path") if isinstance(cell, dict) else cell
    if not isinstance(path, str) or not path:
        raise DataError(f"{where} holds {type(cell).__name__} {cell!r:.60}, not an image or a path ({option})")
    if os.path.isdir(name) and not os.path.isabs(path):
        path = os.path.join(name, path)
    if not os.path.isfile(path):
        raise DataError(f"{where}: image {path} does not exist")
    return path
