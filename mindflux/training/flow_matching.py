"""Flow-matching training targets for FLUX (rectified flow), with diffusers' DreamBooth semantics.

One training step, for normalized VAE latents z (B, C, h, w):

    on the host, from the run's numpy Generator (same numbers on every device and in both modes):
        noise ~ N(0, 1), shaped like z
        u ~ density(weighting_scheme)                      compute_density_for_timestep_sampling
        index = floor(u * num_train_timesteps)
        sigma, timestep = the scheduler's training schedule at index
        (optionally) sigma shifted by the image's token count  FlowMatchingSampler(dynamic_shift=True)
    in the compiled step:
        noisy = (1 - sigma) z + sigma noise,  target = noise - z
        loss = mean over the batch of  weighting(sigma) * mean((prediction - target)^2)

The weighting schemes either change how sigma is sampled (logit_normal, mode) or weight the loss
(sigma_sqrt, cosmap); "none" is uniform sampling with unit weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..latents import calculate_shift, standard_normal

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def _check_scheme(weighting_scheme: str) -> None:
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}; got {weighting_scheme!r}")


def density_from_draws(weighting_scheme: str, draws: np.ndarray, logit_mean: float = 0.0, logit_std: float = 1.0,
                       mode_scale: float = 1.29) -> np.ndarray:
    """u in [0, 1] from raw float32 draws: standard normals for "logit_normal", uniforms in [0, 1) otherwise.

    logit_normal: sigmoid(logit_mean + logit_std * draw); mode: 1 - x - mode_scale * (cos^2(pi x / 2) - 1 + x);
    the rest: the uniform draw itself. float32 throughout, as diffusers computes it with torch.
    """
    _check_scheme(weighting_scheme)
    x = np.asarray(draws, np.float32)
    if weighting_scheme == "logit_normal":
        x = np.float32(logit_mean) + np.float32(logit_std) * x
        return (np.float32(1) / (np.float32(1) + np.exp(-x))).astype(np.float32)
    if weighting_scheme == "mode":
        return (1 - x - np.float32(mode_scale) * (np.cos(np.float32(math.pi) * x / 2) ** 2 - 1 + x)).astype(np.float32)
    return x


def compute_density_for_timestep_sampling(weighting_scheme: str, batch_size: int, logit_mean: float = 0.0,
                                          logit_std: float = 1.0, mode_scale: float = 1.29,
                                          generator: np.random.Generator | None = None) -> np.ndarray:
    """(batch_size,) float32 u, drawn on the host with `generator`, as diffusers' function of the same name."""
    draws = draw_density(weighting_scheme, batch_size, generator)
    return density_from_draws(weighting_scheme, draws, logit_mean, logit_std, mode_scale)


def draw_density(weighting_scheme: str, batch_size: int, generator: np.random.Generator | None = None) -> np.ndarray:
    """The raw float32 draws behind u: standard normals for "logit_normal", uniforms in [0, 1) otherwise."""
    _check_scheme(weighting_scheme)
    rng = generator if generator is not None else np.random.default_rng()
    if weighting_scheme == "logit_normal":
        return rng.standard_normal(batch_size, dtype=np.float32)
    return rng.random(batch_size, dtype=np.float32)


def compute_loss_weighting_for_sd3(weighting_scheme: str, sigmas):
    """Per-sample loss weights from sigmas (numpy array or Tensor, also inside a compiled graph):
    sigma_sqrt 1 / sigma^2, cosmap 2 / (pi (1 - 2 sigma + 2 sigma^2)), otherwise ones."""
    if weighting_scheme == "sigma_sqrt":
        return sigmas**-2.0
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return ops.ones_like(sigmas) if isinstance(sigmas, Tensor) else np.ones_like(sigmas)


def flow_matching_loss(model_pred: Tensor, target: Tensor, weighting: Tensor, with_prior_preservation: bool = False,
                       prior_loss_weight: float = 1.0) -> Tensor:
    """Weighted MSE in fp32: each sample's mean of weighting * (pred - target)^2, averaged over the batch.

    With prior preservation the batch is [instance samples; class samples] (the collate order) and
    the loss is instance mean + prior_loss_weight * class mean. Each sample is weighted by its own
    sigma. (diffusers' script multiplies the full-batch weighting into each half: the same number
    for one image per half with unit weights, a broadcast error for more.)
    """
    batch = model_pred.shape[0]
    error = ops.square(model_pred.astype(ms.float32) - target.astype(ms.float32))
    weights = weighting.astype(ms.float32).reshape((batch,) + (1,) * (error.ndim - 1))
    per_sample = (weights * error).reshape(batch, -1).mean(1)
    if not with_prior_preservation:
        return per_sample.mean()
    half = batch // 2
    return per_sample[:half].mean() + prior_loss_weight * per_sample[half:].mean()


@dataclass
class FlowMatchingDraw:
    """One step's host randomness: noise like the latents, and per-sample sigmas and timesteps (float32)."""

    noise: np.ndarray
    sigmas: np.ndarray
    timesteps: np.ndarray  # the transformer's `timestep` input: schedule timestep / 1000, as diffusers passes it


class FlowMatchingSampler:
    """Draws noise and sigmas for training steps from one numpy Generator (seeded by --seed).

    The training schedule is the scheduler's own at construction (diffusers keeps a copy of the
    scheduler for it): FLUX.1's config has use_dynamic_shifting, so its training sigmas are
    1/N ... 1 unshifted. `dynamic_shift=True` applies FLUX's resolution-dependent shift to the
    sampled sigmas (mu from the image token count, the scheduler's base/max shift and sequence
    lengths), as BFL trained FLUX.1; diffusers' script has no such option, so it is off by default.
    """

    def __init__(self, scheduler, weighting_scheme: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, dynamic_shift: bool = False,
                 generator: np.random.Generator | int | None = None):
        _check_scheme(weighting_scheme)
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.schedule_sigmas = scheduler.sigmas.asnumpy().astype(np.float32)[: self.num_train_timesteps]
        self.schedule_timesteps = scheduler.timesteps.asnumpy().astype(np.float32)[: self.num_train_timesteps]
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.dynamic_shift = dynamic_shift
        if generator is None or isinstance(generator, (int, np.integer)):
            generator = np.random.default_rng(generator)
        self.generator = generator

    def density_from_draws(self, draws: np.ndarray) -> np.ndarray:
        """u from raw draws (see draw_density) with this sampler's scheme and parameters."""
        return density_from_draws(self.weighting_scheme, draws, self.logit_mean, self.logit_std, self.mode_scale)

    def sigmas_from_density(self, u: np.ndarray, image_seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(sigmas, transformer timesteps) for densities u, both (B,) float32."""
        # u can reach 1.0 under "mode" (where diffusers' indexing would fail): clip to the last entry.
        indices = np.clip((np.asarray(u, np.float32) * np.float32(self.num_train_timesteps)).astype(np.int64), 0,
                          self.num_train_timesteps - 1)
        sigmas = self.schedule_sigmas[indices]
        timesteps = self.schedule_timesteps[indices]
        if self.dynamic_shift:
            if image_seq_len is None:
                raise ValueError("dynamic_shift needs the image's token count (image_seq_len)")
            sigmas = self.shift_sigmas(sigmas, image_seq_len)
            timesteps = sigmas * np.float32(self.num_train_timesteps)
        return sigmas, (timesteps / np.float32(1000)).astype(np.float32)

    def shift_sigmas(self, sigmas: np.ndarray, image_seq_len: int) -> np.ndarray:
        """FLUX's time shift exp(mu) / (exp(mu) + 1/sigma - 1), mu linear in the image token count."""
        cfg = self.scheduler.config
        mu = calculate_shift(image_seq_len, cfg.base_image_seq_len or 256, cfg.max_image_seq_len or 4096,
                             cfg.base_shift if cfg.base_shift is not None else 0.5,
                             cfg.max_shift if cfg.max_shift is not None else 1.15)
        shifted = self.scheduler.time_shift(mu, 1.0, np.asarray(sigmas, np.float64))
        return np.asarray(shifted, np.float32)

    def sample(self, shape: tuple[int, ...]) -> FlowMatchingDraw:
        """Noise shaped like the latents (B, C, h, w), then one sigma per sample."""
        noise = standard_normal(shape, self.generator)
        u = compute_density_for_timestep_sampling(self.weighting_scheme, shape[0], self.logit_mean, self.logit_std,
                                                  self.mode_scale, self.generator)
        image_seq_len = (shape[2] // 2) * (shape[3] // 2)
        sigmas, timesteps = self.sigmas_from_density(u, image_seq_len)
        return FlowMatchingDraw(noise=noise, sigmas=sigmas, timesteps=timesteps)

    # The generator's state is all the sampler's state: saving it makes a resumed run draw the same numbers.
    def state_dict(self) -> dict[str, Any]:
        return {"bit_generator": self.generator.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.bit_generator.state = state["bit_generator"]
