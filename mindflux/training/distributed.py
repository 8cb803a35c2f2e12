"""Data parallelism under msrun: one process per device, each with a share of every global batch.

    msrun --worker_num=8 --local_worker_num=8 --master_port=8118 --join=True --log_dir=logs \\
        train/train_dreambooth_lora_flux.py --train_batch_size 1 ...

Every process draws the same host randomness for the whole global batch (the data order, flips,
noise, sigmas) and keeps its rows (`rank_rows`); the train step averages the gradients (and the
reported loss) over the processes with AllReduce, so N processes with batch b give the update of
one process with batch N * b. Only rank 0 writes files and logs.

On Ascend a rank table launch (RANK_TABLE_FILE / RANK_SIZE / RANK_ID / DEVICE_ID, as ModelArts
starts jobs) is joined too; other launchers (torchrun, mpirun) are refused with a message, since
each process would otherwise train alone into the same output folder. Rank 0's initial LoRA
weights are broadcast, so every rank starts from the same weights by construction.
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


class LaunchError(ValueError):
    """A multi-process launch this run cannot join; the message says which variable and what to use."""


def launched_by_msrun(environ=None) -> bool:
    """msrun (MindSpore's dynamic cluster) starts the script in one scheduler process (MS_ROLE=MS_SCHED) and
    MS_WORKER_NUM workers (MS_ROLE=MS_WORKER)."""
    environ = os.environ if environ is None else environ
    return environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED") and "MS_WORKER_NUM" in environ


# Variables other launchers set in every process; a world-size-1 run under any of them with N > 1 would
# be N independent runs writing one output folder.
_OTHER_LAUNCHERS = (("RANK_SIZE", "a rank table launch"), ("WORLD_SIZE", "torchrun/accelerate"),
                    ("OMPI_COMM_WORLD_SIZE", "mpirun"), ("PMI_SIZE", "an MPI/Slurm launcher"))


def launch_kind(device: str, environ=None) -> str:
    """"msrun", "rank_table" or "single": how this process was started. A rank table launch (Ascend,
    as on ModelArts: RANK_TABLE_FILE, RANK_SIZE, RANK_ID, DEVICE_ID in every process) is joined with
    HCCL; any other sign of several processes is refused with a message, before any work."""
    environ = os.environ if environ is None else environ
    if launched_by_msrun(environ):
        return "msrun"
    table = environ.get("RANK_TABLE_FILE") or environ.get("MINDSPORE_HCCL_CONFIG_PATH")
    if table:
        if device != "Ascend":
            raise LaunchError(f"RANK_TABLE_FILE={table} is set, but rank tables are an Ascend (HCCL) launch and "
                              f"this run is on {device}: use msrun --worker_num=N ... or unset RANK_TABLE_FILE")
        if not os.path.isfile(table):
            raise LaunchError(f"RANK_TABLE_FILE={table} does not exist")
        for name in ("RANK_SIZE", "RANK_ID"):
            if name not in environ:
                raise LaunchError(f"RANK_TABLE_FILE is set but {name} is not: a rank table launch sets RANK_SIZE, "
                                  "RANK_ID and DEVICE_ID in every process")
        return "rank_table"
    for name, launcher in _OTHER_LAUNCHERS:
        value = environ.get(name, "1")
        if value.isdigit() and int(value) > 1:
            raise LaunchError(f"{name}={value}: this looks like {launcher} starting {value} processes, which mindflux "
                              "cannot join (each would train alone into the same output folder). Launch with "
                              "msrun --worker_num=N --local_worker_num=N ..., or, on Ascend, a rank table "
                              "(RANK_TABLE_FILE, RANK_SIZE, RANK_ID, DEVICE_ID)")
    return "single"


def init_distributed(device: str | None = None) -> DistributedContext:
    """Join the msrun cluster or the rank table's HCCL group (after mindflux.set_device) and return this
    process's rank and the world size; a plain single-process run returns rank 0 of 1 without touching
    MindSpore's communication. Unsupported multi-process launches raise LaunchError.

    In msrun's scheduler process init() runs the scheduler until the workers finish and then ends the
    process, so it must come before any real work."""
    if device is None:
        from ..device import get_device

        device = get_device()
    kind = launch_kind(device)
    if kind == "single":
        return DistributedContext()
    from mindspore.communication import get_group_size, get_rank, init

    init()
    context = DistributedContext(rank=int(get_rank()), world_size=int(get_group_size()))
    expected = os.environ.get("RANK_SIZE") if kind == "rank_table" else None
    if expected is not None and int(expected) != context.world_size:
        raise LaunchError(f"RANK_SIZE={expected} but the rank table's group has {context.world_size} processes")
    return context


def broadcast_parameters(parameters, context: DistributedContext, all_reduce=None) -> None:
    """Give every process rank 0's values of `parameters` (the LoRA weights after initialisation), so all ranks
    start from identical weights whatever their random state. One AllReduce of one buffer in which the other
    ranks put zeros: x + 0 is exact, and AllReduce works on every backend msrun supports (Broadcast does not
    on the CPU). `all_reduce` is replaceable for tests."""
    if not context.enabled:
        return
    import mindspore as ms
    from mindspore import ops

    parameters = list(parameters)
    flat = np.concatenate([p.asnumpy().astype(np.float32).reshape(-1) for p in parameters])
    if not context.is_main_process:
        flat = np.zeros_like(flat)
    flat = (all_reduce or ops.AllReduce())(ms.Tensor(flat)).asnumpy()
    start = 0
    for p in parameters:
        size = int(np.prod(p.shape))
        p.set_data(ms.Tensor(flat[start:start + size].reshape(p.shape)).astype(p.dtype))
        start += size


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
    """Wait for every process (an AllReduce of one number: it works on every backend msrun supports).
    Used after work only rank 0 does (validation, saving), so the others wait here and not inside the next
    train step's collective with a graph compile in between."""
    if not context.enabled:
        return
    import mindspore as ms
    from mindspore import ops

    ops.AllReduce()(ms.Tensor(np.zeros(1, np.float32))).asnumpy()
