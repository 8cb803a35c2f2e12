"""Device runtime helpers that differ by device: wait for queued work, free cached memory, memory figures.

These act on the device MindSpore really runs on (a policy forced for a compile test changes nothing here).
"""

from __future__ import annotations

import mindspore as ms

from ..device import get_device


def synchronize() -> None:
    """Wait for the device to finish queued work, so that wall-clock timings mean something."""
    if get_device() != "CPU":
        ms.runtime.synchronize()


def empty_cache() -> None:
    """Give the memory MindSpore's pool holds for freed tensors back to the device (no-op on the CPU)."""
    if get_device() != "CPU":
        ms.runtime.empty_cache()


def peak_device_memory_gib() -> float | None:
    """Peak device memory allocated by this process in GiB; None on the CPU (see the host's RSS there)."""
    if get_device() == "CPU":
        return None
    return ms.runtime.max_memory_allocated() / 1024**3


def device_memory_gib(device_id: int = 0) -> float | None:
    """Total memory of the card in GiB, or None when it cannot be read (the CPU, a forced policy)."""
    if get_device() == "CPU":
        return None
    try:
        return ms.hal.get_device_properties(device_id).total_memory / 1024**3
    except Exception:  # noqa: BLE001 - a plugin without the query: the caller skips its check
        return None



def allow_tf32() -> bool:
    """TF32 matmuls and convolutions on NVIDIA GPUs (diffusers' --allow_tf32); False (nothing done) elsewhere."""
    if get_device() != "GPU":
        return False
    from mindspore.device_context.gpu import op_precision  # the API that replaces set_context(gpu_config=...)

    op_precision.matmul_allow_tf32(True)
    op_precision.conv_allow_tf32(True)
    return True
