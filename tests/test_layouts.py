"""The CPU's layout choices (backend.layout) compute what the plain forms compute.

On the CPU the models broadcast with broadcast_to, move heads with split/stack and run feed-forwards in
chunks of tokens; GPU and Ascend use implicit broadcasting, transposes and whole sequences. The fixtures'
sequences are far below the 1024-token chunk, so the chunk is lowered to 5 tokens (uneven last chunks).
"""

import numpy as np
import pytest

from mindflux import FluxTransformer2DModel
from mindflux.backend import layout
from tests.test_attention_chunks import DUMPS, TOL, forward_and_grads


def model():
    return FluxTransformer2DModel.from_pretrained(str(DUMPS / "flux_dev"))


@pytest.mark.parametrize("jit", [False, True], ids=["pynative", "graph"])
def test_feed_forward_chunks_match_whole_and_diffusers(monkeypatch, jit):
    monkeypatch.setattr(layout, "_FEED_FORWARD_CHUNK", 0)
    whole_out, whole_grads, ref = forward_and_grads(model(), jit=False)
    calls = []
    if not jit:  # count the chunked calls (a graph cannot trace the counting wrapper; its outputs still compare)
        split = layout.ops.split
        monkeypatch.setattr(layout.ops, "split", lambda x, size, axis=0: calls.append(size) or split(x, size, axis))
    monkeypatch.setattr(layout, "_FEED_FORWARD_CHUNK", 5)  # before compiling: read when the graph is built
    out, grads, _ = forward_and_grads(model(), jit=jit)
    if not jit:
        assert calls.count(5) >= 3  # both streams' feed-forwards and the single block's MLP
    assert np.abs(out - whole_out).max() <= 1e-6
    assert np.abs(out - ref["output"]).max() <= TOL
    for name, grad in grads.items():
        scale = max(1.0, np.abs(ref[f"grad.{name}"]).max())
        assert np.abs(grad - whole_grads[name]).max() <= 1e-6 * scale, name


def test_plain_layouts_match_the_cpu_ones(monkeypatch):
    """The transposes and implicit broadcasts GPU and Ascend use (index_tables off) give the same numbers."""
    assert layout._INDEX_TABLES  # the CPU's policy
    cpu_out, cpu_grads, ref = forward_and_grads(model(), jit=False)
    monkeypatch.setattr(layout, "_INDEX_TABLES", False)
    out, grads, _ = forward_and_grads(model(), jit=False)
    assert np.abs(out - cpu_out).max() <= 1e-6
    assert np.abs(out - ref["output"]).max() <= TOL
    for name, grad in grads.items():
        assert np.abs(grad - cpu_grads[name]).max() <= 1e-6 * max(1.0, np.abs(grad).max()), name
