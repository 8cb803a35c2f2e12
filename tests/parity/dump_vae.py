"""Reference outputs of tiny diffusers AutoencoderKLs (issue 3: VAE), and FLUX's VAE layout.

Tiny FLUX-shaped VAE: 16 latent channels, no quant convs, mid-block attention, FLUX's scaling and
shift, two blocks (2x downsampling), on a non-square batch of two 32 x 48 images.
"""

from __future__ import annotations

import json
from pathlib import Path

FLUX_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
    act_fn="silu", norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    latents_mean=None, latents_std=None, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
    mid_block_add_attention=True,
)
TINY = dict(FLUX_CONFIG, block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4, sample_size=32)
# The SD-style default: quant convs present, 4 latent channels, no shift.
TINY_QUANT = dict(TINY, latent_channels=4, use_quant_conv=True, use_post_quant_conv=True, scaling_factor=0.18215,
                  shift_factor=None)
BATCH, HEIGHT, WIDTH = 2, 32, 48
# Small tiles, set the same way on both sides: 24 px / 12 latents, so the image is cut into 2 x 3
# overlapping tiles with partial (odd-sized) tiles at the bottom and right edges.
TILE_SAMPLE, TILE_LATENT = 24, 12


def perturb(model, generator) -> None:
    """Norm weights start at one and biases at zero: make them differ so a mis-mapped norm shows."""
    import torch

    from .torch_common import perturb_norm_weights

    perturb_norm_weights(model, generator)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def run_vae(model, image, latents) -> dict:
    import torch

    with torch.no_grad():
        posterior = model.encode(image).latent_dist
        return {"mean": posterior.mean, "logvar": posterior.logvar, "std": posterior.std, "var": posterior.var,
                "decoded": model.decode(latents).sample}


def make_reference(out: Path) -> None:
    import torch
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from .torch_common import save_arrays, seed

    arrays = {}
    generator = seed(300)
    model = AutoencoderKL(**TINY)
    perturb(model, generator)
    model.eval()
    model.save_pretrained(out / "tiny")
    image = torch.randn(BATCH, 3, HEIGHT, WIDTH, generator=generator)
    latents = torch.randn(BATCH, 16, HEIGHT // 2, WIDTH // 2, generator=generator)
    arrays.update({"input.image": image, "input.latents": latents})
    arrays.update({f"tiny.{k}": v for k, v in run_vae(model, image, latents).items()})

    # What FluxPipeline decodes: transformer-space latents mapped back with scaling and shift.
    cfg = model.config
    with torch.no_grad():
        arrays["tiny.pipeline_decoded"] = model.decode(latents / cfg.scaling_factor + cfg.shift_factor).sample

    model.tile_sample_min_size, model.tile_latent_min_size = TILE_SAMPLE, TILE_LATENT
    model.enable_tiling()
    arrays.update({f"tiny_tiled.{k}": v for k, v in run_vae(model, image, latents).items()})
    model.disable_tiling()

    # BF16 checkpoint: the reference is the bf16-rounded weights run in fp32.
    model.to(torch.bfloat16).save_pretrained(out / "tiny_bf16")
    model.to(torch.float32)
    arrays.update({f"tiny_bf16.{k}": v for k, v in run_vae(model, image, latents).items()})

    generator = seed(301)
    quant = AutoencoderKL(**TINY_QUANT)
    perturb(quant, generator)
    quant.eval()
    quant.save_pretrained(out / "tiny_quant")
    quant_latents = torch.randn(BATCH, 4, HEIGHT // 2, WIDTH // 2, generator=generator)
    arrays["input.quant_latents"] = quant_latents
    arrays.update({f"tiny_quant.{k}": v for k, v in run_vae(quant, image, quant_latents).items()})

    # The posterior on its own, with log-variances past both clamp limits.
    parameters = torch.randn(BATCH, 8, 3, 5, generator=generator) * 20
    other = DiagonalGaussianDistribution(torch.randn(BATCH, 8, 3, 5, generator=generator))
    point = torch.randn(BATCH, 4, 3, 5, generator=generator)
    dist = DiagonalGaussianDistribution(parameters)
    arrays.update({"dist.parameters": parameters, "dist.other_parameters": other.parameters, "dist.point": point,
                   "dist.mean": dist.mean, "dist.logvar": dist.logvar, "dist.std": dist.std, "dist.var": dist.var,
                   "dist.kl": dist.kl(), "dist.kl_other": dist.kl(other), "dist.nll": dist.nll(point)})
    save_arrays(out / "cases.safetensors", arrays)

    # FLUX.1's VAE layout without its weights: the config file and every parameter's name and shape.
    with torch.device("meta"):
        flux = AutoencoderKL(**FLUX_CONFIG)
    flux.save_config(out / "flux_vae")
    shapes = {name: list(p.shape) for name, p in flux.state_dict().items()}
    (out / "flux_vae_parameters.json").write_text(json.dumps(shapes, indent=1) + "\n")
