"""A tiny diffusers-format FLUX folder (transformer, VAE, scheduler, text encoders and tokenizers), images and
prompt embeddings for training tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import mindspore as ms
import numpy as np

from mindflux import FluxTransformer2DModel
from mindflux.safetensors_io import save_file
from tests.conftest import FIXTURES

# 16 VAE latent channels packed 2x2 -> 64 transformer channels; the tiny VAE downsamples 2x. The text
# sizes are the tiny text-encoder fixtures': T5 d_model 32, CLIP hidden size 16.
TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                          num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                          guidance_embeds=True, axes_dims_rope=[4, 6, 6])
POOLED_DIM = TRANSFORMER_CONFIG["pooled_projection_dim"]
TEXT_LEN = 7


def make_model_folder(root: Path, seed: int = 0) -> Path:
    """root/{transformer,vae,scheduler,text_encoder(_2),tokenizer(_2)} and model_index.json: a randomly
    initialised transformer and the VAE, scheduler, text-encoder and tokenizer fixtures."""
    ms.set_seed(seed)
    FluxTransformer2DModel(**TRANSFORMER_CONFIG).save_pretrained(str(root / "transformer"))
    for name, source in (("vae", FIXTURES / "vae" / "tiny"), ("scheduler", FIXTURES / "scheduler" / "dev"),
                         ("text_encoder", FIXTURES / "text_encoders" / "clip"),
                         ("text_encoder_2", FIXTURES / "text_encoders" / "t5"),
                         ("tokenizer", FIXTURES / "tokenizers" / "clip"),
                         ("tokenizer_2", FIXTURES / "tokenizers" / "t5")):
        shutil.copytree(source, root / name)
    # the pipeline fixture's model_index.json: the same component classes, so FluxPipeline loads the folder
    shutil.copy(FIXTURES / "pipeline" / "tiny_flux" / "model_index.json", root / "model_index.json")
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
              "pooled_prompt_embeds": rng.standard_normal(POOLED_DIM).astype(np.float32)}
    if with_class:
        arrays.update({"class_prompt_embeds": rng.standard_normal((TEXT_LEN, 32)).astype(np.float32),
                       "class_pooled_prompt_embeds": rng.standard_normal(POOLED_DIM).astype(np.float32)})
    save_file({k: (v, "F32") for k, v in arrays.items()}, str(path))
    return path
