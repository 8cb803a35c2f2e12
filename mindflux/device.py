"""The one place that picks the device (CPU / GPU / Ascend) and the execution mode (graph / PyNative).

What runs on the chosen device (dtypes, attention kernel, ...) is `mindflux.backend.policy()`'s business.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import mindspore as ms

logger = logging.getLogger(__name__)

_MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
_listeners: list[Callable[[], None]] = []

_INSTALL_HINT = {
    "Ascend": "install the Ascend driver and CANN, `source /usr/local/Ascend/ascend-toolkit/set_env.sh`, and "
              "MindSpore 2.7.1 built for that CANN (https://www.mindspore.cn/install); see docs/install.md",
    "GPU": "MindSpore 2.7.1's GPU plugins need CUDA 11.1 or 11.6 with cuDNN 8.0 / 8.5 on LD_LIBRARY_PATH (no "
           "CUDA 12; Hopper GPUs need CUDA >= 11.8, which this wheel lacks); see docs/install.md",
}


class DeviceNotAvailableError(OSError):
    """The device asked for cannot be used here; the message says what is missing and how to install it.
    An OSError (EnvironmentError): the scripts report it in one line, like a missing file."""


def _plugin_available(device: str) -> bool:
    # MindSpore loads its device plugins at import time and remembers which loaded; asking the
    # public `is_available()` instead logs a warning for every missing one.
    from mindspore._c_expression import MSContext

    return bool(MSContext.get_instance().is_pkg_support_device(device))


def _hardware_present(device: str) -> str | None:
    """Evidence that the hardware (its driver) is on this machine, whether or not MindSpore can use it."""
    probes = {"Ascend": ("/dev/davinci0", "/usr/local/Ascend/driver"),
              "GPU": ("/proc/driver/nvidia/version", "/dev/nvidia0")}
    return next((p for p in probes[device] if Path(p).exists()), None)


def unavailable_reason(device: str) -> str:
    """Why MindSpore cannot use `device` ("GPU" or "Ascend") here, and how to fix it."""
    evidence = _hardware_present(device)
    found = (f"the {device} driver is present ({evidence}) but MindSpore {ms.__version__} could not load its "
             f"{device} plugin" if evidence else f"no {device} was found on this machine (no driver)")
    return f"{found}: {_INSTALL_HINT[device]}"


def gpu_support_warning(capability: tuple[int, int], name: str = "this GPU") -> str | None:
    """Why a GPU whose plugin loaded may still fail: MindSpore 2.7.1's GPU kernels are built with CUDA 11.1 /
    11.6, whose newest targets are sm_86 (Ampere); Ada (sm_89) and Hopper (sm_90) need CUDA >= 11.8."""
    if tuple(capability) <= (8, 6):
        return None
    return (f"{name} is sm_{capability[0]}{capability[1]}, but MindSpore {ms.__version__}'s GPU plugins are built "
            "for CUDA 11.1 / 11.6 (up to sm_86); this GPU needs CUDA >= 11.8: kernels may fail to launch. "
            "See docs/install.md's hardware table.")


def _check_gpu(device_id: int) -> None:
    try:
        capability = ms.hal.get_device_capability(device_id)
        name = ms.hal.get_device_name(device_id)
    except Exception:  # noqa: BLE001 - the query is advisory; the plugin itself loaded
        return
    warning = gpu_support_warning(tuple(capability), name)
    if warning:
        logger.warning(warning)


def resolve_device(device: str = "auto") -> str:
    """Turn "auto" / "cpu" / "gpu" / "ascend" / "npu" into MindSpore's device name.

    "auto" takes Ascend, then GPU, then the CPU; it warns when a card's driver is present but MindSpore
    cannot use it (rather than falling back to the CPU without a word). A named device that MindSpore
    cannot load raises DeviceNotAvailableError saying what is missing.
    """
    name = (device or "auto").strip()
    if name.lower() == "auto":
        for candidate in ("Ascend", "GPU"):
            if _plugin_available(candidate):
                return candidate
        for candidate in ("Ascend", "GPU"):
            if _hardware_present(candidate):
                logger.warning("running on the CPU: %s", unavailable_reason(candidate))
        return "CPU"
    aliases = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU", "ascend": "Ascend", "npu": "Ascend"}
    if name.lower() not in aliases:
        raise ValueError(f"device must be one of auto, cpu, gpu, ascend; got {device!r}")
    target = aliases[name.lower()]
    if target != "CPU" and not _plugin_available(target):
        raise DeviceNotAvailableError(f"--device {name}: {unavailable_reason(target)}")
    return target


def on_device_change(callback: Callable[[], None]) -> None:
    """Call `callback` after every `set_device` (the device policy re-applies itself to live models)."""
    _listeners.append(callback)


def set_device(device: str = "auto", mode: str = "graph", device_id: int | None = None) -> str:
    """Select the device and execution mode for everything that runs afterwards.

    `device` is "auto" (Ascend, then GPU, then CPU), "cpu", "gpu" or "ascend"; `mode` is "graph"
    (whole `construct` compiled once, then reused) or "pynative" (op by op, for debugging).
    Under msrun, the device id comes from the launcher's DEVICE_ID / LOCAL_RANK.
    Returns the device name that is now in use. Models built earlier follow the new device's policy.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be 'graph' or 'pynative'; got {mode!r}")
    target = resolve_device(device)
    if device_id is None:
        device_id = int(os.environ.get("DEVICE_ID", os.environ.get("LOCAL_RANK", 0)))
    if target == "CPU":
        ms.set_device(target)
    else:
        ms.set_device(target, device_id)
    if target == "GPU":
        _check_gpu(device_id)
    # Graph mode compiles at MindSpore's default jit level (O0, kernel by kernel, on Atlas A2), which
    # supports every op mindflux uses; a Cell can opt into fusion with Cell.set_jit_config(JitConfig("O1")).
    ms.set_context(mode=_MODES[mode])
    for callback in _listeners:
        callback()
    return target


def get_device() -> str:
    """The device MindSpore runs on now: "CPU", "GPU" or "Ascend"."""
    return ms.get_context("device_target")


def get_mode() -> str:
    return "graph" if ms.get_context("mode") == ms.GRAPH_MODE else "pynative"


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
