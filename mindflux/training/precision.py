"""The training precision policy (docs/precision.md): frozen models in the weight dtype, LoRA in fp32.

--mixed_precision   frozen weights / compute   LoRA weights / compute   optimizer state   loss scaling
no (fp32)           fp32 / fp32                fp32 / fp32              fp32              none
bf16                bf16 / bf16                fp32 / bf16              fp32              none
fp16                fp16 / fp16                fp32 / fp16              fp32              dynamic

What each device can run, and its default when --mixed_precision is not given (bf16 on Ascend A2,
fp16 on GPUs and the 910A, fp32 on the CPU), is the device policy's (`mindflux.backend.policy`).
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..backend import policy

MIXED_PRECISION = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def resolve_mixed_precision(mixed_precision: str | None) -> str:
    """--mixed_precision as "no", "bf16" or "fp16": None becomes the device's default; a dtype the
    device cannot run is a ValueError that says why."""
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of no, fp16, bf16; got {mixed_precision!r}")
    current = policy()
    name = current.default_dtype if mixed_precision is None else MIXED_PRECISION[mixed_precision]
    current.check_dtype(name, "--mixed_precision")
    return "no" if name == "fp32" else name


def resolve_weight_dtype(mixed_precision: str | None) -> ms.Type:
    """The dtype of the frozen models for --mixed_precision (None: the device's default), checked against
    the device."""
    return policy().check_dtype(resolve_mixed_precision(mixed_precision), "--mixed_precision")


def freeze(*models, dtype: ms.Type = ms.float32) -> None:
    """requires_grad=False on every parameter, then cast to the weight dtype (LoRA parameters, if any
    were added already, stay fp32: the LoRA core keeps them so)."""
    for model in models:
        if model is None:
            continue
        for param in model.get_parameters():
            param.requires_grad = False
        model.to(dtype)


class DynamicLossScale(nn.Cell):
    """fp16 loss scaling with torch.cuda.amp.GradScaler's defaults and rules (what accelerate uses).

    The loss is multiplied by `scale` before the backward pass; the update is skipped when any
    gradient is inf/nan, and then the scale is halved; after `growth_interval` finite updates in a
    row it doubles.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        super().__init__()
        self.scale = Parameter(Tensor(init_scale, ms.float32), name="loss_scale", requires_grad=False)
        self.growth_tracker = Parameter(Tensor(0, ms.int32), name="loss_scale_growth_tracker", requires_grad=False)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval

    def construct(self, finite: Tensor) -> Tensor:
        """Adjust the scale after an update whose gradients were `finite` (a bool scalar)."""
        tracker = ops.select(finite, self.growth_tracker + 1, ops.zeros_like(self.growth_tracker))
        grow = tracker >= self.growth_interval
        scale = ops.select(finite, ops.select(grow, self.scale * self.growth_factor, self.scale),
                           self.scale * self.backoff_factor)
        ops.assign(self.growth_tracker, ops.select(grow, ops.zeros_like(tracker), tracker))
        ops.assign(self.scale, scale)
        return finite


def create_loss_scaler(mixed_precision: str | None) -> DynamicLossScale | None:
    """Dynamic loss scaling for fp16 only: bf16 has fp32's exponent range and fp32 needs none."""
    return DynamicLossScale() if mixed_precision == "fp16" else None
