"""The one denoising loop every FLUX pipeline runs; each pipeline only says what it adds to it.

Per step, for B images of N packed latent tokens of 4C channels:

    model input = latents (B, N, 4C)
                  [+ extra channels on the last axis (B, N, C')   Fill: masked image + mask; Control: control image]
                  [+ reference tokens on the sequence (B, M, 4C)  Kontext: the image to edit, ids with axis 0 = 1]
    velocity    = transformer(model input, t / 1000, guidance, text)[:, :N]
                  [true CFG: neg + true_cfg_scale * (pos - neg), the negative prompt through the same model]
    latents     = scheduler.step(velocity, t, latents)
                  [blend(i, latents): Inpaint puts the known region back, noised to the next timestep]
    callback_on_step_end(pipe, i, t, {"latents": ..., "prompt_embeds": ...}) may replace either
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
from mindspore import Tensor, ops


@dataclass
class TextConditioning:
    """One prompt's encoding: T5 embeddings (B, L, D), CLIP pooled (B, P), text ids (L, 3)."""

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor
    text_ids: Tensor


@dataclass
class Conditioning:
    """What a pipeline adds to the text-to-image loop, besides its starting latents and timesteps."""

    img_ids: Tensor                                  # (N, 3) ids of the latent tokens
    extra_channels: Tensor | None = None             # (B, N, C') appended to every token's channels
    reference: Tensor | None = None                  # (B, M, 4C) tokens appended to the sequence
    reference_ids: Tensor | None = None              # (M, 3) their ids
    blend: Callable[[int, Tensor], Tensor] | None = None  # (step, latents after it) -> latents


def denoise(pipe, latents: Tensor, timesteps: Sequence[float] | np.ndarray, text: TextConditioning,
            conditioning: Conditioning, guidance: Tensor | None = None, negative: TextConditioning | None = None,
            true_cfg_scale: float = 1.0, callback_on_step_end: Callable | None = None,
            callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> Tensor:
    """Run the scheduler over `timesteps` from `latents` (B, N, 4C); returns the final latents.

    `pipe` gives the transformer, the scheduler (already set, with its begin index), the progress
    bar and the call state callbacks read (`interrupt`, `joint_attention_kwargs`, `_current_timestep`).
    """
    transformer, scheduler = pipe.transformer, pipe.scheduler
    tokens = latents.shape[1]
    img_ids = conditioning.img_ids
    if conditioning.reference is not None:
        img_ids = ops.concat([img_ids, conditioning.reference_ids.astype(img_ids.dtype)], 0)

    def velocity(model_input: Tensor, timestep: Tensor, prompt: TextConditioning) -> Tensor:
        out = transformer(hidden_states=model_input, timestep=timestep, guidance=guidance,
                          pooled_projections=prompt.pooled_prompt_embeds, encoder_hidden_states=prompt.prompt_embeds,
                          txt_ids=prompt.text_ids, img_ids=img_ids, joint_attention_kwargs=pipe.joint_attention_kwargs,
                          return_dict=False)[0]
        return out if conditioning.reference is None else out[:, :tokens]  # the reference tokens are no output

    transformer.reset_cache(len(timesteps))  # a step cache (enable_cache) starts afresh per call
    with pipe.progress_bar(total=len(timesteps)) as progress_bar:
        for i, t in enumerate(timesteps):
            if pipe.interrupt:
                continue
            pipe._current_timestep = t
            model_input = latents
            if conditioning.extra_channels is not None:
                model_input = ops.concat([model_input, conditioning.extra_channels], 2)
            if conditioning.reference is not None:
                model_input = ops.concat([model_input, conditioning.reference], 1)
            timestep = Tensor(np.full((latents.shape[0],), t, np.float32)).astype(latents.dtype) / 1000
            with transformer.cache_context("cond"):  # true CFG's negative pass keeps its own cache state
                noise_pred = velocity(model_input, timestep, text)
            if negative is not None:
                with transformer.cache_context("uncond"):
                    neg_noise_pred = velocity(model_input, timestep, negative)
                noise_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if conditioning.blend is not None:
                latents = conditioning.blend(i, latents)
            if callback_on_step_end is not None:
                state: dict[str, Any] = {"latents": latents, "prompt_embeds": text.prompt_embeds}
                outputs = callback_on_step_end(pipe, i, t, {k: state[k] for k in callback_on_step_end_tensor_inputs})
                outputs = outputs or {}
                latents = outputs.pop("latents", latents)
                if "prompt_embeds" in outputs:
                    text = replace(text, prompt_embeds=outputs.pop("prompt_embeds"))
            progress_bar.update()
    pipe._current_timestep = None
    return latents


__all__ = ["Conditioning", "TextConditioning", "denoise"]
