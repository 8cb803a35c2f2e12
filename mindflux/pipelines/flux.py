"""FluxPipeline: text to image with FLUX.1-dev / schnell, diffusers' arguments, defaults and numbers.

The data flow of one call, for B prompts, n images per prompt, an H x W image, L text tokens and
N = (H/16) * (W/16) image tokens:

    prompt --CLIP (pooled), T5--> pooled_prompt_embeds (B*n, 768), prompt_embeds (B*n, L, 4096)
    host noise (B*n, 16, H/8, W/8) --pack--> latents (B*n, N, 64), latent_image_ids (N, 3)
    sigmas linspace(1, 1/steps) + mu(N) --scheduler.set_timesteps--> timesteps (steps,)
    per step: transformer(latents, t/1000, guidance, text) -> velocity (B*n, N, 64)
              [true CFG: neg + scale * (pos - neg)] --scheduler.step--> latents
    unpack (B*n, 16, H/8, W/8) --denormalize--> VAE decode (B*n, 3, H, W) in [-1, 1]
    --> [0, 1], clamped --> PIL images / numpy (B*n, H, W, 3)
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..backend import empty_cache
from ..device import pynative as _pynative
from ..latents import (
    calculate_shift,
    denormalize_latents,
    latent_size,
    normalize_latents,
    pack_latents,
    prepare_latent_image_ids,
    prepare_text_ids,
    standard_normal,
    unpack_latents,
)
from ..lora import FluxLoraLoaderMixin
from .denoise import Conditioning, TextConditioning, denoise
from .pipeline_utils import DiffusionPipeline, _pipeline_classes, synchronize

logger = logging.getLogger(__name__)

Generator = Union[np.random.Generator, int]
OUTPUT_TYPES = ("pil", "np", "ms", "latent")


@dataclass
class FluxPipelineOutput:
    """`images`: a list of PIL images, a (B, H, W, 3) float32 array in [0, 1] ("np"), a (B, 3, H, W)
    Tensor in [0, 1] ("ms"), or the packed (B, N, 64) latents ("latent")."""

    images: Any


def _as_list(prompt: str | Sequence[str] | None) -> list[str] | None:
    return [prompt] if isinstance(prompt, str) else (None if prompt is None else list(prompt))


def _as_tensor(value, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return Tensor(value)
    raise TypeError(f"`{name}` must be a MindSpore Tensor or a numpy array; got {type(value).__name__}")


def _compiled(model) -> bool:
    return model is not None and any(getattr(cell, "compile_cache", None) for _, cell in model.cells_and_names())


def _repeat(x: Tensor, times: int) -> Tensor:
    """Each row `times` times in a row (prompt 0, 0, 1, 1, ...), the order diffusers gives images."""
    return x if times == 1 else ops.repeat_interleave(x, times, 0)


class FluxPipeline(DiffusionPipeline, FluxLoraLoaderMixin):
    """FLUX.1 text-to-image. Components and call arguments are diffusers' FluxPipeline's.

    LoRA: load_lora_weights / set_adapters / fuse_lora / save_lora_weights ... come from
    FluxLoraLoaderMixin (docs/lora.md); `joint_attention_kwargs={"scale": s}` scales them per call.

    `generator` takes an int seed, a numpy Generator, or a list of them with one per image;
    noise is drawn on the host (mindflux.latents.standard_normal), so the same seed gives the
    same images on every device and in both execution modes. IP-Adapter is not supported
    (`image_encoder` / `feature_extractor` must be None).
    """

    _optional_components = ["image_encoder", "feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 image_encoder=None, feature_extractor=None):
        if image_encoder is not None or feature_extractor is not None:
            raise ValueError("IP-Adapter (image_encoder / feature_extractor) is not supported by mindflux")
        self.register_modules(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                              image_encoder=None, feature_extractor=None)
        self.tokenizer_max_length = tokenizer.model_max_length if tokenizer is not None else 77
        self._release_text_encoders = False
        self._text_encoders_released = False
        self.timings: dict[str, float] = {}
        self._interrupt = False
        self._guidance_scale = 3.5
        self._joint_attention_kwargs: dict = {}
        self._num_timesteps = 0
        self._current_timestep = None
        self.noise_source: Callable[[tuple[int, ...]], np.ndarray] | None = None

    @property
    def vae_scale_factor(self) -> int:
        """8 for FLUX's VAE; the packed 2x2 patches make every image side a multiple of 2 * 8 = 16.
        A property, so a VAE loaded after the pipeline (see docs/inference.md, memory) counts."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8

    @property
    def default_sample_size(self) -> int:
        """Latent pixels of the default image: the VAE's sample_size over its scale factor, i.e.
        1024 / 8 = 128 for FLUX.1 (diffusers' fixed default) and 64 / 8 for the 64-pixel demo model."""
        if self.vae is None:
            return 128
        size = self.vae.config.sample_size
        return (size[0] if isinstance(size, (list, tuple)) else size) // self.vae_scale_factor

    @property
    def default_max_sequence_length(self) -> int:
        """T5 tokens when the caller gives none: the T5 tokenizer's model_max_length, capped at 512.
        That is diffusers' fixed 512 for FLUX.1 and the length the demo model was trained with."""
        limit = getattr(self.tokenizer_2, "model_max_length", 512) if self.tokenizer_2 is not None else 512
        return min(512, int(limit))

    # ---- state that callbacks read, as in diffusers -------------------------------------------
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def joint_attention_kwargs(self) -> dict:
        return self._joint_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a callback to skip the remaining steps."""
        return self._interrupt

    # ---- memory -------------------------------------------------------------------------------
    def enable_vae_tiling(self, tile_sample_min_size: int | None = None) -> None:
        """Decode in overlapping tiles (FLUX VAE default: 1024-pixel tiles; 512 keeps a 1024^2 decode
        near 1 GiB of activations)."""
        self.vae.enable_tiling(tile_sample_min_size=tile_sample_min_size)

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_text_encoder_release(self, enabled: bool = True) -> None:
        """Release CLIP and T5 at the end of the prompt encoding of the next call (see release_text_encoders).

        From now on prompts are encoded op by op (PyNative) even in graph mode: MindSpore keeps a
        compiled Cell's weights for the life of the process, so compiled encoders could not be freed.
        Call this before the first encoding when the encoders are to be released by hand too.
        """
        self._release_text_encoders = enabled

    def release_text_encoders(self) -> None:
        """Drop CLIP and T5 (FLUX.1: 4.9 B parameters, 9.8 GB in bf16) and free their device memory.

        Later calls take `prompt_embeds` / `pooled_prompt_embeds` (from `encode_prompt` before the
        release); the tokenizers stay. Load the pipeline again to encode new prompts.
        """
        if _compiled(self.text_encoder) or _compiled(self.text_encoder_2):
            logger.warning("the text encoders ran in graph mode, and MindSpore keeps a compiled Cell's weights "
                           "until the process ends: call enable_text_encoder_release() before encoding so that "
                           "they run op by op and their memory can be freed")
        self.text_encoder = None
        self.text_encoder_2 = None
        self._text_encoders_released = True
        gc.collect()  # the Parameters' device memory goes back to MindSpore's pool with the last reference
        empty_cache()

    # ---- 1. inputs ----------------------------------------------------------------------------
    def check_inputs(self, prompt, prompt_2, height: int, width: int, negative_prompt=None, negative_prompt_2=None,
                     prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                     negative_pooled_prompt_embeds=None, callback_on_step_end_tensor_inputs=None,
                     max_sequence_length: int | None = None) -> None:
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            h, w = (s * self.vae_scale_factor for s in latent_size(height, width, self.vae_scale_factor))
            logger.warning("`height` and `width` have to be divisible by %d but are %d and %d; they are rounded "
                           "down to %d and %d (as diffusers does)", multiple, height, width, h, w)
        if min(latent_size(height, width, self.vae_scale_factor)) < 2:
            raise ValueError(f"height and width must be at least {multiple}; got {height} x {width}")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, "
                             f"but found {unknown}")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
        if prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("pass either `prompt_2` or `prompt_embeds`, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("provide either `prompt` or `prompt_embeds`")
        for name, value in (("prompt", prompt), ("prompt_2", prompt_2), ("negative_prompt", negative_prompt),
                            ("negative_prompt_2", negative_prompt_2)):
            if value is not None and not isinstance(value, (str, list, tuple)):
                raise ValueError(f"`{name}` has to be of type `str` or `list` but is {type(value)}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
        if negative_prompt_2 is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either `negative_prompt_2` or `negative_prompt_embeds`, not both")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds` too, from the same text encoders")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("`negative_prompt_embeds` needs `negative_pooled_prompt_embeds` too")
        if max_sequence_length is not None and max_sequence_length > 512:
            raise ValueError(f"`max_sequence_length` cannot be greater than 512 but is {max_sequence_length}")

    # ---- 2. prompt -> embeddings --------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[str] | None, prompt_2: str | list[str] | None = None,
                      num_images_per_prompt: int = 1, prompt_embeds: Tensor | np.ndarray | None = None,
                      pooled_prompt_embeds: Tensor | np.ndarray | None = None, max_sequence_length: int | None = None,
                      lora_scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(prompt_embeds (B*n, L, 4096), pooled_prompt_embeds (B*n, 768), text_ids (L, 3)).

        `prompt` goes to CLIP, `prompt_2` (default: `prompt`) to T5. Given embeddings are used as
        they are, each row repeated `num_images_per_prompt` times (diffusers leaves that to the caller).
        `lora_scale` scales CLIP's LoRA adapters, if it has any, for this encoding (T5 takes no LoRA).
        """
        if prompt_embeds is None:
            max_sequence_length = max_sequence_length or self.default_max_sequence_length
            if self.text_encoder is None or self.text_encoder_2 is None:
                why = "were released after encoding" if self._text_encoders_released else "are not loaded"
                raise ValueError(f"the text encoders {why}: pass `prompt_embeds` and `pooled_prompt_embeds` "
                                 "(from encode_prompt), or load the pipeline with its text encoders")
            from ..text_encoding import encode_prompt

            scaled = lora_scale is not None and bool(getattr(self.text_encoder, "peft_config", None))
            previous = self.text_encoder.set_lora_scale(lora_scale) if scaled else None
            try:
                with _pynative() if self._release_text_encoders else contextlib.nullcontext():
                    prompt_embeds, pooled_prompt_embeds, text_ids = encode_prompt(
                        self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2, prompt, prompt_2,
                        max_sequence_length=max_sequence_length, num_images_per_prompt=num_images_per_prompt)
            finally:
                if scaled:
                    self.text_encoder.set_lora_scale(previous)
            return prompt_embeds, pooled_prompt_embeds, text_ids
        prompt_embeds = _repeat(_as_tensor(prompt_embeds, "prompt_embeds"), num_images_per_prompt)
        pooled_prompt_embeds = _repeat(_as_tensor(pooled_prompt_embeds, "pooled_prompt_embeds"), num_images_per_prompt)
        if prompt_embeds.ndim != 3 or pooled_prompt_embeds.ndim != 2 or \
                prompt_embeds.shape[0] != pooled_prompt_embeds.shape[0]:
            raise ValueError(f"`prompt_embeds` must be (batch, seq_len, dim) and `pooled_prompt_embeds` (batch, dim); "
                             f"got {prompt_embeds.shape} and {pooled_prompt_embeds.shape}")
        return prompt_embeds, pooled_prompt_embeds, prepare_text_ids(prompt_embeds.shape[1])

    # ---- 3. noise -> packed latents -----------------------------------------------------------
    def prepare_latents(self, batch_size: int, num_channels_latents: int, height: int, width: int, dtype: ms.Type,
                        generator: Generator | list[Generator] | None = None,
                        latents: Tensor | np.ndarray | None = None) -> tuple[Tensor, Tensor]:
        """(latents (B, N, 4C), latent_image_ids (N, 3)). Noise is drawn unpacked, (B, C, h, w), one
        generator per image when a list is given, then packed, as diffusers does."""
        h, w = latent_size(height, width, self.vae_scale_factor)
        latent_image_ids = prepare_latent_image_ids(h // 2, w // 2)
        expected = (batch_size, (h // 2) * (w // 2), num_channels_latents * 4)
        if latents is not None:
            latents = _as_tensor(latents, "latents")
            if tuple(latents.shape) != expected:
                size = f"{h * self.vae_scale_factor} x {w * self.vae_scale_factor}"
                raise ValueError(f"`latents` must be packed, {expected} for {batch_size} images of {size}; got "
                                 f"{tuple(latents.shape)}")
            return latents.astype(dtype), latent_image_ids
        noise = self.randn((batch_size, num_channels_latents, h, w), generator)
        return pack_latents(Tensor(noise)).astype(dtype), latent_image_ids

    def randn(self, shape: Sequence[int], generator: Generator | list[Generator] | None) -> np.ndarray:
        """Host N(0, 1) noise of `shape` (B, ...), one generator per row when a list is given.

        Every draw of a call goes through here (initial noise, the VAE posterior's samples), in
        diffusers' order; `noise_source`, when set, replaces the draws (tests feed diffusers' own)."""
        if isinstance(generator, (list, tuple)) and len(generator) != shape[0]:
            raise ValueError(f"You have passed a list of generators of length {len(generator)}, but requested an "
                             f"effective batch size of {shape[0]}. Make sure the batch size matches the length "
                             "of the generators.")
        if self.noise_source is not None:
            noise = np.asarray(self.noise_source(tuple(shape)), np.float32)
            if noise.shape != tuple(shape):
                raise ValueError(f"noise_source gave {noise.shape} for a draw of {tuple(shape)}")
            return noise
        if isinstance(generator, (list, tuple)):
            return np.concatenate([standard_normal((1, *shape[1:]), g) for g in generator])
        return standard_normal(shape, generator)

    # ---- 4. timesteps -------------------------------------------------------------------------
    def prepare_timesteps(self, num_inference_steps: int, image_seq_len: int,
                          sigmas: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
        """Set the scheduler's schedule and return its timesteps (steps,) on the host.

        sigmas default to linspace(1, 1/steps, steps); mu, the resolution-dependent shift, is linear
        in the number of image tokens with the scheduler config's ends (it is ignored without
        use_dynamic_shifting, as for schnell)."""
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        cfg = self.scheduler.config
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        self.scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        return self.scheduler.timesteps.asnumpy()

    # ---- 6. latents -> images -----------------------------------------------------------------
    def decode_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        """Packed latents (B, N, 64) -> images (B, 3, H, W) in [0, 1], float32."""
        latents = unpack_latents(latents, height, width, self.vae_scale_factor)  # (B, 16, H/8, W/8)
        cfg = self.vae.config
        latents = denormalize_latents(latents, cfg.scaling_factor, cfg.shift_factor or 0.0)
        image = self.vae.decode(latents.astype(self.vae.dtype), return_dict=False)[0]  # (B, 3, H, W), ~[-1, 1]
        image = image.astype(ms.float32) * 0.5 + 0.5
        # NaN stays NaN, as with torch's clamp (MindSpore's makes it 0): a broken image must not pass for black
        return ops.where(ops.isnan(image), image, ops.clamp(image, 0.0, 1.0))

    @staticmethod
    def postprocess(image: Tensor, output_type: str = "pil"):
        """(B, 3, H, W) in [0, 1] -> a list of PIL images, a (B, H, W, 3) numpy array, or the Tensor ("ms")."""
        if output_type == "ms":
            return image
        array = image.asnumpy().transpose(0, 2, 3, 1)
        if output_type == "np":
            return array
        from PIL import Image

        return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]

    # ---- images -> latents (the image pipelines) --------------------------------------------
    def encode_image(self, pixels: np.ndarray, generator: Generator | list[Generator] | None = None,
                     sample: bool = True) -> Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> normalised latents (B, C, H/8, W/8) for the transformer.

        `sample`: a draw of the VAE posterior, mean + std * noise (diffusers' default), with one
        generator per image when a list is given; otherwise its mean (Kontext's "argmax")."""
        vae = self.vae
        dist = vae.encode(Tensor(pixels).astype(vae.dtype)).latent_dist
        latents = dist.mean
        if sample:
            noise = np.concatenate([self.randn((1, *latents.shape[1:]), g) for g in generator]) \
                if isinstance(generator, (list, tuple)) else self.randn(latents.shape, generator)
            latents = latents + dist.std * Tensor(noise).astype(latents.dtype)
        return normalize_latents(latents, vae.config.scaling_factor, vae.config.shift_factor or 0.0)

    @property
    def latent_channels(self) -> int:
        """16: the VAE's latent channels (each packed token holds 4x that)."""
        return self.vae.config.latent_channels if self.vae is not None else 16

    @classmethod
    def in_channels_for(cls, latent_channels: int = 16, vae_scale_factor: int = 8) -> int:
        """The transformer's x_embedder input width this pipeline feeds: 4 x 16 = 64 for FLUX.1-dev / schnell."""
        return 4 * latent_channels

    def check_transformer(self) -> None:
        """A transformer of another family member (e.g. FLUX.1-Fill's 384-wide x_embedder) is a clear error."""
        found = self.transformer.config.in_channels
        expected = self.in_channels_for(self.latent_channels, self.vae_scale_factor)
        if found != expected:
            fits = sorted(name for name, cls in _pipeline_classes().items()
                          if cls.in_channels_for(self.latent_channels, self.vae_scale_factor) == found)
            raise ValueError(f"{type(self).__name__} feeds the transformer {expected} channels per token, but this "
                             f"transformer's x_embedder takes {found}" +
                             (f": load it with {' or '.join(fits)}" if fits else ""))

    # ---- what the family members change (see mindflux/pipelines/denoise.py) --------------------
    def prepare_inputs(self, call: SimpleNamespace) -> None:
        """Check and preprocess the pipeline's own inputs (images, masks, strength) on the host, before any
        model work; may set call.height / call.width. Text-to-image has none."""

    def schedule(self, call: SimpleNamespace, timesteps: np.ndarray) -> np.ndarray:
        """The timesteps the loop runs (image pipelines start part way, by strength)."""
        self.scheduler.set_begin_index(0)
        return timesteps

    def prepare_conditioning(self, call: SimpleNamespace, batch: int, dtype: ms.Type, timesteps: np.ndarray,
                             generator) -> tuple[Tensor, Conditioning]:
        """The starting latents (B, N, 4C) and what the loop adds to them; text-to-image: noise, no additions."""
        latents, latent_image_ids = self.prepare_latents(batch, self.latent_channels, call.height, call.width, dtype,
                                                         generator, call.latents)
        return latents, Conditioning(img_ids=latent_image_ids)

    def finish(self, call: SimpleNamespace, image):
        """The decoded images, post-processed as the pipeline needs (Inpaint pastes crops back)."""
        return image

    # ---- the call -----------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: Sequence[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: Generator | list[Generator] | None = None,
        latents: Tensor | np.ndarray | None = None,
        prompt_embeds: Tensor | np.ndarray | None = None,
        pooled_prompt_embeds: Tensor | np.ndarray | None = None,
        negative_prompt_embeds: Tensor | np.ndarray | None = None,
        negative_pooled_prompt_embeds: Tensor | np.ndarray | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[FluxPipeline, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int | None = None,
    ):
        """Generate images; arguments and defaults are diffusers' FluxPipeline.__call__'s.

        height / width default to the VAE's sample_size (1024 for FLUX.1) and are rounded down to a
        multiple of 16 (with a warning).
        `latents` are packed initial noise, (B * num_images_per_prompt, N, 64), as a Tensor or numpy
        array. `joint_attention_kwargs={"scale": s}` scales the transformer's LoRA adapters for this
        call. `callback_on_step_end(pipe, step, timestep, {name: tensor})` may return replacements
        for "latents" and "prompt_embeds". FLUX.1-schnell ignores guidance_scale (no guidance embedding).
        Returns FluxPipelineOutput(images) or (images,); `self.timings` holds the seconds spent
        encoding, denoising and decoding.
        """
        return self.generate(**{k: v for k, v in locals().items() if k != "self"})

    def generate(self, **arguments: Any):
        """The call every pipeline makes: FluxPipeline.__call__'s arguments (their defaults where not given)
        plus the pipeline's own, in the order inputs -> prompts -> timesteps -> latents -> loop -> images."""
        defaults = {name: p.default for name, p in inspect.signature(FluxPipeline.__call__).parameters.items()
                    if name != "self"}
        unknown = sorted(set(arguments) - set(defaults) - set(inspect.signature(type(self).__call__).parameters))
        if unknown:
            raise TypeError(f"{type(self).__name__}.__call__ got unexpected arguments {unknown}")
        c = SimpleNamespace(**{**defaults, **arguments})

        # 1. inputs, all checked before any model work
        if c.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {c.output_type!r}")
        self.prepare_inputs(c)
        c.height = c.height or self.default_sample_size * self.vae_scale_factor
        c.width = c.width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(c.prompt, c.prompt_2, c.height, c.width, c.negative_prompt, c.negative_prompt_2,
                          c.prompt_embeds, c.negative_prompt_embeds, c.pooled_prompt_embeds,
                          c.negative_pooled_prompt_embeds, c.callback_on_step_end_tensor_inputs, c.max_sequence_length)
        self.check_transformer()
        self._guidance_scale = c.guidance_scale
        self._joint_attention_kwargs = dict(c.joint_attention_kwargs or {})
        self._current_timestep = None
        self._interrupt = False
        batch_size = len(_as_list(c.prompt)) if c.prompt is not None else c.prompt_embeds.shape[0]
        batch = batch_size * c.num_images_per_prompt

        # 2. prompts -> T5 embeddings (B*n, L, D), CLIP pooled (B*n, P)
        start = time.perf_counter()
        text, negative = self._encode_call_prompts(c, batch_size)
        synchronize()
        self.timings = {"text_encoding_s": time.perf_counter() - start}

        # 3. timesteps (steps,): sigmas shifted by mu from the image sequence length
        h, w = latent_size(c.height, c.width, self.vae_scale_factor)
        timesteps = self.schedule(c, self.prepare_timesteps(c.num_inference_steps, (h // 2) * (w // 2), c.sigmas))
        self._num_timesteps = len(timesteps)

        # 4. starting latents (B*n, N, 64) and the pipeline's conditioning; int seeds become one numpy
        # Generator each, so successive draws (VAE posterior, then noise) differ
        dtype = self.transformer.dtype
        generator = [_rng(g) for g in c.generator] if isinstance(c.generator, (list, tuple)) else _rng(c.generator)
        latents, conditioning = self.prepare_conditioning(c, batch, dtype, timesteps, generator)
        if text.prompt_embeds.shape[0] != latents.shape[0]:
            raise ValueError(f"{text.prompt_embeds.shape[0]} prompt embeddings for {latents.shape[0]} images")
        # FLUX.1-dev embeds the guidance scale; schnell has no guidance embedding.
        guidance = Tensor(np.full((latents.shape[0],), c.guidance_scale, np.float32)) \
            if self.transformer.config.guidance_embeds else None

        # 5. the loop: the transformer compiles once per shape in graph mode; the scheduler runs here
        start = time.perf_counter()
        latents = denoise(self, latents, timesteps, text, conditioning, guidance, negative, c.true_cfg_scale,
                          c.callback_on_step_end, c.callback_on_step_end_tensor_inputs)
        synchronize()
        self.timings.update(denoising_s=time.perf_counter() - start, steps=len(timesteps))

        # 6. unpack, denormalize, VAE decode, [-1, 1] -> [0, 1]
        start = time.perf_counter()
        if c.output_type == "latent":
            image = latents
        else:
            image = self.finish(c, self.postprocess(self.decode_latents(latents, c.height, c.width), c.output_type))
        self.timings["decoding_s"] = time.perf_counter() - start
        return FluxPipelineOutput(images=image) if c.return_dict else (image,)

    def _encode_call_prompts(self, c: SimpleNamespace,
                             batch_size: int) -> tuple[TextConditioning, TextConditioning | None]:
        """The prompt's conditioning, and the negative prompt's when true CFG is on, in the transformer's dtype."""
        dtype = self.transformer.dtype
        lora_scale = self._joint_attention_kwargs.get("scale")  # also for CLIP's adapters, as diffusers
        embeds, pooled, text_ids = self.encode_prompt(c.prompt, c.prompt_2, c.num_images_per_prompt, c.prompt_embeds,
                                                      c.pooled_prompt_embeds, c.max_sequence_length, lora_scale)
        text = TextConditioning(embeds.astype(dtype), pooled.astype(dtype), text_ids)
        negative = None
        has_neg_prompt = c.negative_prompt is not None or (
            c.negative_prompt_embeds is not None and c.negative_pooled_prompt_embeds is not None)
        if c.true_cfg_scale > 1 and has_neg_prompt:
            # one negative prompt serves every prompt of the batch
            neg_prompt, neg_prompt_2 = (p * batch_size if p is not None and len(p) == 1 else p
                                        for p in (_as_list(c.negative_prompt), _as_list(c.negative_prompt_2)))
            embeds, pooled, text_ids = self.encode_prompt(
                neg_prompt, neg_prompt_2, c.num_images_per_prompt, c.negative_prompt_embeds,
                c.negative_pooled_prompt_embeds, c.max_sequence_length, lora_scale)
            negative = TextConditioning(embeds.astype(dtype), pooled.astype(dtype), text_ids)
        if self._release_text_encoders and self.text_encoder is not None:
            self.release_text_encoders()
        return text, negative


def _rng(generator: Generator | None) -> np.random.Generator | None:
    """An int seed as a fresh numpy Generator (diffusers' torch.Generator().manual_seed(seed))."""
    return np.random.default_rng(int(generator)) if isinstance(generator, (int, np.integer)) and \
        not isinstance(generator, bool) else generator


__all__ = ["FluxPipeline", "FluxPipelineOutput"]
