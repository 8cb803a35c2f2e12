"""Latent-space helpers shared by inference and training, so both do exactly the same thing.

FLUX's transformer sees a latent image as a sequence: the VAE's (B, 16, H/8, W/8) latents are cut
into 2x2 patches, each flattened to 64 channels, giving (B, H/16 * W/16, 64) tokens, with
position ids (row, column) per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from mindspore import Tensor


def latent_size(height: int, width: int, vae_scale_factor: int = 8) -> tuple[int, int]:
    """(h, w) of the unpacked latents for an image, rounded down to whole 2x2 patches (as diffusers)."""
    return 2 * (int(height) // (vae_scale_factor * 2)), 2 * (int(width) // (vae_scale_factor * 2))


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch becomes one token, channels-major."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: Tensor, height: int, width: int, vae_scale_factor: int = 8) -> Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w) for an image of height x width pixels."""
    b, _, channels = latents.shape
    h, w = latent_size(height, width, vae_scale_factor)
    x = latents.reshape(b, h // 2, w // 2, channels // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, h, w)


def prepare_latent_image_ids(grid_height: int, grid_width: int) -> Tensor:
    """(grid_height * grid_width, 3) float32 ids [0, row, column] of the packed tokens, row-major."""
    ids = np.zeros((grid_height, grid_width, 3), np.float32)
    ids[..., 1] = np.arange(grid_height, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(grid_width, dtype=np.float32)[None, :]
    return Tensor(ids.reshape(grid_height * grid_width, 3))


def prepare_text_ids(text_len: int) -> Tensor:
    """(text_len, 3) zeros: text tokens carry no position in FLUX's rotary embedding."""
    return Tensor(np.zeros((text_len, 3), np.float32))


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu of the resolution-dependent time shift: linear in the number of image tokens, as diffusers."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def normalize_latents(latents: Tensor, scaling_factor: float, shift_factor: float) -> Tensor:
    """VAE latents -> the transformer's latent space: (z - shift) * scale."""
    return (latents - shift_factor) * scaling_factor


def denormalize_latents(latents: Tensor, scaling_factor: float, shift_factor: float) -> Tensor:
    """The transformer's latent space -> VAE latents for decoding: z / scale + shift."""
    return latents / scaling_factor + shift_factor


def standard_normal(shape: Sequence[int], generator: np.random.Generator | int | None = None) -> np.ndarray:
    """float32 N(0, 1) noise drawn on the host.

    `generator` is a numpy Generator (its state advances, so a training loop owns one and gets a
    reproducible stream), an int seed (a fresh Generator: same seed, same noise), or None (numpy's
    global state, seedable with np.random.seed, as torch's global RNG is with manual_seed).
    Host noise is the same on CPU, GPU and Ascend and in both execution modes; MindSpore's own
    Generator-driven ops (mint.randn / mint.normal) have no CPU kernels. The copy to the device is
    small: a 1024^2 image has 16 x 128 x 128 latents, 1 MiB.
    """
    if generator is None:
        return np.random.standard_normal(tuple(shape)).astype(np.float32)
    if not isinstance(generator, np.random.Generator):
        if isinstance(generator, (bool, float)) or not isinstance(generator, (int, np.integer)):
            raise TypeError(f"generator must be a numpy.random.Generator, an int seed or None; got {type(generator)}")
        generator = np.random.default_rng(int(generator))
    return generator.standard_normal(tuple(shape), dtype=np.float32)
