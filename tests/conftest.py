"""Tests run on the CPU in fp32, PyNative by default; `graph_mode` switches one test to graph mode."""

import os

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ warnings would bury pytest's output

from pathlib import Path  # noqa: E402

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import mindflux  # noqa: E402
from mindflux.safetensors_io import load_file  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"

mindflux.set_device("cpu", "pynative")


@pytest.fixture
def graph_mode():
    mindflux.set_device("cpu", "graph")
    yield
    mindflux.set_device("cpu", "pynative")


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


def load_cases(path: Path, prefix: str = "") -> dict[str, np.ndarray]:
    """Arrays of a dump file whose names start with `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in load_file(str(path), check_finite=False).items() if k.startswith(prefix)}


def tensors(arrays: dict[str, np.ndarray]) -> dict[str, ms.Tensor]:
    return {k: ms.Tensor(v) for k, v in arrays.items()}


def max_abs_diff(a, b) -> float:
    a = a.asnumpy() if isinstance(a, ms.Tensor) else np.asarray(a)
    b = b.asnumpy() if isinstance(b, ms.Tensor) else np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
