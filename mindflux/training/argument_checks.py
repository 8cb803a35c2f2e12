"""Range checks of the training script's numeric arguments, on plain values, before anything slow starts.

A NaN learning rate or a dropout of 1.5 does not fail by itself: it trains a useless LoRA (or fails
much later, blamed on another option). Each check names the option and the value it got.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# option -> (lowest, lowest allowed?, highest, highest allowed?); None: no bound on that side
RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "learning_rate": (0.0, False, None, False),
    "text_encoder_lr": (0.0, True, None, False),  # 0 means "the same as --learning_rate"
    "lora_alpha": (0.0, False, None, False),
    "lora_dropout": (0.0, True, 1.0, False),
    "caption_dropout": (0.0, True, 1.0, True),
    "prior_loss_weight": (0.0, True, None, False),
    "adam_beta1": (0.0, True, 1.0, False),
    "adam_beta2": (0.0, True, 1.0, False),
    "prodigy_beta3": (0.0, True, 1.0, False),
    "adam_epsilon": (0.0, False, None, False),
    "adam_weight_decay": (0.0, True, None, False),
    "adam_weight_decay_text_encoder": (0.0, True, None, False),
    "max_grad_norm": (0.0, False, None, False),
    "seed": (0, True, None, False),  # numpy's SeedSequence takes no negative seed
    "logit_std": (0.0, False, None, False),
}
# only finite (no range): NaN or inf here would poison every step
FINITE = ("guidance_scale", "logit_mean", "mode_scale", "lr_power")


def _interval(low, low_in, high, high_in) -> str:
    left = "(-inf" if low is None else ("[" if low_in else "(") + f"{low:g}"
    right = "inf)" if high is None else f"{high:g}" + ("]" if high_in else ")")
    return f"{left}, {right}"


def check_value(name: str, value: float | None) -> str | None:
    """A message naming --name when `value` is non-finite or outside RANGES[name]; None when fine (or unset)."""
    if value is None:
        return None
    if not math.isfinite(value):
        return f"--{name} must be a finite number; got {value}"
    if name not in RANGES:
        return None
    low, low_in, high, high_in = RANGES[name]
    too_low = low is not None and (value < low or (value == low and not low_in))
    too_high = high is not None and (value > high or (value == high and not high_in))
    if too_low or too_high:
        return f"--{name} must be in {_interval(low, low_in, high, high_in)}; got {value:g}"
    return None


def check_training_values(values: Mapping[str, Any]) -> str | None:
    """The first problem among the script's numeric arguments (`vars(args)`), or None."""
    for name in list(RANGES) + list(FINITE):
        if name in values:
            problem = check_value(name, values[name])
            if problem:
                return problem
    return None
