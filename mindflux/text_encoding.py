"""Prompt encoding for FLUX.1, shared by the pipeline and the training script.

FLUX conditions on two encodings of the prompt, computed the way diffusers' FluxPipeline does:
CLIP's pooled output (padding to 77 tokens, truncation, no attention mask) and T5's last hidden
state (padding to `max_sequence_length`, truncation, no attention mask). The tokenizers are
transformers' CLIPTokenizer and T5TokenizerFast; the encoders are mindflux's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from mindspore import Tensor, ops

from .latents import prepare_text_ids

logger = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77


def _as_list(prompt: str | Sequence[str]) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    prompts = list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a string or a non-empty list of strings; got {prompt!r}")
    return prompts


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int, encoder_name: str = "the text encoder"
             ) -> np.ndarray:
    """(B, max_length) int64 ids, padded to `max_length` and truncated to it.

    A prompt that does not fit is logged with the part that was cut off (the end-of-text token is
    kept, so `max_length - 1` prompt tokens remain), as diffusers does.
    """
    prompts = _as_list(prompts)
    full = tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
    for index, ids in enumerate(full):
        if len(ids) > max_length:
            removed = tokenizer.decode(ids[max_length - 1:-1])
            logger.warning("Prompt %d is longer than the %d tokens %s takes and was truncated; this part was cut "
                           "off: %r", index, max_length, encoder_name, removed)
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")["input_ids"]
    return ids.astype(np.int64)


def _repeat(embeds: Tensor, num_images_per_prompt: int) -> Tensor:
    """Each prompt's row `num_images_per_prompt` times in a row (prompt 0, 0, 1, 1, ...)."""
    if num_images_per_prompt == 1:
        return embeds
    return ops.repeat_interleave(embeds, num_images_per_prompt, 0)


def encode_clip_pooled(text_encoder, tokenizer, prompts: str | Sequence[str], num_images_per_prompt: int = 1,
                       max_length: int = CLIP_MAX_LENGTH) -> Tensor:
    """CLIP's pooled prompt embedding, (B * num_images_per_prompt, hidden_size) in the encoder's dtype.

    `max_length` is 77 for every CLIP FLUX uses (diffusers reads it from tokenizer.model_max_length).
    """
    input_ids = tokenize(tokenizer, prompts, max_length, "CLIP")
    pooled = text_encoder(Tensor(input_ids), output_hidden_states=False).pooler_output
    return _repeat(pooled.astype(text_encoder.dtype), num_images_per_prompt)


def encode_t5(text_encoder_2, tokenizer_2, prompts: str | Sequence[str], max_sequence_length: int = 512,
              num_images_per_prompt: int = 1) -> Tensor:
    """T5's prompt embeddings, (B * num_images_per_prompt, max_sequence_length, d_model) in the
    encoder's dtype. FLUX.1-dev uses 512 tokens, schnell 256."""
    if max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be positive; got {max_sequence_length}")
    input_ids = tokenize(tokenizer_2, prompts, max_sequence_length, "T5")
    embeds = text_encoder_2(Tensor(input_ids), output_hidden_states=False).last_hidden_state
    return _repeat(embeds.astype(text_encoder_2.dtype), num_images_per_prompt)


def encode_prompt(text_encoder, tokenizer, text_encoder_2, tokenizer_2, prompt: str | Sequence[str],
                  prompt_2: str | Sequence[str] | None = None, max_sequence_length: int = 512,
                  num_images_per_prompt: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """(prompt_embeds, pooled_prompt_embeds, text_ids) as FluxPipeline.encode_prompt returns them:
    `prompt` goes to CLIP, `prompt_2` (default: `prompt`) to T5; text_ids are (L, 3) float32 zeros."""
    prompts = _as_list(prompt)
    prompts_2 = _as_list(prompt_2) if prompt_2 is not None else prompts
    if len(prompts_2) != len(prompts):
        raise ValueError(f"prompt and prompt_2 must have the same length; got {len(prompts)} and {len(prompts_2)}")
    pooled = encode_clip_pooled(text_encoder, tokenizer, prompts, num_images_per_prompt)
    embeds = encode_t5(text_encoder_2, tokenizer_2, prompts_2, max_sequence_length, num_images_per_prompt)
    return embeds, pooled, prepare_text_ids(embeds.shape[1])
