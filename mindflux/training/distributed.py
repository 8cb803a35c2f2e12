"""Data parallelism under msrun: one process per device, each with a share of every global batch.

    msrun --worker_num=8 --local_worker_num=8 --master_port=8118 --join=True --log_dir=logs \\
        train/train_dreambooth_lora_flux.py --train_batch_size 1 ...

Every process draws the same host randomness for the whole global batch (the data order, flips,
noise, sigmas) and keeps its rows (`rank_rows`); the train step averages the gradients (and the
reported loss) over the processes with AllReduce, so N processes with batch b give the update of
one process with batch N * b. Only rank 0 writes files and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_msrun() -> bool:
    """msrun (MindSpore's dynamic cluster) starts the script in one scheduler process (MS_ROLE=MS_SCHED) and
    MS_WORKER_NUM workers (MS_ROLE=MS_WORKER)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED") and "MS_WORKER_NUM" in os.environ


def init_distributed() -> DistributedContext:
    """Join the msrun cluster (after mindflux.set_device) and return this process's rank and the world size;
    a plain single-process run returns rank 0 of 1 without touching MindSpore's communication.

    In msrun's scheduler process init() runs the scheduler until the workers finish and then ends the
    process, so it must come before any real work."""
    if not launched_by_msrun():
        return DistributedContext()
    from mindspore.communication import get_group_size, get_rank, init

    init()
    return DistributedContext(rank=int(get_rank()), world_size=int(get_group_size()))


def rank_rows(global_batch: int, world_size: int, rank: int, halves: int = 1) -> np.ndarray:
    """Row indices of this rank in a global batch of `halves` consecutive blocks of `global_batch` rows.

    With prior preservation the global batch is [instance rows; class rows] (halves=2), and each
    rank keeps its instance rows then its class rows, the layout the loss expects.
    """
    if global_batch % world_size:
        raise ValueError(f"a global batch of {global_batch} cannot be split evenly over {world_size} processes")
    local = global_batch // world_size
    return np.concatenate([np.arange(h * global_batch + rank * local, h * global_batch + (rank + 1) * local)
                           for h in range(halves)])


def barrier(context: DistributedContext) -> None:
    """Wait for every process (an AllReduce of one number: it works on every backend msrun supports)."""
    if not context.enabled:
        return
    import mindspore as ms
    from mindspore import ops

    ops.AllReduce()(ms.Tensor(np.zeros(1, np.float32))).asnumpy()
