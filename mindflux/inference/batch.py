"""Many prompts on many processes: under msrun each rank makes a fixed share of the images.

    msrun --worker_num=8 --local_worker_num=8 --master_port=8118 --join=True --log_dir=logs \\
        infer/generate.py --model FLUX.1-dev --prompt_file prompts.txt --num_images 4 --output_dir out

Every image of a run has a global index: image k of prompt p is p * num_images + k, with seed
seed + k, exactly as in a single process. Rank r of N takes the indices r, r + N, r + 2N, ... (the
shares differ by one image at most), loads the pipeline once and writes its images under names
made from the global index and the seed (NNN_seedS.png), so no two ranks write the same file and N
processes write the files one process writes. Each rank appends one JSON line per image (prompt,
seed, file, seconds) to its own records file, flushed as it goes; rank 0 prints the total and the
images per second of all ranks together once every rank is done.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..training.distributed import DistributedContext, barrier


@dataclass(frozen=True)
class ImageJob:
    """One image: its global index, its prompt (and the prompt's index) and its seed."""

    index: int
    prompt_index: int
    prompt: str
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.index:03d}_seed{self.seed}.png"


def plan_images(prompts: Sequence[str], num_images: int, seed: int) -> list[ImageJob]:
    """Every image of the run in global order: prompt by prompt, image k of each with seed + k."""
    return [ImageJob(p * num_images + k, p, prompt, seed + k) for p, prompt in enumerate(prompts)
            for k in range(num_images)]


def shard_jobs(jobs: Sequence[ImageJob], rank: int, world_size: int) -> list[ImageJob]:
    """This rank's share: every world_size-th image from its rank on."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
    return list(jobs[rank::world_size])


def records_path(output_dir: str, context: DistributedContext) -> str:
    name = "images.jsonl" if not context.enabled else f"images.rank{context.rank}.jsonl"
    return os.path.join(output_dir, name)


class RecordWriter:
    """One JSON line per image, written and flushed as each image is saved: a stopped run keeps its records."""

    def __init__(self, output_dir: str, context: DistributedContext):
        self.path = records_path(output_dir, context)
        self.rank = context.rank
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, job: ImageJob, file: str, seconds: float, **extra) -> None:
        record = {"index": job.index, "prompt": job.prompt, "seed": job.seed, "file": file,
                  "seconds": round(seconds, 4), "rank": self.rank, **extra}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _all_sum(value: float, context: DistributedContext) -> float:
    if not context.enabled:
        return value
    import mindspore as ms
    from mindspore import ops

    return float(ops.AllReduce()(ms.Tensor(np.array([value], np.float32))).asnumpy()[0])


def start_clock(context: DistributedContext) -> float:
    """Wait for every rank to be ready (loaded, prompts encoded), then start the common clock."""
    barrier(context)
    return time.perf_counter()


def summarize(context: DistributedContext, made: int, start: float) -> str | None:
    """After every rank is done: 'N images in S s, R images/s (P processes)' on rank 0, None elsewhere."""
    total = int(round(_all_sum(float(made), context)))  # also waits for the slowest rank
    seconds = time.perf_counter() - start
    if not context.is_main_process:
        return None
    return (f"{total} image{'s' if total != 1 else ''} in {seconds:.1f} s, {total / max(seconds, 1e-9):.2f} "
            f"images/s ({context.world_size} process{'es' if context.world_size > 1 else ''})")


__all__ = ["ImageJob", "RecordWriter", "plan_images", "records_path", "shard_jobs", "start_clock", "summarize"]
