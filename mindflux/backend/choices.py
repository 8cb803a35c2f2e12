"""How models follow the device policy: Cells that make a device choice register here.

A Cell that depends on the device (attention backend, RoPE dtype, LayerNorm kernel) subclasses
`DeviceAware` and implements `apply_policy`. It applies the policy once when built and again whenever
the policy changes (`set_device`, `force_device`), so a model built before `set_device("ascend")` gets
Ascend's choices, whatever Cell (a pipeline, a train step) later compiles it. A graph that was already
compiled keeps the choices it was compiled with; MindSpore cannot change device after it ran anyway.
"""

from __future__ import annotations

import logging
import weakref

from .policy import DevicePolicy, on_policy_change, policy

logger = logging.getLogger(__name__)
_alive: weakref.WeakSet = weakref.WeakSet()
_warned: set[str] = set()


class DeviceAware:
    """Mixin for Cells with a device choice: call `self.follow_policy()` at the end of `__init__`."""

    def apply_policy(self, device_policy: DevicePolicy) -> None:
        raise NotImplementedError

    def follow_policy(self) -> None:
        _alive.add(self)
        self.apply_policy(policy())


def _reapply() -> None:
    current = policy()
    for cell in list(_alive):
        cell.apply_policy(current)


on_policy_change(_reapply)


# diffusers' names for the same two paths (its "flash" is the CUDA flash-attn package; ours is Ascend's kernel)
_ATTENTION_ALIASES = {"math": "math", "native": "math", "_native_math": "math", "flash": "flash",
                      "_native_npu": "flash"}


class AttentionChoice(DeviceAware):
    """An attention Cell: `self.backend` is the policy's choice unless `set_attention_backend` pinned one."""

    attention_override: str | None = None

    def apply_policy(self, device_policy: DevicePolicy) -> None:
        chosen = "flash" if device_policy.flash_attention else "math"
        if self.attention_override == "flash" and not device_policy.flash_attention:
            if device_policy.family not in _warned:  # once, not once per attention layer
                _warned.add(device_policy.family)
                logger.warning("attention backend 'flash' was set, but %s has no flash attention kernel: using "
                               "'math'", device_policy.family)
        elif self.attention_override is not None:
            chosen = self.attention_override
        self.backend = chosen


def set_attention_backend(model, backend: str | None) -> None:
    """Pin the attention of every attention Cell in `model` to `backend` ("math" or "flash"; diffusers'
    "native" / "_native_npu" are accepted too), or follow the policy again with None."""
    name = None if backend is None else _ATTENTION_ALIASES.get(backend)
    if backend is not None and name is None:
        raise ValueError(f"attention backend must be one of {', '.join(_ATTENTION_ALIASES)}; got {backend!r}")
    current = policy()
    if name == "flash" and not current.flash_attention:
        raise ValueError(f"attention backend {backend!r} needs Ascend's flash_attention_score, which exists on "
                         f"Atlas A2 (910B) only; this device is {current.family}: use 'math'")
    for _, cell in model.cells_and_names():
        if isinstance(cell, AttentionChoice):
            cell.attention_override = name
            cell.apply_policy(current)
