"""The device policy: what runs where, decided once in one table.

    device family      dtypes           default   attention (fp16/bf16)   RoPE angles   non-affine LayerNorm
    CPU                fp32             fp32      math                    fp64          hand-written backward
    GPU                fp32, fp16       fp16      math                    fp64          MindSpore's kernel
    Ascend A2 (910B)   fp32, bf16, fp16 bf16      flash                   fp32          MindSpore's kernel
    Ascend 910A        fp32, fp16       fp16      math                    fp32          MindSpore's kernel

On the CPU only, broadcasts and head moves are written out and feed-forwards run 1024 tokens at a time
(`index_tables`, `feed_forward_chunk`; backend.layout says why).

Why each cell holds (MindSpore 2.7.1): the CPU has no bf16/fp16 MatMul kernel; the GPU's BiasAdd and
LayerNorm have no bf16 kernel; `flash_attention_score` is documented for Atlas A2 only and 910A's
matmul has no bf16; Ascend's matmul and trig have no fp64 (diffusers too computes RoPE in fp32 on NPUs).
fp32 runs everywhere, but on a card it rarely fits FLUX.1 (see `backend.memory`).

`policy()` answers for the device MindSpore runs on now; `force_device` makes it answer for another
one (tests compile Ascend and GPU branches on the CPU with MS_DEV_PRECOMPILE_ONLY=1). Models read the
policy through `backend.choices`, never the device itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import mindspore as ms

from ..device import get_device, on_device_change

DTYPES = {"fp32": ms.float32, "bf16": ms.bfloat16, "fp16": ms.float16}
_NAMES = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class DevicePolicy:
    """What mindflux does on one device (and Ascend SoC); see the module docstring for the table."""

    device: str                 # "CPU", "GPU" or "Ascend"
    soc: str                    # Ascend SoC version ("Ascend910B1", "Ascend910A", ...); "" elsewhere
    family: str                 # the table row: "CPU", "GPU", "Ascend A2", "Ascend 910A"
    dtypes: tuple[str, ...]     # compute dtypes with kernels for every op mindflux uses
    default_dtype: str          # what training and inference use when not told
    flash_attention: bool       # the fused kernel exists (used for fp16/bf16 inputs only)
    rope_fp64: bool             # rotary angles in fp64 (diffusers' choice where fp64 exists)
    plain_layer_norm: bool      # the hand-written non-affine LayerNorm backward (faster on the CPU)
    refused: tuple[tuple[str, str], ...] = ()   # (dtype, why) for the dtypes this device cannot run
    index_tables: bool = False  # broadcasting ops and Transpose keep per-element index tables (backend.layout)
    feed_forward_chunk: int = 0  # tokens per feed-forward chunk on long sequences; 0: whole (backend.layout)

    @property
    def lazy_inline(self) -> bool:
        """mindspore.lazy_inline (one compiled graph per block class) is documented for Ascend only."""
        return self.device == "Ascend"

    def attention_backend(self, dtype: ms.Type) -> str:
        """"flash" where the fused kernel exists and takes `dtype` (fp16/bf16), else "math"."""
        return "flash" if self.flash_attention and dtype in (ms.float16, ms.bfloat16) else "math"

    def check_dtype(self, dtype: str | ms.Type, option: str = "dtype") -> ms.Type:
        """The MindSpore dtype for `dtype`, or a ValueError naming `option`, the device and why not."""
        name = _NAMES.get(dtype, dtype) if not isinstance(dtype, str) else {"no": "fp32"}.get(dtype, dtype)
        if name not in DTYPES:
            raise ValueError(f"{option} must be one of {', '.join(DTYPES)}; got {dtype!r}")
        if name not in self.dtypes:
            why = dict(self.refused).get(name, "no kernels for it")
            raise ValueError(f"{option} {name} cannot run on {self.family}: {why}. "
                             f"Use {' or '.join(self.dtypes)} there (default {self.default_dtype}).")
        return DTYPES[name]

    @property
    def supports_half_precision(self) -> bool:
        return any(d != "fp32" for d in self.dtypes)


_CPU_HALF = "needs a GPU or Ascend device (MindSpore's CPU backend has no bf16/fp16 MatMul kernels)"
_GPU_BF16 = ("MindSpore 2.7.1's GPU BiasAdd and LayerNorm have no bf16 kernels (every biased Dense and "
             "LayerNorm would fail); use fp16")
_910A_BF16 = "the Ascend 910A's matmul has no bf16; use fp16"

_TABLE = {
    "CPU": DevicePolicy("CPU", "", "CPU", ("fp32",), "fp32", False, True, True,
                        (("bf16", _CPU_HALF), ("fp16", _CPU_HALF)), index_tables=True, feed_forward_chunk=1024),
    "GPU": DevicePolicy("GPU", "", "GPU", ("fp32", "fp16"), "fp16", False, True, False, (("bf16", _GPU_BF16),)),
    "Ascend A2": DevicePolicy("Ascend", "", "Ascend A2", ("fp32", "bf16", "fp16"), "bf16", True, False, False),
    "Ascend 910A": DevicePolicy("Ascend", "", "Ascend 910A", ("fp32", "fp16"), "fp16", False, False, False,
                                (("bf16", _910A_BF16),)),
}


def ascend_family(soc: str) -> str:
    """The table row of an Ascend SoC: Atlas A2/A3 (910B*, 910_93*) have flash attention and bf16;
    anything else (910A, 910ProB, 310P) is treated as 910A: fp16 with the math attention."""
    return "Ascend A2" if not soc or soc.startswith(("Ascend910B", "Ascend910_93")) else "Ascend 910A"


def read_soc_version() -> str:
    """The Ascend SoC MindSpore reports ("" off Ascend, or before the device is set)."""
    try:
        from mindspore._c_expression import MSContext

        return str(MSContext.get_instance().get_ascend_soc_version() or "")
    except Exception:  # noqa: BLE001 - an older or CPU-only build has no SoC query
        return ""


def policy_for(device: str, soc: str = "") -> DevicePolicy:
    """The policy of `device` ("CPU", "GPU", "Ascend"), for `soc` on Ascend."""
    if device == "Ascend":
        return dataclasses.replace(_TABLE[ascend_family(soc)], soc=soc)
    if device not in _TABLE:
        raise ValueError(f"device must be CPU, GPU or Ascend; got {device!r}")
    return _TABLE[device]


_forced: list[tuple[str, str]] = []
_listeners: list[Callable[[], None]] = []


def policy() -> DevicePolicy:
    """The policy of the device in use now (or of the one `force_device` names)."""
    if _forced:
        return policy_for(*_forced[-1])
    device = get_device()
    return policy_for(device, read_soc_version() if device == "Ascend" else "")


def on_policy_change(callback: Callable[[], None]) -> None:
    """Call `callback` whenever the policy may have changed (set_device, force_device)."""
    _listeners.append(callback)


def notify_policy_change() -> None:
    for callback in _listeners:
        callback()


on_device_change(notify_policy_change)


@contextlib.contextmanager
def force_device(device: str, soc: str = "") -> Iterator[DevicePolicy]:
    """Make `policy()` answer for `device` (and `soc`) inside the block, whatever MindSpore runs on.

    For tests: with MS_DEV_PRECOMPILE_ONLY=1 a graph is built and type-checked but not run, so the
    Ascend and GPU branches compile on the CPU. Models alive inside the block switch to its choices.
    """
    _forced.append((device, soc))
    notify_policy_change()
    try:
        yield policy()
    finally:
        _forced.pop()
        notify_policy_change()
