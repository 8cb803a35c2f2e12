"""Activations written from elementwise ops where MindSpore's fused kernel is slow or missing."""

from __future__ import annotations

import math

from mindspore import Tensor, ops

_TWO_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU, tanh approximation (torch's approximate="tanh", transformers' gelu_new).

    Written out because MindSpore's GeLU kernel took 37 ms on a (1152, 2048) fp32 tensor on the
    CPU where these elementwise ops take 7 ms. 0.5 x (1 + tanh(u)) is written as x sigmoid(2u),
    the same function: MindSpore's CPU tanh is off by up to 1e-4 (absolute) and its gradient
    followed, which put 2e-4 relative errors into LoRA gradients; sigmoid is accurate to 1e-6.
    """
    return x * ops.sigmoid(_TWO_SQRT_2_OVER_PI * (x + 0.044715 * (x * x * x)))
