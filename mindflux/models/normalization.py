"""Normalization layers with diffusers' parameter names (`weight` / `bias`, not MindSpore's gamma/beta)."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from ..backend import DeviceAware, DevicePolicy, PlainLayerNorm, expand_as


class LayerNorm(DeviceAware, nn.Cell):
    """LayerNorm over the last axis, optionally affine (then `weight` and `bias`, as torch names them).

    Non-affine, it uses the policy's kernel: on the CPU one with a hand-written backward (`PlainLayerNorm`).
    """

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        self.plain = PlainLayerNorm(dim, eps) if not elementwise_affine else None
        self.use_plain = False
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = Parameter(initializer("ones", (dim,), ms.float32))
            self.bias = Parameter(initializer("zeros", (dim,), ms.float32)) if bias else None
        else:
            self.weight = self.bias = None
        # The primitive always takes gamma/beta; without affine they are these constants.
        self._ones = Tensor(np.ones(dim, np.float32))
        self._zeros = Tensor(np.zeros(dim, np.float32))
        self.follow_policy()

    def apply_policy(self, device_policy: DevicePolicy) -> None:
        self.use_plain = self.plain is not None and device_policy.plain_layer_norm

    def construct(self, x: Tensor) -> Tensor:
        if self.use_plain:
            return self.plain(x)[0]
        gamma = self.weight if self.weight is not None else self._ones
        beta = self.bias if self.bias is not None else self._zeros
        return self.layer_norm(x, gamma.astype(x.dtype), beta.astype(x.dtype))[0]


class RMSNorm(nn.Cell):
    """x / rms(x) * weight, computed in fp32 and cast back as diffusers does."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(initializer("ones", (dim,), ms.float32)) if elementwise_affine else None

    def construct(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.astype(ms.float32) if dtype != ms.float32 else x
        h = h * expand_as(ops.rsqrt(ops.mean(ops.square(h), -1, keep_dims=True) + self.eps), h)
        if self.weight is None:
            return h.astype(dtype)
        if self.weight.dtype in (ms.float16, ms.bfloat16):
            return h.astype(self.weight.dtype) * expand_as(self.weight, h)
        return (h * expand_as(self.weight, h)).astype(dtype)


def modulate(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """x * (1 + scale) + shift for x (B, S, dim) and per-sample modulations (B, dim)."""
    return x * expand_as(1 + scale[:, None], x) + expand_as(shift[:, None], x)


class AdaLayerNormZero(nn.Cell):
    """Modulated LayerNorm of a double block: linear(silu(emb)) gives shift/scale/gate for attention and MLP.

    Returns (normed x, gate_msa, shift_mlp, scale_mlp, gate_mlp), each modulation (B, dim).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Dense(dim, 6 * dim)
        self.norm = LayerNorm(dim, eps=1e-6, elementwise_affine=False)

    def construct(self, x: Tensor, emb: Tensor):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ops.chunk(self.linear(ops.silu(emb)), 6, 1)
        return modulate(self.norm(x), scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nn.Cell):
    """Modulated LayerNorm of a single block: returns (normed x, gate), gate (B, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Dense(dim, 3 * dim)
        self.norm = LayerNorm(dim, eps=1e-6, elementwise_affine=False)

    def construct(self, x: Tensor, emb: Tensor):
        shift, scale, gate = ops.chunk(self.linear(ops.silu(emb)), 3, 1)
        return modulate(self.norm(x), scale, shift), gate


class AdaLayerNormContinuous(nn.Cell):
    """The output norm: linear(silu(cond)) gives (scale, shift), in that order (BFL's is shift, scale)."""

    def __init__(self, dim: int, conditioning_dim: int, eps: float = 1e-6):
        super().__init__()
        self.linear = nn.Dense(conditioning_dim, 2 * dim)
        self.norm = LayerNorm(dim, eps=eps, elementwise_affine=False)

    def construct(self, x: Tensor, conditioning: Tensor) -> Tensor:
        scale, shift = ops.chunk(self.linear(ops.silu(conditioning).astype(x.dtype)), 2, 1)
        return modulate(self.norm(x), scale, shift)


class GroupNorm(nn.Cell):
    """GroupNorm over (B, C, ...) with torch's `weight` / `bias` names, computed in fp32 for half inputs
    (torch's GroupNorm keeps fp32 statistics too). `ops.group_norm` has CPU, GPU and Ascend kernels."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        if affine:
            self.weight = Parameter(initializer("ones", (num_channels,), ms.float32))
            self.bias = Parameter(initializer("zeros", (num_channels,), ms.float32))
        else:
            self.weight = self.bias = None
        self._ones = Tensor(np.ones(num_channels, np.float32))
        self._zeros = Tensor(np.zeros(num_channels, np.float32))

    def construct(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        gamma = self.weight.astype(ms.float32) if self.weight is not None else self._ones
        beta = self.bias.astype(ms.float32) if self.bias is not None else self._zeros
        out = ops.group_norm(x.astype(ms.float32), self.num_groups, gamma, beta, self.eps)
        return out.astype(dtype)
