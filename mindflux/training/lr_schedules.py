"""Learning-rate schedules with diffusers' names and formulas (diffusers.optimization.get_scheduler).

A schedule is a multiplier of the base learning rate as a function of the optimizer step k
(0 for the first update), exactly what torch's LambdaLR applies: the k-th update uses
base_lr * multiplier(k). It is evaluated on the host and fed to the compiled step as a tensor,
so changing the learning rate never recompiles anything.
"""

from __future__ import annotations

import math
from typing import Any, Callable

SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _warmup(step: int, num_warmup_steps: int) -> float | None:
    return step / max(1, num_warmup_steps) if step < num_warmup_steps else None


def get_schedule_multiplier(name: str, num_warmup_steps: int | None = None, num_training_steps: int | None = None,
                            num_cycles: int = 1, power: float = 1.0, lr_end: float = 1e-7,
                            lr_init: float = 1e-3) -> Callable[[int], float]:
    """The multiplier function of a schedule, with get_scheduler's argument rules.

    `num_cycles` is used by cosine_with_restarts only (plain cosine keeps its half cycle, as in
    diffusers). polynomial decays from `lr_init` to `lr_end` and returns the ratio to `lr_init`
    (diffusers' reading of the optimizer's default lr, 1e-3 for torch's AdamW in the DreamBooth
    script, where the learning rate is set per parameter group).
    """
    if name not in SCHEDULES:
        raise ValueError(f"lr_scheduler must be one of {', '.join(SCHEDULES)}; got {name!r}")
    if name == "constant":
        return lambda step: 1.0
    if num_warmup_steps is None:
        raise ValueError(f"{name} requires `num_warmup_steps`, please provide that argument.")
    warmup = int(num_warmup_steps)
    if name == "constant_with_warmup":
        return lambda step: step / max(1.0, warmup) if step < warmup else 1.0
    if num_training_steps is None:
        raise ValueError(f"{name} requires `num_training_steps`, please provide that argument.")
    total = int(num_training_steps)

    def progress(step: int) -> float:
        return (step - warmup) / max(1, total - warmup)

    if name == "linear":
        def linear(step: int) -> float:
            w = _warmup(step, warmup)
            return w if w is not None else max(0.0, (total - step) / max(1, total - warmup))
        return linear
    if name == "cosine":
        def cosine(step: int) -> float:
            w = _warmup(step, warmup)
            return w if w is not None else max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress(step))))
        return cosine
    if name == "cosine_with_restarts":
        def restarts(step: int) -> float:
            w = _warmup(step, warmup)
            if w is not None:
                return w
            p = progress(step)
            return 0.0 if p >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * p) % 1.0))))
        return restarts
    if not lr_init > lr_end:
        raise ValueError(f"lr_end ({lr_end}) must be smaller than initial lr ({lr_init})")

    def polynomial(step: int) -> float:
        w = _warmup(step, warmup)
        if w is not None:
            return w
        if step > total:
            return lr_end / lr_init
        remaining = 1 - (step - warmup) / (total - warmup)
        return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init
    return polynomial


class LRScheduler:
    """base_lr times a schedule, indexed by the optimizer step; `step()` advances after each update.

    Its state is the step count, so a resumed run continues the curve where it stopped.
    """

    def __init__(self, base_lr: float, multiplier: Callable[[int], float]):
        self.base_lr = float(base_lr)
        self.multiplier = multiplier
        self.last_step = 0

    def get_lr(self, step: int | None = None) -> float:
        """The learning rate of update `step` (default: the next update)."""
        return self.base_lr * self.multiplier(self.last_step if step is None else step)

    def step(self) -> None:
        self.last_step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])


def get_scheduler(name: str, learning_rate: float, num_warmup_steps: int | None = None,
                  num_training_steps: int | None = None, num_cycles: int = 1, power: float = 1.0,
                  lr_init: float = 1e-3) -> LRScheduler:
    """diffusers' get_scheduler for a learning rate instead of an optimizer (see get_schedule_multiplier)."""
    multiplier = get_schedule_multiplier(name, num_warmup_steps, num_training_steps, num_cycles, power,
                                         lr_init=lr_init)
    return LRScheduler(learning_rate, multiplier)
