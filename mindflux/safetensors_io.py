"""Reading and writing .safetensors files, BF16 included, one tensor at a time.

The `safetensors` package's numpy backend cannot return BF16 (numpy has no such dtype), and
FLUX.1 ships BF16. The format is small: an 8-byte little-endian header length, a JSON header
mapping names to dtype/shape/byte range, then the raw bytes. Reading memory-maps the file, so
only the tensor being converted is resident; BF16 is carried as its uint16 bit pattern.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from typing import Callable

import numpy as np

# safetensors dtype name -> numpy storage dtype ("BF16" is stored as raw uint16 bits)
_NP_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": np.uint8,  # fp8 is carried as its bit pattern too; fp8_bits_to_float32 widens it
    "F8_E5M2": np.uint8,
}
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file; the message names the file."""


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """BF16 is the upper half of an fp32, so widening is a shift and exact."""
    # uint32 throughout and via 1-d: numpy turns 0-d results into scalars (and `<< 16` into int64).
    widened = np.asarray(np.left_shift(np.asarray(bits, np.uint32), np.uint32(16)))
    return widened.reshape(-1).view(np.float32).reshape(widened.shape)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even from fp32 to BF16 bits (what torch's .bfloat16() does); NaN stays NaN."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def fp8_bits_to_float32(bits: np.ndarray, dtype: str) -> np.ndarray:
    """F8_E4M3 (torch's float8_e4m3fn: no infinities) or F8_E5M2 bits widened to fp32, exactly (ml_dtypes)."""
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError(f"reading {dtype} (fp8) weights needs the ml_dtypes package: pip install ml_dtypes") from None
    fp8 = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}[dtype]
    return np.ascontiguousarray(bits, np.uint8).view(fp8).astype(np.float32)


# 16-bit float dtype -> (|bits| mask, lowest |bits| that is inf or NaN); numpy has no BF16 and is slow on F16,
# so their stored bits are checked directly (no widening)
_NON_FINITE_BITS = {"F16": (0x7FFF, 0x7C00), "BF16": (0x7FFF, 0x7F80)}
_CHUNK = 1 << 18  # elements per pass: the temporaries stay in cache (about 1 G elements/s on one core)


def has_non_finite(array: np.ndarray, dtype: str) -> bool:
    """Whether a stored tensor of safetensors dtype `dtype` holds NaN or inf."""
    if dtype not in ("F64", "F32", "F16", "BF16") or array.size == 0:
        return False
    flat = array.reshape(-1)
    if dtype in _NON_FINITE_BITS:
        mask, first = _NON_FINITE_BITS[dtype]
        flat = flat.view(np.uint16)
        tmp = np.empty(min(_CHUNK, flat.size), np.uint16)
        for start in range(0, flat.size, _CHUNK):
            part = flat[start:start + _CHUNK]
            out = np.bitwise_and(part, np.uint16(mask), out=tmp[: part.size])
            if int(out.max()) >= first:
                return True
        return False
    return not all(np.isfinite(flat[start:start + _CHUNK]).all() for start in range(0, flat.size, _CHUNK))


class SafetensorsFile:
    """A memory-mapped safetensors file. `get(name)` returns (numpy array, dtype name)."""

    def __init__(self, path: str, check_finite: bool = True):
        """`check_finite`: refuse float tensors holding NaN/inf when they are read (weights); data files such as
        test fixtures may hold them on purpose."""
        self.path = str(path)
        self.check_finite = check_finite
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise SafetensorsError("file is shorter than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise SafetensorsError(f"header length {header_len} does not fit in a file of {size} bytes")
                header = json.loads(f.read(header_len))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, SafetensorsError) as err:
            raise SafetensorsError(f"{self.path} is not a readable safetensors file: {err}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + header_len
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + end > size:
            raise SafetensorsError(
                f"{self.path} is truncated: its header describes {self._data_start + end} bytes, the file has {size}"
            )
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if header and end > 0 else None
        self._checked: set[str] = set()

    def keys(self) -> list[str]:
        return list(self._entries)

    def dtype(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> tuple[np.ndarray, str]:
        entry = self._entries[name]
        dtype = entry["dtype"]
        if dtype not in _NP_DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if self._mmap is None or end == begin:
            return np.zeros(shape, dtype=_NP_DTYPES[dtype]), dtype
        buf = self._mmap[self._data_start + begin : self._data_start + end]
        array = buf.view(_NP_DTYPES[dtype]).reshape(shape)
        # NaN/inf weights would give black images or a useless LoRA, silently
        if self.check_finite and name not in self._checked:
            if has_non_finite(array, dtype):
                raise SafetensorsError(f"{self.path}: tensor {name!r} holds NaN or inf values; the file is damaged "
                                       "(or was saved from a diverged run) and is not loaded")
            self._checked.add(name)
        return array, dtype

    def release(self, name: str) -> None:
        """Drop tensor `name`'s pages from this process's resident memory once it has been copied
        (into a parameter): otherwise the touched mapping stays counted in RSS and loading peaks at
        twice the weights. The file stays in the page cache; a later `get` reads it again."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, end = self._entries[name]["data_offsets"]
        start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        length = self._data_start + end - start
        if length > 0:
            self._mmap._mmap.madvise(mmap.MADV_DONTNEED, start, length)

    def get_float32(self, name: str) -> np.ndarray:
        """The tensor widened to fp32 (exact for F16, BF16 and fp8)."""
        arr, dtype = self.get(name)
        if dtype in FP8_DTYPES:
            return fp8_bits_to_float32(arr, dtype)
        return bf16_bits_to_float32(arr) if dtype == "BF16" else arr.astype(np.float32)

    def items(self) -> Iterator[tuple[str, np.ndarray, str]]:
        for name in self._entries:
            arr, dtype = self.get(name)
            yield name, arr, dtype


def load_file(path: str, check_finite: bool = True) -> dict[str, np.ndarray]:
    """All tensors of a file as numpy arrays, BF16 widened to fp32. For small files (LoRAs, fixtures)."""
    f = SafetensorsFile(path, check_finite)
    return {name: f.get_float32(name) if f.dtype(name) in ("BF16", "F16", *FP8_DTYPES) else f.get(name)[0]
            for name in f.keys()}


def save_file(tensors: dict[str, tuple[np.ndarray, str]], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write `{name: (array, safetensors dtype)}` to `path`; see `save_tensors`."""
    save_tensors({name: (arr.shape, dtype, lambda a=arr: a) for name, (arr, dtype) in tensors.items()}, path, metadata)


def save_tensors(specs: dict[str, tuple[tuple[int, ...], str, Callable[[], np.ndarray]]], path: str,
                 metadata: dict[str, str] | None = None) -> None:
    """Write `{name: (shape, dtype, fetch)}` to `path`, calling `fetch()` for one tensor at a time.

    The file appears atomically (temporary name, then rename). Names are written sorted, so the
    same tensors always give the same bytes.
    """
    header: dict = {}
    offset = 0
    order = sorted(specs)
    for name in order:
        shape, dtype, _ = specs[name]
        if dtype not in _NP_DTYPES:
            raise ValueError(f"unsupported safetensors dtype {dtype} for {name!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_NP_DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as the reference writer does
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name in order:
                shape, dtype, fetch = specs[name]
                # asarray, not ascontiguousarray: that turns a 0-d tensor (a LoRA alpha) into shape (1,)
                arr = np.asarray(fetch(), dtype=_NP_DTYPES[dtype])
                if arr.shape != tuple(shape):
                    raise ValueError(f"{name!r}: expected shape {tuple(shape)}, got {arr.shape}")
                f.write(arr.tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def numpy_to_safetensors(arr: np.ndarray) -> tuple[np.ndarray, str]:
    """(array, dtype name) for a numpy array of a plain dtype."""
    for name, np_dtype in _NP_DTYPES.items():
        if name not in ("BF16", *FP8_DTYPES) and arr.dtype == np_dtype:
            return arr, name
    raise ValueError(f"no safetensors dtype for numpy {arr.dtype}")
