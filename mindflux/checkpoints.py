"""Weight files as (name, array) one tensor at a time, whatever they store: safetensors in F32/F16/BF16,
fp8 (plain or "scaled"), and GGUF files of any type the `gguf` package dequantises.

fp8 (F8_E4M3, F8_E5M2) is widened to fp32 with ml_dtypes. A "scaled fp8" file (ComfyUI's) stores
each weight as fp8 of weight / scale with `<module>.scale_weight` beside it (one number, or one per
output row); the weight read here is fp8 x scale. `scale_input` (an activation scale for fp8
matmuls) and the `scaled_fp8` marker carry no weight and are skipped.

GGUF tensors (Q8_0, Q4_0 ... Q6_K, BF16, F16, F32) are dequantised by the `gguf` package to fp32 at
load: a quantised file saves disk and download, not memory, until a quantised matmul exists.
"""

from __future__ import annotations

import os

import numpy as np

from .safetensors_io import FP8_DTYPES, SafetensorsFile, fp8_bits_to_float32

# Keys of scaled-fp8 files that are not weights of the model.
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")
_SCALED_MARKER = "scaled_fp8"
GGUF_MAGIC = b"GGUF"


class SafetensorsCheckpoint:
    """A safetensors file whose fp8 tensors come out widened to fp32 (and scaled, in scaled-fp8 files)."""

    def __init__(self, path: str):
        self.st = SafetensorsFile(path)
        self.path = self.st.path
        names = self.st.keys()
        self._scales = {n[: -len(".scale_weight")]: n for n in names if n.endswith(".scale_weight")}
        self._keys = [n for n in names if not n.endswith(_SCALE_SUFFIXES) and n.rpartition(".")[2] != _SCALED_MARKER]

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.st.shape(name)

    def get(self, name: str) -> tuple[np.ndarray, str]:
        """(array, storage dtype): F32/F16/BF16 as stored (BF16 as bits), fp8 as fp32 x its scale."""
        array, dtype = self.st.get(name)
        module, _, param = name.rpartition(".")
        scale_key = self._scales.get(module) if param == "weight" else None
        if dtype not in FP8_DTYPES and scale_key is None:
            return array, dtype
        values = fp8_bits_to_float32(array, dtype) if dtype in FP8_DTYPES else self.st.get_float32(name)
        if scale_key is not None:
            values = values * _broadcast_scale(self.st.get_float32(scale_key), values, scale_key)
        return values, "F32"

    def release(self, name: str) -> None:
        """Drop `name`'s file pages from resident memory once copied (SafetensorsFile.release)."""
        self.st.release(name)


def _broadcast_scale(scale: np.ndarray, values: np.ndarray, key: str) -> np.ndarray:
    if scale.size == 1:
        return np.float32(scale.reshape(-1)[0])
    if values.ndim and scale.size == values.shape[0]:  # one scale per output row
        return scale.reshape((-1,) + (1,) * (values.ndim - 1))
    raise ValueError(f"{key} has shape {scale.shape}, which does not scale a weight of shape {values.shape}")


class GGUFCheckpoint:
    """A GGUF file read with the `gguf` package; every tensor comes out as fp32 (F16 as stored)."""

    def __init__(self, path: str):
        try:
            import gguf
        except ImportError:
            raise ImportError(f"{path} is a GGUF file; reading it needs the gguf package: pip install gguf") from None
        self._gguf = gguf
        self.path = str(path)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError) as err:
            raise ValueError(f"{self.path} is not a readable GGUF file: {err}") from None
        self._tensors = {t.name: t for t in self._reader.tensors}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest first (ggml's ne); numpy's order is the reverse
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def quant_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def get(self, name: str) -> tuple[np.ndarray, str]:
        tensor = self._tensors[name]
        kind = tensor.tensor_type
        types = self._gguf.GGMLQuantizationType
        if kind in (types.F32, types.F16):
            array = np.asarray(tensor.data).reshape(self.shape(name))
            return array, "F32" if kind == types.F32 else "F16"
        try:
            values = self._gguf.quants.dequantize(tensor.data, kind)
        except NotImplementedError:
            raise ValueError(f"{self.path}: tensor {name!r} is {kind.name}, which the gguf package cannot "
                             "dequantise") from None
        return np.asarray(values, np.float32).reshape(self.shape(name)), "F32"

    def release(self, name: str) -> None:
        """Nothing to drop: the gguf reader's arrays are read per call."""


def is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def open_checkpoint(path: str) -> SafetensorsCheckpoint | GGUFCheckpoint:
    """The reader for a weights file: GGUF by its magic bytes, safetensors otherwise."""
    path = os.fspath(path)
    return GGUFCheckpoint(path) if is_gguf(path) else SafetensorsCheckpoint(path)


__all__ = ["GGUFCheckpoint", "SafetensorsCheckpoint", "is_gguf", "open_checkpoint"]
