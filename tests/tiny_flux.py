"""A tiny diffusers-format FLUX folder (transformer, VAE, scheduler), images and prompt embeddings for tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import mindspore as ms
import numpy as np

from mindflux import FluxTransformer2DModel
from mindflux.safetensors_io import save_file
from tests.conftest import FIXTURES

# 16 VAE latent channels packed 2x2 -> 64 transformer channels; the tiny VAE downsamples 2x.
TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                          num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                          guidance_embeds=True, axes_dims_rope=[4, 6, 6])
TEXT_LEN = 7


def make_model_folder(root: Path, seed: int = 0) -> Path:
    """root/{transformer,vae,scheduler}: a randomly initialised transformer, the VAE and scheduler fixtures."""
    ms.set_seed(seed)
    FluxTransformer2DModel(**TRANSFORMER_CONFIG).save_pretrained(str(root / "transformer"))
    shutil.copytree(FIXTURES / "vae" / "tiny", root / "vae")
    shutil.copytree(FIXTURES / "scheduler" / "dev", root / "scheduler")
    return root


def make_images(folder: Path, count: int = 4, size: int = 40, seed: int = 0) -> Path:
    """`count` RGB images: smooth colour gradients with a bright square, each different."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        base = rng.uniform(0, 1, (3, 1, 1)) * yy + rng.uniform(0, 1, (3, 1, 1)) * xx
        top, left = rng.integers(0, size // 2, 2)
        base[:, top:top + size // 3, left:left + size // 3] = 1.0
        pixels = (np.clip(base.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


def make_prompt_embeds(path: Path, seed: int = 0, with_class: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {"prompt_embeds": rng.standard_normal((TEXT_LEN, 32)).astype(np.float32),
              "pooled_prompt_embeds": rng.standard_normal(24).astype(np.float32)}
    if with_class:
        arrays.update({"class_prompt_embeds": rng.standard_normal((TEXT_LEN, 32)).astype(np.float32),
                       "class_pooled_prompt_embeds": rng.standard_normal(24).astype(np.float32)})
    save_file({k: (v, "F32") for k, v in arrays.items()}, str(path))
    return path
