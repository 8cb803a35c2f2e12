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
from dataclasses import asdict, dataclass, field, fields, replace

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn
from mindspore.common.initializer import HeUniform, Normal, initializer
from mindspore.nn.utils import no_init_parameters

# PEFT LoraConfig fields that do not change what a loaded adapter computes (bookkeeping, or
# initialisation that a file's weights replace); accepted in metadata and dropped.
_IGNORED_PEFT_FIELDS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "layers_to_transform", "layers_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "runtime_config", "qalora_group_size", "peft_version",
})
# PEFT initialisations that also rewrite the base weights (a saved adapter needs that changed base).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora-ga", "lora_ga")
# PEFT features that change the computation and that LoraLinear does not implement, with the value that is harmless.
_UNSUPPORTED_PEFT_FIELDS = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "bias": "none",
                            "modules_to_save": None}


def get_pattern_key(pattern_keys, module_name: str) -> str | None:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that, as a regex, matches the
    module name or a dotted suffix of it (`"^name"` pins the whole name)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


@dataclass
class LoraConfig:
    """PEFT's LoraConfig fields that LoRA on linear layers uses.

    target_modules: a list of module names or name suffixes (`"to_q"` matches every
    `...attn.to_q`, `"attn.to_out.0"` a longer suffix), or one regex matched against the whole
    module name. init_lora_weights: True (A kaiming-uniform, B zero: PEFT's default),
    "gaussian" (A normal with std 1/r, B zero) or False (A and B as a fresh linear layer's
    weights: the adapter is not a no-op at start). rank_pattern / alpha_pattern: per-module
    r and lora_alpha, keyed by PEFT's patterns (see `get_pattern_key`).
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    exclude_modules: list[str] | str | None = field(default=None)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian'; got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, (tuple, set, frozenset)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (tuple, set, frozenset)):
            self.exclude_modules = sorted(self.exclude_modules)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def matches(self, module_name: str) -> bool:
        """PEFT's rule: a regex string must match the whole name; list items match the name or
        a dotted suffix of it."""
        if _name_matches(self.exclude_modules or [], module_name):
            return False
        if self.target_modules is None:
            raise ValueError("LoraConfig.target_modules is required (e.g. ['to_q', 'to_k', 'to_v', 'to_out.0'])")
        return _name_matches(self.target_modules, module_name)

    def for_module(self, module_name: str) -> LoraConfig:
        """This config with r and lora_alpha resolved for one module (rank_pattern / alpha_pattern applied)."""
        r_key = get_pattern_key(self.rank_pattern, module_name)
        alpha_key = get_pattern_key(self.alpha_pattern, module_name)
        return replace(self, r=int(self.rank_pattern[r_key]) if r_key is not None else self.r,
                       lora_alpha=self.alpha_pattern[alpha_key] if alpha_key is not None else self.lora_alpha,
                       rank_pattern={}, alpha_pattern={})

    def to_dict(self) -> dict:
        """The fields as PEFT's LoraConfig(**d) accepts them (diffusers' `lora_adapter_metadata`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> LoraConfig:
        """A LoraConfig from PEFT's to_dict() (e.g. diffusers' `lora_adapter_metadata`).

        Fields that change the computation and are not implemented here (DoRA, LoRA biases, ...)
        raise; bookkeeping fields are dropped.
        """
        config = dict(config)
        for name, harmless in _UNSUPPORTED_PEFT_FIELDS.items():
            value = config.pop(name, harmless)
            if value not in (harmless, None, [], {}):
                raise ValueError(f"LoRA config has {name}={value!r}, which mindflux does not support "
                                 f"(only plain LoRA on linear layers)")
        known = {f.name for f in fields(cls)}
        # Fields of newer PEFT versions are fine while off; switched on, they would change the numbers.
        active = sorted(k for k, v in config.items() if k not in known and k not in _IGNORED_PEFT_FIELDS and v)
        if active:
            raise ValueError(f"LoRA config sets {active}, which mindflux does not support "
                             f"(only plain LoRA on linear layers)")
        kwargs = {k: v for k, v in config.items() if k in known}
        init = kwargs.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise ValueError(f"LoRA config has init_lora_weights={init!r}: such an adapter belongs to a base model "
                             f"that its initialisation changed; convert it to a plain LoRA with PEFT "
                             f"(path_initial_model_for_weight_conversion) first")
        if init not in (True, False, "gaussian"):
            # Other PEFT initialisations only decide the starting point; loaded weights replace it.
            kwargs["init_lora_weights"] = True
        return cls(**kwargs)


def _name_matches(patterns: list[str] | str, module_name: str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module_name) is not None
    return any(module_name == p or module_name.endswith(f".{p}") for p in patterns)


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

    def to_dense(self) -> nn.Dense:
        """A plain nn.Dense sharing this layer's base weight and bias (what unload_lora puts back)."""
        with no_init_parameters():
            dense = nn.Dense(self.in_channels, self.out_channels, has_bias=self.has_bias)
        dense.weight = self.weight
        if self.has_bias:
            dense.bias = self.bias
        return dense

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

    def merged_weight(self, scalings: dict[str, float]) -> np.ndarray:
        """W + sum s_a B_a A_a in fp32, (out, in)."""
        merged = self.weight.astype(ms.float32).asnumpy()
        for name, scale in scalings.items():
            merged = merged + scale * self.delta_weight(name)
        return merged

    def merge(self, scalings: dict[str, float]) -> None:
        """W += sum s_a B_a A_a, computed in fp32; the original W is kept so unmerge() is exact."""
        if self._unmerged_weight is None:
            self._unmerged_weight = self.weight.astype(ms.float32).asnumpy()
        merged = self.merged_weight(scalings)
        self.merged_adapters.extend(scalings)
        self.weight.set_data(Tensor(merged.astype(np.float32)).astype(self.weight.dtype))

    def unmerge(self) -> None:
        if self._unmerged_weight is not None:
            self.weight.set_data(Tensor(self._unmerged_weight).astype(self.weight.dtype))
        self._unmerged_weight = None
        self.merged_adapters = []

    def construct(self, x: Tensor) -> Tensor:
        out = super().construct(x)
        for name in self.active_adapters:
            # Scaling the rank-r activations instead is ~3% faster on the CPU, but MindSpore 2.7.1's graph mode
            # reports a graph cycle for it under recompute (test_graph_mode_step_matches).
            delta = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))
            out = out + (delta * self.lora_scaling[self.adapter_index[name]]).astype(out.dtype)
        return out
