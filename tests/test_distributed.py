"""Data-parallel pieces that run in one process: the one-buffer gradient reducer, launch detection,
identical LoRA initialisation on every rank. The 2-process equality is tests/test_train_msrun.py."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, nn, ops

from mindflux.training.train_step import FlatGradReducer


class _CountingSum(nn.Cell):
    """Stands in for AllReduce over two processes that hold the same buffer: x + x, and counts calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def construct(self, x):
        self.calls += 1
        return x + x


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_flat_reducer_packs_every_gradient_and_the_loss_into_one_collective(mode, request):
    if mode == "graph":
        request.getfixturevalue("graph_mode")
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (3,), (2, 5), (1, 1)]
    params = [Parameter(ms.Tensor(np.zeros(s, np.float32)), name=f"p{i}") for i, s in enumerate(shapes)]
    grads = tuple(ms.Tensor(rng.standard_normal(s).astype(np.float32)) for s in shapes)
    loss = ms.Tensor(np.float32(0.75))
    counter = _CountingSum()
    reducer = FlatGradReducer(params, world_size=2, all_reduce=counter)
    out_loss, out = reducer(loss, grads)
    # the mean of two equal buffers is the buffer: every tensor comes back in place, shape and dtype kept
    assert float(out_loss.asnumpy()) == 0.75 and out_loss.shape == ()
    for g, o in zip(grads, out):
        assert o.shape == g.shape and o.dtype == g.dtype
        np.testing.assert_array_equal(o.asnumpy(), g.asnumpy())
    if mode == "pynative":
        assert counter.calls == 1
    # a different buffer per "process" is averaged, not summed
    half = FlatGradReducer(params, world_size=4, all_reduce=counter)
    _, out = half(loss, grads)
    np.testing.assert_allclose(out[0].asnumpy(), grads[0].asnumpy() / 2, rtol=1e-7)
    assert ops.isfinite(out[1]).all()


def test_launches_are_detected_or_refused_with_the_variable_named(tmp_path):
    from mindflux.training.distributed import LaunchError, launch_kind

    assert launch_kind("CPU", {}) == "single"
    assert launch_kind("CPU", {"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "2"}) == "msrun"
    assert launch_kind("CPU", {"RANK_SIZE": "1", "WORLD_SIZE": "1"}) == "single"
    table = tmp_path / "rank_table.json"
    table.write_text("{}")
    ascend = {"RANK_TABLE_FILE": str(table), "RANK_SIZE": "8", "RANK_ID": "3", "DEVICE_ID": "3"}
    assert launch_kind("Ascend", ascend) == "rank_table"
    cases = [("CPU", ascend, "RANK_TABLE_FILE=.* Ascend"),
             ("Ascend", dict(ascend, RANK_TABLE_FILE=str(tmp_path / "missing.json")), "does not exist"),
             ("Ascend", {k: v for k, v in ascend.items() if k != "RANK_ID"}, "RANK_ID"),
             ("Ascend", {"RANK_SIZE": "8"}, "RANK_SIZE=8.*msrun"),
             ("GPU", {"WORLD_SIZE": "2"}, "WORLD_SIZE=2.*torchrun"),
             ("GPU", {"OMPI_COMM_WORLD_SIZE": "4"}, "mpirun")]
    for device, env, message in cases:
        with pytest.raises(LaunchError, match=message):
            launch_kind(device, env)


class _AddRankZero(nn.Cell):
    """AllReduce(sum) as rank 1 of two sees it: its own buffer plus rank 0's."""

    def __init__(self, rank0: np.ndarray):
        super().__init__()
        self.rank0 = ms.Tensor(rank0)

    def construct(self, x):
        return x + self.rank0


def test_every_rank_starts_from_rank_zeros_lora_weights():
    from mindflux.training.distributed import DistributedContext, broadcast_parameters

    rng = np.random.default_rng(0)
    rank0 = [rng.standard_normal(s).astype(np.float32) for s in ((4, 2), (3,))]
    mine = [Parameter(ms.Tensor(rng.standard_normal(a.shape).astype(np.float32)), name=f"w{i}")
            for i, a in enumerate(rank0)]
    flat0 = np.concatenate([a.reshape(-1) for a in rank0])
    broadcast_parameters(mine, DistributedContext(rank=1, world_size=2), all_reduce=_AddRankZero(flat0))
    for p, a in zip(mine, rank0):
        np.testing.assert_array_equal(p.asnumpy(), a)
    # rank 0 contributes its values, so the same sum leaves it with them too (x + 0 with zeros from the others)
    own = [Parameter(ms.Tensor(a), name=f"v{i}") for i, a in enumerate(rank0)]
    broadcast_parameters(own, DistributedContext(rank=0, world_size=2), all_reduce=_AddRankZero(np.zeros_like(flat0)))
    for p, a in zip(own, rank0):
        np.testing.assert_array_equal(p.asnumpy(), a)
