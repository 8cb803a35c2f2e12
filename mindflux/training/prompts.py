"""Prompt encoding for training: every distinct prompt encoded once, before the transformer is loaded.

T5 is frozen in every mode, so its embeddings are computed once and T5 is dropped. CLIP too,
unless it trains (--train_text_encoder): then the table holds CLIP's token ids and CLIP stays.
`PromptTable.batch` turns a batch's prompts into the train step's text inputs.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import numpy as np

from ..device import pynative as _pynative
from .run_config import TrainingError


def free_memory() -> None:
    from ..backend import empty_cache

    gc.collect()
    empty_cache()


@dataclass
class PromptTable:
    """Per prompt: T5 embeddings (L, D), and CLIP's pooled output (P,) or, when CLIP trains, its token ids (77,)."""

    t5: dict[str, np.ndarray] = field(default_factory=dict)
    pooled: dict[str, np.ndarray] = field(default_factory=dict)
    clip_ids: dict[str, np.ndarray] = field(default_factory=dict)

    def batch(self, prompts: list[str], weight_dtype, clip_trains: bool) -> tuple:
        """(T5 embeddings (B, L, D) in the weight dtype, then CLIP token ids (B, 77) as numpy when CLIP trains,
        else the pooled embeddings (B, P) in the weight dtype)."""
        import mindspore as ms

        t5 = ms.Tensor(np.stack([self.t5[p] for p in prompts])).astype(weight_dtype)
        if clip_trains:
            return t5, np.stack([self.clip_ids[p] for p in prompts])
        return t5, ms.Tensor(np.stack([self.pooled[p] for p in prompts])).astype(weight_dtype)


def prompts_needed(captions: list[str], caption_dropout: float, class_prompt: str | None,
                   validation_prompt: str | None) -> list[str]:
    """Every distinct prompt a run encodes: the captions, "" (caption dropout), the class and validation prompts."""
    prompts = list(captions)
    if caption_dropout > 0:
        prompts.append("")
    if class_prompt is not None:
        prompts.append(class_prompt)
    if validation_prompt is not None:
        prompts.append(validation_prompt)
    return list(dict.fromkeys(prompts))


def load_text_encoders(folder: str, weight_dtype):
    from transformers import CLIPTokenizer, T5TokenizerFast  # after mindflux: it keeps torch out of transformers

    from .. import CLIPTextModel, T5EncoderModel

    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    tokenizer_2 = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", mindspore_dtype=weight_dtype)
    text_encoder_2 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", mindspore_dtype=weight_dtype)
    return tokenizer, text_encoder, tokenizer_2, text_encoder_2


def encode_prompts(folder: str, prompts: list[str], max_sequence_length: int, weight_dtype, keep_clip: bool):
    """Every prompt encoded with the folder's encoders: (PromptTable, (tokenizer, CLIP) kept for training or None)."""
    import mindspore as ms

    from ..text_encoding import CLIP_MAX_LENGTH, encode_clip_pooled, encode_t5, tokenize

    table = PromptTable()
    tokenizer, text_encoder, tokenizer_2, text_encoder_2 = load_text_encoders(folder, weight_dtype)
    chunk = 8
    with _pynative():
        for start in range(0, len(prompts), chunk):
            part = prompts[start:start + chunk]
            t5 = encode_t5(text_encoder_2, tokenizer_2, part, max_sequence_length).astype(ms.float32).asnumpy()
            table.t5.update(zip(part, t5))
            if keep_clip:
                table.clip_ids.update(zip(part, tokenize(tokenizer, part, CLIP_MAX_LENGTH, "CLIP")))
            else:
                pooled = encode_clip_pooled(text_encoder, tokenizer, part).astype(ms.float32).asnumpy()
                table.pooled.update(zip(part, pooled))
    del text_encoder_2, tokenizer_2
    if not keep_clip:
        del text_encoder, tokenizer
        free_memory()
        return table, None
    free_memory()
    return table, (tokenizer, text_encoder)


def precomputed_prompt_table(path: str, instance_prompt: str, class_prompt: str | None,
                             needed: list[str]) -> PromptTable:
    """--precomputed_prompt_embeds: the instance prompt's (and class prompt's) embeddings from a file."""
    from ..safetensors_io import load_file

    if not os.path.isfile(path):
        raise TrainingError(f"--precomputed_prompt_embeds {path} does not exist")
    arrays = load_file(path)
    table = PromptTable()
    sources = {instance_prompt: ""}
    if class_prompt is not None:
        sources[class_prompt] = "class_"
    unknown = sorted(set(needed) - set(sources))
    if unknown:
        raise TrainingError(f"--precomputed_prompt_embeds holds the instance (and class) prompt only, but the run "
                            f"also needs {unknown[:3]} (per-image captions, --caption_dropout or --validation_prompt): "
                            "drop --precomputed_prompt_embeds to encode them")
    for prompt, prefix in sources.items():
        keys = (f"{prefix}prompt_embeds", f"{prefix}pooled_prompt_embeds")
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise TrainingError(f"--precomputed_prompt_embeds lacks {', '.join(missing)}")
        embeds, pooled = (np.asarray(arrays[k], np.float32) for k in keys)
        table.t5[prompt] = embeds.reshape(embeds.shape[-2:])
        table.pooled[prompt] = pooled.reshape(-1)
    return table


def build_prompt_table(folder: str, prompts: list[str], max_sequence_length: int, weight_dtype,
                       train_text_encoder: bool, precomputed: str | None, instance_prompt: str,
                       class_prompt: str | None):
    """(PromptTable, (tokenizer, CLIP) when CLIP trains else None), from the file or from the encoders."""
    if precomputed is not None:
        if train_text_encoder:
            raise TrainingError("--train_text_encoder needs the text encoders: drop --precomputed_prompt_embeds")
        return precomputed_prompt_table(precomputed, instance_prompt, class_prompt, prompts), None
    # encoded before the transformer is loaded: T5 and the transformer are never resident together
    return encode_prompts(folder, prompts, max_sequence_length, weight_dtype, train_text_encoder)
