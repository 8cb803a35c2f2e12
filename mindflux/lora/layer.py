"""LoRA layers: LoraConfig and LoraLinear, PEFT's semantics on MindSpore's nn.Dense.

A targeted nn.Dense is swapped for a LoraLinear that keeps the same `weight` and `bias`
Parameters (so the base names do not change) and adds, per adapter name,
`lora_A.<name>.weight` (r, in) and `lora_B.<name>.weight` (out, r):

    y = W x + b + sum over active adapters a of  scaling[a] * B_a A_a dropout(x)

scaling[a] = adapter weight * global scale * lora_alpha / r (or / sqrt(r) with use_rslora). The
scalings live in a non-trainable Parameter, so set_adapters(weights) and
joint_attention_kwargs={"scale": s} change numbers without recompiling a graph. Adding,
removing, enabling or fusing adapters changes the graph's structure; the mixin then asks for
recompilation.

Precision: LoRA parameters stay fp32 (the optimizer updates them in full precision) while the
layer computes in the base weight's dtype, via to_float on the adapter cells.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn
from mindspore.common.initializer import HeUniform, Normal, initializer
from mindspore.nn.utils import no_init_parameters


@dataclass
class LoraConfig:
    """PEFT's LoraConfig fields that LoRA on linear layers uses.

    target_modules: a list of module names or name suffixes (`"to_q"` matches every
    `...attn.to_q`, `"attn.to_out.0"` a longer suffix), or one regex matched against the whole
    module name. init_lora_weights: True (A kaiming-uniform, B zero: PEFT's default),
    "gaussian" (A normal with std 1/r, B zero) or False (A and B random: the adapter is not a
    no-op at start).
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    exclude_modules: list[str] | None = field(default=None)

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian'; got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def matches(self, module_name: str) -> bool:
        """PEFT's rule: a regex string must match the whole name; list items match the name or
        a dotted suffix of it."""
        excluded = self.exclude_modules or []
        if any(module_name == m or module_name.endswith(f".{m}") for m in excluded):
            return False
        targets = self.target_modules
        if targets is None:
            raise ValueError("LoraConfig.target_modules is required (e.g. ['to_q', 'to_k', 'to_v', 'to_out.0'])")
        if isinstance(targets, str):
            return re.fullmatch(targets, module_name) is not None
        return any(module_name == t or module_name.endswith(f".{t}") for t in targets)

    def to_dict(self) -> dict:
        return asdict(self)


class LoraLinear(nn.Dense):
    """nn.Dense with named low-rank adapters; built from an existing nn.Dense, sharing its Parameters."""

    def __init__(self, base: nn.Dense):
        with no_init_parameters():  # the base layer's parameters are reused below
            super().__init__(base.in_channels, base.out_channels, has_bias=base.has_bias)
        self.weight = base.weight
        if base.has_bias:
            self.bias = base.bias
        self.lora_A = nn.CellDict()
        self.lora_B = nn.CellDict()
        self.lora_dropout = nn.CellDict()
        self.lora_scaling = Parameter(Tensor(np.zeros(0, np.float32)), name="lora_scaling", requires_grad=False)
        self.adapter_config: dict[str, LoraConfig] = {}
        self.adapter_index: dict[str, int] = {}
        self.active_adapters: list[str] = []  # python list: part of the compiled graph's structure
        self.merged_adapters: list[str] = []
        self._unmerged_weight: np.ndarray | None = None

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        r = config.r
        a = nn.Dense(self.in_channels, r, has_bias=False)
        b = nn.Dense(r, self.out_channels, has_bias=False)
        if config.init_lora_weights is True:
            a.weight.set_data(initializer(HeUniform(math.sqrt(5)), (r, self.in_channels), ms.float32))
        elif config.init_lora_weights == "gaussian":
            a.weight.set_data(initializer(Normal(1.0 / r), (r, self.in_channels), ms.float32))
        if config.init_lora_weights is not False:
            b.weight.set_data(initializer("zeros", (self.out_channels, r), ms.float32))
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.lora_dropout[name] = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.adapter_config[name] = config
        self._reindex()
        self.sync_compute_dtype()

    def delete_adapter(self, name: str) -> None:
        for cells in (self.lora_A, self.lora_B, self.lora_dropout):
            del cells[name]
        del self.adapter_config[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self._reindex()

    def _reindex(self) -> None:
        self.adapter_index = {n: i for i, n in enumerate(self.adapter_config)}
        self.lora_scaling = Parameter(Tensor(np.zeros(len(self.adapter_index), np.float32)), name="lora_scaling",
                                      requires_grad=False)

    def set_scalings(self, scalings: dict[str, float]) -> None:
        """Per-adapter output multipliers (adapter weight x global scale x alpha/r); data only."""
        values = np.zeros(len(self.adapter_index), np.float32)
        for name, value in scalings.items():
            values[self.adapter_index[name]] = value
        self.lora_scaling.set_data(Tensor(values))

    def sync_compute_dtype(self) -> None:
        """Adapters keep fp32 parameters and compute in the base weight's dtype."""
        dtype = self.weight.dtype
        for name in self.adapter_config:
            self.lora_A[name].to_float(dtype)
            self.lora_B[name].to_float(dtype)

    def delta_weight(self, name: str) -> np.ndarray:
        """B A in fp32, (out, in): what the adapter adds to W at scaling 1."""
        return self.lora_B[name].weight.asnumpy() @ self.lora_A[name].weight.asnumpy()

    def merge(self, scalings: dict[str, float]) -> None:
        """W += sum s_a B_a A_a, computed in fp32; the original W is kept so unmerge() is exact."""
        if self._unmerged_weight is None:
            self._unmerged_weight = self.weight.astype(ms.float32).asnumpy()
        merged = self.weight.astype(ms.float32).asnumpy()
        for name, scale in scalings.items():
            merged = merged + scale * self.delta_weight(name)
            self.merged_adapters.append(name)
        self.weight.set_data(Tensor(merged.astype(np.float32)).astype(self.weight.dtype))

    def unmerge(self) -> None:
        if self._unmerged_weight is not None:
            self.weight.set_data(Tensor(self._unmerged_weight).astype(self.weight.dtype))
        self._unmerged_weight = None
        self.merged_adapters = []

    def construct(self, x: Tensor) -> Tensor:
        out = super().construct(x)
        for name in self.active_adapters:
            delta = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))
            out = out + (delta * self.lora_scaling[self.adapter_index[name]]).astype(out.dtype)
        return out
