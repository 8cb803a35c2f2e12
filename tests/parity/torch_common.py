"""Helpers for the torch stages of make_dumps.py (imported only there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file


def seed(value: int) -> torch.Generator:
    torch.manual_seed(value)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(value)


def to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32).cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
    return np.asarray(value)


def save_arrays(path: Path, arrays: dict) -> None:
    """Inputs and outputs as a safetensors file of numpy arrays (byte-reproducible, unlike .npz)."""
    save_file({k: np.ascontiguousarray(to_numpy(v)) for k, v in arrays.items()}, str(path))


def perturb_norm_weights(model: torch.nn.Module, generator: torch.Generator, scale: float = 0.2) -> None:
    """Norm weights start at one; make them differ so a mis-mapped norm shows in the outputs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight") and param.ndim == 1:
                param.copy_(1 + scale * torch.randn(param.shape, generator=generator))
