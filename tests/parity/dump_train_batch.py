"""Reference inputs of one training batch, formed as diffusers' train_dreambooth_lora_flux.py forms them.

The glue between the data and the train step: pixels -> VAE posterior sample (diffusers'
DiagonalGaussianDistribution.sample with its normal draws replaced by recorded ones) -> (z - shift)
* scale; u from compute_density_for_timestep_sampling (its torch.rand / torch.normal replaced by
recorded draws) -> indices -> timesteps -> sigmas (the script's get_sigmas); the noisy input,
FluxPipeline._pack_latents, _prepare_latent_image_ids, the guidance vector, timestep / 1000, the
prompt rows ([instance; class] with prior preservation), and the script's loss lines applied to a
recorded stand-in prediction (compute_loss_weighting_for_sd3, the prior split and weight).

The images, the VAE (tests/fixtures/vae/tiny, shift_factor 0.1159) and every draw are written
here, so the mindflux batch builder can be fed the same numbers (tests/test_train_batch.py).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
VAE = ROOT / "tests" / "fixtures" / "vae" / "tiny"
SCHEDULER = ROOT / "tests" / "fixtures" / "scheduler" / "dev"
RESOLUTION, TEXT_LEN, JOINT_DIM, POOLED_DIM = 16, 7, 32, 16
GUIDANCE_SCALE = 2.5  # not the default 3.5: a run that ignores --guidance_scale shows
DENSITY = dict(logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
PROMPTS = {"instance": "a photo of sks thing", "class": "a photo of a thing", "empty": ""}
# name -> (weighting_scheme, instance images per batch, prior preservation, prior_loss_weight, flips, caption drops)
CASES = {
    "none": ("none", 2, False, 1.0, [True, False], [False, True]),
    "logit_normal": ("logit_normal", 2, False, 1.0, [False, True], [False, False]),
    "mode": ("mode", 2, False, 1.0, [True, True], [False, False]),
    "cosmap": ("cosmap", 2, False, 1.0, [False, False], [False, False]),
    "sigma_sqrt": ("sigma_sqrt", 2, False, 1.0, [False, True], [False, False]),
    "prior": ("none", 1, True, 0.5, [True], [False]),
}


def write_images(folder: Path, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(count):
        pixels = rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        images.append(pixels)
    return images


def to_pixel_values(image: np.ndarray, flip: bool):
    """transforms.ToTensor + Normalize([0.5], [0.5]) and TF.hflip, as the script's dataset."""
    import torch

    x = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    return torch.flip(x, dims=[-1]) if flip else x


@contextmanager
def fed_draws(vae_eps=None, density=None):
    """diffusers' own functions, with the normal / uniform draws they would make replaced by recorded ones."""
    import torch

    patches = []
    if vae_eps is not None:
        patches.append(mock.patch("diffusers.models.autoencoders.vae.randn_tensor",
                                  lambda shape, **kw: vae_eps.reshape(shape)))
    if density is not None:
        patches.append(mock.patch.object(torch, "rand", lambda size, **kw: density.reshape(size)))
        patches.append(mock.patch.object(torch, "normal", lambda mean, std, size, **kw: mean + std * density))
    for p in patches:
        p.start()
    try:
        yield
    finally:
        for p in patches:
            p.stop()


def model_input_of(vae, pixel_values, vae_eps, mode: bool = False):
    """latent_dist.sample() (or .mode()) -> (z - shift_factor) * scaling_factor, as the script."""
    with fed_draws(vae_eps=vae_eps):
        dist = vae.encode(pixel_values).latent_dist
        z = dist.mode() if mode else dist.sample()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def timesteps_and_sigmas(scheduler, scheme: str, draws):
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    with fed_draws(density=draws):
        u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=len(draws), **DENSITY)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    return timesteps, scheduler.sigmas[step_indices].flatten().to(torch.float32)


def _case(arrays, vae, scheduler, name, spec, instance, klass, embeds, rng) -> None:
    import torch
    from diffusers import FluxPipeline

    from .dump_train_step import script_loss

    scheme, n, prior, prior_loss_weight, flips, drops = spec
    items = list(range(n))
    pixels = [to_pixel_values(instance[i], f) for i, f in zip(items, flips)]
    prompts = [PROMPTS["empty"] if d else PROMPTS["instance"] for d in drops]  # caption dropout: mindflux's own
    if prior:
        pixels += [to_pixel_values(klass[i % len(klass)], False) for i in items]
        prompts += [PROMPTS["class"]] * n
    pixel_values = torch.stack(pixels)
    rows = pixel_values.shape[0]
    latent_shape = (rows, vae.config.latent_channels, RESOLUTION // 2, RESOLUTION // 2)
    draws = {"vae_eps": torch.from_numpy(rng.standard_normal(latent_shape).astype(np.float32)),
             "noise": torch.from_numpy(rng.standard_normal(latent_shape).astype(np.float32)),
             "density": torch.from_numpy((rng.standard_normal(rows) if scheme == "logit_normal"
                                          else rng.uniform(0.02, 0.98, rows)).astype(np.float32))}
    with torch.no_grad():
        model_input = model_input_of(vae, pixel_values, draws["vae_eps"])
        posterior = vae.encode(pixel_values).latent_dist
    timesteps, sigmas = timesteps_and_sigmas(scheduler, scheme, draws["density"])
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * model_input + s * draws["noise"]
    b, c, h, w = model_input.shape
    packed = FluxPipeline._pack_latents(noisy, batch_size=b, num_channels_latents=c, height=h, width=w)
    stand_in = torch.from_numpy(rng.standard_normal(tuple(packed.shape)).astype(np.float32))
    loss = script_loss(stand_in, model_input, draws["noise"], sigmas, scheme, prior, prior_loss_weight)
    key = {v: k for k, v in PROMPTS.items()}
    expected = {
        "pixel_values": pixel_values, "latent_mean": posterior.mean, "latent_std": posterior.std,
        "model_input": model_input, "packed_noisy_model_input": packed, "sigmas": sigmas,
        "timestep": timesteps / 1000, "guidance": torch.tensor([GUIDANCE_SCALE]).expand(b),
        "img_ids": FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
        "prompt_embeds": torch.stack([embeds[f"{key[p]}.t5"] for p in prompts]),
        "pooled_prompt_embeds": torch.stack([embeds[f"{key[p]}.pooled"] for p in prompts]),
        "stand_in_prediction": stand_in, "loss": loss,
        "flips": torch.tensor(flips), "drops": torch.tensor(drops),
    }
    arrays.update({f"{name}.draw.{k}": v for k, v in draws.items()})
    arrays.update({f"{name}.{k}": v for k, v in expected.items()})


def make_reference(out: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from .torch_common import save_arrays, seed

    seed(0)
    rng = np.random.default_rng(2024)
    instance = write_images(out / "instance", 2, rng)
    klass = write_images(out / "class", 1, rng)
    embeds = {}
    for name in PROMPTS:
        embeds[f"{name}.t5"] = torch.from_numpy(rng.standard_normal((TEXT_LEN, JOINT_DIM)).astype(np.float32))
        embeds[f"{name}.pooled"] = torch.from_numpy(rng.standard_normal(POOLED_DIM).astype(np.float32))
    # the script's precomputed-embeddings file (instance and class prompts) and the empty prompt's
    save_arrays(out / "embeds.safetensors", {
        "prompt_embeds": embeds["instance.t5"], "pooled_prompt_embeds": embeds["instance.pooled"],
        "class_prompt_embeds": embeds["class.t5"], "class_pooled_prompt_embeds": embeds["class.pooled"],
        "empty_prompt_embeds": embeds["empty.t5"], "empty_pooled_prompt_embeds": embeds["empty.pooled"]})
    vae = AutoencoderKL.from_pretrained(str(VAE))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(SCHEDULER))
    arrays: dict = {}
    for name, spec in CASES.items():
        _case(arrays, vae, scheduler, name, spec, instance, klass, embeds, rng)
    save_arrays(out / "cases.safetensors", arrays)
    config = {"resolution": RESOLUTION, "guidance_scale": GUIDANCE_SCALE, "density": DENSITY, "prompts": PROMPTS,
              "cases": {k: dict(zip(("weighting_scheme", "batch", "with_prior_preservation", "prior_loss_weight",
                                     "flips", "drops"), v)) for k, v in CASES.items()}}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
