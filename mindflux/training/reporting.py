"""What a training run shows and records: a progress bar, a JSON-lines log, TensorBoard, the final summary.

Every update is one record {"step", "epoch", "loss", "lr", "grad_norm", "s_per_step", "time"}: shown
in the progress bar, appended to `<logging_dir>/train_log.jsonl` (one JSON object a line, flushed
each time, so a killed job keeps what it logged), and with `--report_to tensorboard` written as
scalars under `train/` (validation images as `validation` / `test`). Only the main process reports.
TensorBoard needs `pip install mindflux[tensorboard]` (tensorboardX); it is imported only when asked for.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

REPORT_TO = ("tensorboard", "all", "none")
LOG_FILE = "train_log.jsonl"


def resolve_report_to(report_to: str | None) -> tuple[bool, bool]:
    """(tensorboard wanted, tensorboard required) for --report_to. None is diffusers' default,
    "tensorboard": used when tensorboardX is installed; asked for by name, it must be."""
    if report_to is None:
        return True, False
    name = report_to.lower()
    if name not in REPORT_TO:
        raise ValueError(f"--report_to {report_to}: mindflux reports to tensorboard (or none); wandb and comet_ml are "
                         "not supported")
    return name in ("tensorboard", "all"), name in ("tensorboard", "all")


def peak_memory() -> dict[str, float]:
    """Peak host memory (RSS) and, on GPU/Ascend, peak device memory of this process, in GiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"host_peak_gib": rss / (1024**3 if sys.platform == "darwin" else 1024**2)}
    try:
        from ..backend import peak_device_memory_gib

        device_peak = peak_device_memory_gib()
        if device_peak is not None:
            out["device_peak_gib"] = device_peak
    except Exception:  # noqa: BLE001 - a missing statistic must not end a finished run
        pass
    return out


class TrainingReporter:
    """Progress bar + JSON lines + optional TensorBoard for the main process; a silent no-op elsewhere."""

    def __init__(self, logging_dir: str, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 report_to: str | None = None, config: dict[str, Any] | None = None):
        self.enabled = enabled
        self.writer = None
        self.progress = None
        self.start = time.perf_counter()
        self.last_time = self.start
        self.last_step = initial_step
        self.initial_step = initial_step
        wanted, required = resolve_report_to(report_to)
        if not enabled:
            return
        os.makedirs(logging_dir, exist_ok=True)
        self.log_path = os.path.join(logging_dir, LOG_FILE)
        self.log_file = open(self.log_path, "a", encoding="utf-8")
        if wanted:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                if required:
                    raise ValueError("--report_to tensorboard needs tensorboardX: pip install mindflux[tensorboard] "
                                     "(or pass --report_to none)") from None
                # the default on a default install: a note, not a warning (asked for by name, it is an error)
                logger.info("TensorBoard logs need tensorboardX (pip install mindflux[tensorboard]); the JSON-lines "
                            "log is %s", self.log_path)
            else:
                self.writer = SummaryWriter(logging_dir)
                if config:
                    self.writer.add_text("config", "\n".join(f"    --{k} {v}" for k, v in sorted(config.items())), 0)
        from tqdm.auto import tqdm

        self.progress = tqdm(total=total_steps, initial=initial_step, desc="Steps", dynamic_ncols=True)
        if (config or {}).get("mode", "graph") == "graph":  # the first update waits for the compile (minutes for FLUX)
            self.progress.set_postfix_str("the first step includes the graph compile")

    def log_step(self, step: int, epoch: int, loss: float, lr: float, grad_norm: float | None = None) -> dict:
        """Record one update (step = the global step after it)."""
        now = time.perf_counter()
        seconds = (now - self.last_time) / max(1, step - self.last_step)
        self.last_time, self.last_step = now, step
        record = {"step": step, "epoch": epoch, "loss": _finite_or_str(loss), "lr": lr,
                  "grad_norm": _finite_or_str(grad_norm) if grad_norm is not None else None,
                  "s_per_step": round(seconds, 4), "time": round(now - self.start, 3)}
        if not self.enabled:
            return record
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "s_per_step"):
                if isinstance(record[key], float):
                    self.writer.add_scalar(f"train/{key}", record[key], step)
        self.progress.update(step - self.progress.n)
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", s_step=f"{seconds:.2f}")
        return record

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        """A non-step record (validation, checkpoint, error) in the JSON-lines log."""
        if not self.enabled:
            return
        self.log_file.write(json.dumps({"event": event, "step": step, **fields}) + "\n")
        self.log_file.flush()

    def log_images(self, tag: str, images: list, step: int) -> None:
        if self.enabled and self.writer is not None and images:
            self.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")

    def summary(self, steps: int) -> str:
        """One line: updates done in this process, wall time, peak memory; also logged as an event."""
        wall = time.perf_counter() - self.start
        memory = peak_memory()
        done = steps - self.initial_step
        text = (f"training done: {steps} steps ({done} in this run), wall time {wall:.1f} s"
                f" ({wall / max(1, done):.3f} s/step), peak host memory {memory['host_peak_gib']:.2f} GiB")
        if "device_peak_gib" in memory:
            text += f", peak device memory {memory['device_peak_gib']:.2f} GiB"
        self.log_event("summary", steps, wall_time_s=round(wall, 3), **{k: round(v, 3) for k, v in memory.items()})
        return text

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
        self.log_file.close()


def _finite_or_str(value: float) -> float | str:
    # JSON has no NaN/inf; keep them readable instead of producing invalid JSON
    return float(value) if math.isfinite(value) else str(value)
