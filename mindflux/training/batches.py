"""From a global batch of item indices to the train step's inputs: the latent source and the batch builder.

`LatentSource` gives the VAE posterior (mean, std) of dataset images, encoded per step or, with
--cache_latents, once per distinct image and flip. `BatchBuilder` draws the step's randomness
(flips and caption drops from the data generator; VAE sample, noise and timestep density from
the step generator), keeps this process's rows (distributed.rank_rows), and returns

    [latents (B, C, h, w), noise, sigmas (B,), timesteps (B,), T5 embeddings, pooled (or CLIP ids),
     img_ids, txt_ids, guidance (B,) when the transformer has guidance_embeds]

with the latents as diffusers' script forms them: (sample - shift_factor) * scaling_factor. With
prior preservation the rows are [instance images; their class images], as diffusers' collate_fn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .distributed import rank_rows


class LatentSource:
    """VAE posterior moments of a dataset's images, cached with `cache=True` (keyed by image and flip, so a
    cached latent always belongs to the image and caption it is drawn with)."""

    def __init__(self, vae, dataset, random_flip: bool, cache: bool, show_progress: bool = True):
        self.vae, self.dataset = vae, dataset
        self.random_flip, self.show_progress = random_flip, show_progress
        self.cache: dict[tuple, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def encode_moments(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """VAE posterior (mean, std) of (B, 3, H, W) pixels, float32 on the host."""
        import mindspore as ms

        posterior = self.vae.encode(ms.Tensor(pixels).astype(self.vae.dtype)).latent_dist
        return posterior.mean.float().asnumpy(), posterior.std.float().asnumpy()

    def cache_keys(self) -> list[tuple]:
        flips = (False, True) if self.random_flip else (False,)
        keys = [("instance", self.dataset.image_id(i), f) for i in range(self.dataset.num_instance_images)
                for f in flips]
        keys += [("class", i, False) for i in range(len(self.dataset.class_images))]
        if getattr(self.dataset, "references", None):  # Kontext: each target's reference image, flipped with it
            keys += [("reference", index, f) for kind, index, f in keys if kind == "instance"]
        return list(dict.fromkeys(keys))

    def pixels(self, key: tuple) -> np.ndarray:
        kind, index, flip = key
        if kind == "reference":
            return self.dataset.reference_by_id(index, flip)
        return self.dataset.instance_by_id(index, flip) if kind == "instance" else self.dataset.class_image(index)

    def build_cache(self) -> None:
        """Encode every image once (no-op without caching)."""
        from tqdm.auto import tqdm

        if self.cache is None:
            return
        for key in tqdm(self.cache_keys(), desc="Caching latents", disable=not self.show_progress):
            mean, std = self.encode_moments(self.pixels(key)[None])
            self.cache[key] = (mean[0], std[0])

    def moments(self, keys: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of the images named by `keys` (see cache_keys), stacked."""
        if self.cache is not None:
            return np.stack([self.cache[k][0] for k in keys]), np.stack([self.cache[k][1] for k in keys])
        return self.encode_moments(np.stack([self.pixels(k) for k in keys]))


@dataclass
class BatchDraws:
    """One step's host random numbers, in the order they are drawn (a test feeds its own through `draw`)."""

    flips: np.ndarray           # (n,) bool, per instance sample
    drop_captions: np.ndarray   # (n,) bool
    vae_eps: np.ndarray         # (rows, C, h, w) N(0, 1): the VAE posterior sample
    noise: np.ndarray           # (rows, C, h, w) N(0, 1): the flow-matching noise
    density_draws: np.ndarray   # (rows,) raw draws of compute_density_for_timestep_sampling
    cond_eps: np.ndarray | None = None  # Kontext: the reference latents' posterior sample


class BatchBuilder:
    """The train step's inputs for this process's share of each global batch."""

    def __init__(self, dataset, latents: LatentSource, prompts, sampler, vae_config: Any, data_rng, step_rng,
                 weight_dtype, random_flip: bool = False, caption_dropout: float = 0.0,
                 class_prompt: str | None = None, guidance_scale: float | None = 3.5, clip_trains: bool = False,
                 world_size: int = 1, rank: int = 0, vae_sample: bool = True):
        self.dataset, self.latents, self.prompts, self.sampler = dataset, latents, prompts, sampler
        self.scaling_factor = float(vae_config.scaling_factor)
        self.shift_factor = float(vae_config.shift_factor or 0.0)
        self.data_rng, self.step_rng = data_rng, step_rng
        self.weight_dtype = weight_dtype
        self.random_flip, self.caption_dropout = random_flip, caption_dropout
        self.class_prompt = class_prompt  # set: prior preservation, [instance; class] rows
        self.guidance_scale = guidance_scale  # None: the transformer has no guidance embedding
        self.clip_trains = clip_trains
        self.world_size, self.rank = world_size, rank
        self.vae_sample = vae_sample  # latent_dist.sample() as diffusers' DreamBooth; False: .mode() (the mean)

    @property
    def halves(self) -> int:
        return 2 if self.class_prompt is not None else 1

    def draw(self, size: int, latent_shape: tuple[int, ...]) -> BatchDraws:
        """Flips and caption drops for the global batch (data generator), then the latent sample's eps, the
        noise and the density draws for all its rows (step generator): every process draws the same."""
        from ..latents import standard_normal
        from .flow_matching import draw_density

        step = self.dataset.draw_step(size, self.data_rng, self.random_flip, self.caption_dropout)
        vae_eps = standard_normal(latent_shape, self.step_rng)
        noise = standard_normal(latent_shape, self.step_rng)
        density = draw_density(self.sampler.weighting_scheme, latent_shape[0], self.step_rng)
        return BatchDraws(step.flips, step.drop_captions, vae_eps, noise, density)

    def latent_shape(self, batch: list[int]) -> tuple[int, ...]:
        h, w = self.dataset.shape_of(batch[0])
        factor = 2 ** (len(self.latents.vae.config.block_out_channels) - 1)
        return (len(batch) * self.halves, int(self.latents.vae.config.latent_channels), h // factor, w // factor)

    def image_keys(self, items: list[int], flips: np.ndarray) -> list[tuple]:
        keys = [("instance", self.dataset.image_id(i), bool(f)) for i, f in zip(items, flips)]
        if self.class_prompt is not None:
            n_class = len(self.dataset.class_images)
            keys += [("class", i % n_class, False) for i in items]
        return keys

    def batch_prompts(self, batch: list[int], drops: np.ndarray) -> list[str]:
        prompts = ["" if drop else self.dataset.caption(i) for i, drop in zip(batch, drops)]
        if self.class_prompt is not None:
            prompts += [self.class_prompt] * len(batch)
        return prompts

    def rows(self, size: int) -> np.ndarray:
        return rank_rows(size, self.world_size, self.rank, self.halves)

    def normalized_latents(self, keys: list[tuple], eps: np.ndarray):
        """(sample - shift_factor) * scaling_factor of the named images' posteriors, sampled with `eps`."""
        import mindspore as ms

        from ..latents import normalize_latents

        mean, std = self.latents.moments(keys)
        z = mean + std * eps if self.vae_sample else mean
        return normalize_latents(ms.Tensor(z), self.scaling_factor, self.shift_factor).astype(self.weight_dtype)

    def __call__(self, batch: list[int]) -> list:
        shape = self.latent_shape(batch)
        return self.build(batch, self.draw(len(batch), shape), shape)

    def build(self, batch: list[int], draws: BatchDraws, shape: tuple[int, ...]) -> list:
        import mindspore as ms

        from ..latents import prepare_latent_image_ids, prepare_text_ids

        rows = self.rows(len(batch))
        mine = rows[: len(rows) // self.halves]  # this process's instance rows
        latents = self.normalized_latents(self.image_keys([batch[i] for i in mine], draws.flips[mine]),
                                          draws.vae_eps[rows])
        sigmas, timesteps = self.sampler.sigmas_from_density(
            self.sampler.density_from_draws(draws.density_draws), (shape[2] // 2) * (shape[3] // 2))
        prompts = self.batch_prompts(batch, draws.drop_captions)
        t5, text = self.prompts.batch([prompts[r] for r in rows], self.weight_dtype, self.clip_trains)
        inputs = [latents, ms.Tensor(draws.noise[rows]), ms.Tensor(sigmas[rows]),
                  ms.Tensor(timesteps[rows]), t5, ms.Tensor(text) if isinstance(text, np.ndarray) else text,
                  prepare_latent_image_ids(shape[2] // 2, shape[3] // 2), prepare_text_ids(t5.shape[1])]
        if self.guidance_scale is not None:
            inputs.append(ms.Tensor(np.full(len(rows), self.guidance_scale, np.float32)))
        return inputs
