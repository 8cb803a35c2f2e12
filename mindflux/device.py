"""The one place that picks the device (CPU / GPU / Ascend) and the execution mode (graph / PyNative)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import mindspore as ms

_DEVICES = ("CPU", "GPU", "Ascend")
_MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


def _plugin_available(device: str) -> bool:
    # MindSpore loads its device plugins at import time and remembers which loaded; asking the
    # public `is_available()` instead logs a warning for every missing one.
    from mindspore._c_expression import MSContext

    return bool(MSContext.get_instance().is_pkg_support_device(device))


def resolve_device(device: str = "auto") -> str:
    """Turn "auto" / "cpu" / "gpu" / "ascend" / "npu" into MindSpore's device name."""
    name = (device or "auto").strip()
    if name.lower() == "auto":
        for candidate in ("Ascend", "GPU"):
            if _plugin_available(candidate):
                return candidate
        return "CPU"
    aliases = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU", "ascend": "Ascend", "npu": "Ascend"}
    if name.lower() not in aliases:
        raise ValueError(f"device must be one of auto, cpu, gpu, ascend; got {device!r}")
    return aliases[name.lower()]


def set_device(device: str = "auto", mode: str = "graph", device_id: int | None = None) -> str:
    """Select the device and execution mode for everything that runs afterwards.

    `device` is "auto" (Ascend, then GPU, then CPU), "cpu", "gpu" or "ascend"; `mode` is "graph"
    (whole `construct` compiled once, then reused) or "pynative" (op by op, for debugging).
    Under msrun, the device id comes from the launcher's DEVICE_ID / LOCAL_RANK.
    Returns the device name that is now in use.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be 'graph' or 'pynative'; got {mode!r}")
    target = resolve_device(device)
    if target != "CPU" and not _plugin_available(target):
        raise RuntimeError(f"device {target} was asked for, but MindSpore could not load its plugin on this machine")
    if device_id is None:
        device_id = int(os.environ.get("DEVICE_ID", os.environ.get("LOCAL_RANK", 0)))
    if target == "CPU":
        ms.set_device(target)
    else:
        ms.set_device(target, device_id)
    ms.set_context(mode=_MODES[mode])
    if target == "Ascend" and mode == "graph":
        # O0 keeps kernel-by-kernel execution inside the compiled graph, which supports every op
        # we use; O1/O2 fusion is opt-in via MS_JIT_LEVEL.
        ms.set_context(jit_config={"jit_level": os.environ.get("MS_JIT_LEVEL", "O0")})
    return target


def get_device() -> str:
    """The device MindSpore runs on now: "CPU", "GPU" or "Ascend"."""
    return ms.get_context("device_target")


def get_mode() -> str:
    return "graph" if ms.get_context("mode") == ms.GRAPH_MODE else "pynative"


def supports_half_precision_matmul() -> bool:
    """The CPU backend has no bf16/fp16 MatMul kernels, so half precision is GPU/Ascend only."""
    return get_device() != "CPU"


@contextlib.contextmanager
def pynative() -> Iterator[None]:
    """Run the enclosed Cells op by op, then restore the mode. MindSpore (2.7) keeps the weights of a Cell
    compiled in graph mode alive after the Cell is gone, so models that are to be released (text encoders,
    a pipeline used once) must not be compiled."""
    mode = ms.get_context("mode")
    if mode != ms.PYNATIVE_MODE:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        if mode != ms.PYNATIVE_MODE:
            ms.set_context(mode=mode)
