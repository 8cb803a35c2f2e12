"""The data-parallel check's training: msrun starts this file in each worker (`msrun ... msrun_worker.py DEVICE
OUT`); check_device runs `train_tiny` once more in one process with the whole batch and compares.

Each rank initialises its weights from a different seed, so the run passes only if rank 0's weights are
broadcast (mindflux.training.distributed) and the gradients are averaged exactly (FlatGradReducer).
"""

from __future__ import annotations

import sys

import numpy as np


def train_tiny(rank: int, world_size: int, steps: int = 3, global_batch: int = 4) -> dict[str, np.ndarray]:
    """A two-layer MLP trained `steps` AdamW updates on a fixed global batch; this rank's rows only."""
    import mindspore as ms
    from mindspore import Tensor, nn, ops

    from mindflux.training import LoRATrainStep, create_optimizer
    from mindflux.training.distributed import DistributedContext, broadcast_parameters, rank_rows
    from mindflux.training.lr_schedules import get_scheduler

    class TinyLoss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.hidden, self.out = nn.Dense(8, 16), nn.Dense(16, 2)

        def construct(self, x, y):
            return ops.square(self.out(ops.tanh(self.hidden(x))) - y).mean()

    context = DistributedContext(rank, world_size)
    ms.set_seed(100 + rank)
    net = TinyLoss()
    broadcast_parameters(net.trainable_params(), context)
    optimizer = create_optimizer("AdamW", net.trainable_params(), weight_decay=1e-2)
    step = LoRATrainStep(net, optimizer, get_scheduler("constant", 1e-2), 1.0, 1, None, world_size)
    rng = np.random.default_rng(0)
    rows = rank_rows(global_batch, world_size, rank)
    for _ in range(steps):
        x = rng.standard_normal((global_batch, 8)).astype(np.float32)
        y = rng.standard_normal((global_batch, 2)).astype(np.float32)
        step(Tensor(x[rows]), Tensor(y[rows]))
    return {p.name: p.asnumpy() for p in net.trainable_params()}


if __name__ == "__main__":
    from mindflux.device import set_device
    from mindflux.training.distributed import init_distributed

    device, out = sys.argv[1], sys.argv[2]
    set_device(device, "graph")
    dist = init_distributed()
    weights = train_tiny(dist.rank, dist.world_size)
    if dist.is_main_process:
        np.savez(out, **weights)
