"""LyCORIS LoKr and LoHa: the weight difference ΔW a module's tensors define (linear layers).

    LoKr  ΔW = kron(w1, w2) * scale, w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, w2 likewise;
          scale = alpha / r with r the inner size of the decomposed factor (w2's if both are), 1 without one
    LoHa  ΔW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / r, r = hada_w1_b's rows

These are the definitions of LyCORIS and of the loaders users check them with (ComfyUI, kohya-LyCORIS).
ΔW is not low-rank in general (a Kronecker product has the product of the factors' ranks), so
mindflux merges it into the base weight at load instead of keeping a LoRA branch.
"""

from __future__ import annotations

import numpy as np

LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
PARTS = frozenset(LOKR_PARTS + LOHA_PARTS)


class LycorisError(ValueError):
    """LyCORIS tensors that do not define a linear layer's ΔW; the message names the key."""


def _factor(parts: dict, full: str, a: str, b: str, where: str) -> tuple[np.ndarray, int | None]:
    """(the factor, its inner size if it is decomposed)."""
    if full in parts:
        return parts[full], None
    if a in parts and b in parts:
        return parts[a] @ parts[b], int(parts[b].shape[0])
    raise LycorisError(f"{where}: LoKr needs {full}, or {a} and {b}")


def delta_weight(parts: dict[str, np.ndarray], alpha: float | None, where: str) -> np.ndarray:
    """ΔW (out, in) in fp32 of one module from its LoKr or LoHa tensors; `where` names it in errors."""
    parts = {k: np.asarray(v, np.float32) for k, v in parts.items()}
    if "lokr_t2" in parts or "hada_t1" in parts or "hada_t2" in parts:
        raise LycorisError(f"{where}: Tucker tensors (lokr_t2 / hada_t1 / hada_t2) are for convolutions; FLUX's "
                           "layers are linear")
    if any(k.startswith("lokr_") for k in parts):
        w1, dim1 = _factor(parts, "lokr_w1", "lokr_w1_a", "lokr_w1_b", where)
        w2, dim2 = _factor(parts, "lokr_w2", "lokr_w2_a", "lokr_w2_b", where)
        dim = dim2 if dim2 is not None else dim1
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        return (np.kron(w1, w2) * np.float32(scale)).astype(np.float32)
    missing = [k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if k not in parts]
    if missing:
        raise LycorisError(f"{where}: LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b; "
                           f"{missing[0]} is missing")
    rank = int(parts["hada_w1_b"].shape[0])
    scale = alpha / rank if alpha is not None else 1.0
    w1 = parts["hada_w1_a"] @ parts["hada_w1_b"]
    w2 = parts["hada_w2_a"] @ parts["hada_w2_b"]
    if w1.shape != w2.shape:
        raise LycorisError(f"{where}: hada_w1 gives {w1.shape} but hada_w2 gives {w2.shape}")
    return (w1 * w2 * np.float32(scale)).astype(np.float32)


__all__ = ["LOHA_PARTS", "LOKR_PARTS", "PARTS", "LycorisError", "delta_weight"]
