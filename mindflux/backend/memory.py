"""Will fp32 fit on the card? A coarse lower bound on the transformer's memory, checked before loading.

FLUX.1-dev's transformer alone holds 11.9 B parameters: 47.6 GB in fp32, 23.8 GB in bf16. The math attention
(the only one outside Atlas A2) also builds heads x S x S scores and probabilities per block: 2 GB in fp32 at
S = 4608 (1024² plus 512 text tokens); training without recompute keeps every block's probabilities for the
backward pass. The estimate counts just these, so a refusal is certain; passing it does not promise a fit.
"""

from __future__ import annotations

import json
import os

from .policy import DTYPES
from .runtime import device_memory_gib

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def transformer_parameters(config: dict) -> int:
    """Parameter count of a FluxTransformer2DModel from its config.json (the blocks' matrices and biases,
    the embedders and the output layers)."""
    dim = config.get("num_attention_heads", 24) * config.get("attention_head_dim", 128)
    head_dim = config.get("attention_head_dim", 128)
    dense = lambda i, o: i * o + o  # noqa: E731 - weight and bias
    double = (2 * dense(dim, 6 * dim) + 8 * dense(dim, dim) + 4 * head_dim
              + 2 * (dense(dim, 4 * dim) + dense(4 * dim, dim)))
    single = dense(dim, 3 * dim) + 3 * dense(dim, dim) + 2 * head_dim + dense(dim, 4 * dim) + dense(5 * dim, dim)
    in_channels = config.get("in_channels", 64)
    out = config.get("patch_size", 1) ** 2 * (config.get("out_channels") or in_channels)
    timestep_like = (2 if config.get("guidance_embeds") else 1) * (dense(256, dim) + dense(dim, dim))
    embedders = (dense(in_channels, dim) + dense(config.get("joint_attention_dim", 4096), dim) + timestep_like
                 + dense(config.get("pooled_projection_dim", 768), dim) + dense(dim, dim)  # the pooled text
                 + dense(dim, 2 * dim) + dense(dim, out))  # norm_out and proj_out
    return config.get("num_layers", 19) * double + config.get("num_single_layers", 38) * single + embedders


def estimate_transformer_gib(config: dict, dtype: str, seq_len: int, batch: int = 1, training: bool = False,
                             gradient_checkpointing: bool = False, flash_attention: bool = False) -> float:
    """Lower bound, in GiB, of what the transformer needs: weights, plus the attention's S x S tensors
    (none with flash attention; every block's kept for the backward pass when training without recompute)."""
    weights = transformer_parameters(config) * _BYTES[dtype]
    scores = 0 if flash_attention else 2 * batch * config.get("num_attention_heads", 24) * seq_len**2 * _BYTES[dtype]
    if training and not gradient_checkpointing:
        scores *= config.get("num_layers", 19) + config.get("num_single_layers", 38)
    return (weights + scores) / 1024**3


def check_fits(config: dict, dtype: str, seq_len: int, option: str, batch: int = 1, training: bool = False,
               gradient_checkpointing: bool = False, flash_attention: bool = False,
               available_gib: float | None = None) -> None:
    """Refuse, with the estimate, a run whose transformer alone cannot fit in the card's memory.

    `available_gib` defaults to the card's total memory; where it cannot be read (the CPU) nothing is checked.
    """
    if dtype not in DTYPES:
        raise ValueError(f"{option} must be one of {', '.join(DTYPES)}; got {dtype!r}")
    available = device_memory_gib() if available_gib is None else available_gib
    if available is None:
        return
    need = estimate_transformer_gib(config, dtype, seq_len, batch, training, gradient_checkpointing, flash_attention)
    if need > available:
        half = estimate_transformer_gib(config, "bf16", seq_len, batch, training, gradient_checkpointing,
                                        flash_attention)
        raise ValueError(f"{option} {dtype}: the transformer alone needs at least {need:.1f} GiB (weights and "
                         f"attention at {seq_len} tokens) and the card has {available:.1f} GiB. Use bf16 or fp16 "
                         f"(about {half:.1f} GiB){'' if training else ', or a smaller resolution'}.")


def check_model_fits(folder: str, dtype: str, height: int, width: int, text_len: int, option: str,
                     batch: int = 1, training: bool = False, gradient_checkpointing: bool = False) -> None:
    """`check_fits` for the transformer of a diffusers pipeline folder, at height x width pixels (2x2 patches of
    8x-downsampled latents) plus `text_len` T5 tokens; only where fp32 is asked for on a card."""
    from .policy import policy

    current = policy()
    config_path = os.path.join(folder, "transformer", "config.json")
    if dtype != "fp32" or current.device == "CPU" or not os.path.isfile(config_path):
        return
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    seq_len = (height // 16) * (width // 16) + text_len
    check_fits(config, dtype, seq_len, option, batch, training, gradient_checkpointing,
               flash_attention=current.attention_backend(DTYPES[dtype]) == "flash")
