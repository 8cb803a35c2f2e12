"""The training run's output folder: one run at a time, and no earlier work overwritten.

- A run holds a lock file in --output_dir for its whole life; a second run into the same folder
  stops at once, naming the folder and the run holding it. A lock left by a process that no longer
  exists (same host) is taken over with a warning.
- A fresh run (no --resume_from_checkpoint) into a folder that already holds a final LoRA or
  checkpoints stops, unless --overwrite_output_dir is given: then the earlier run's files are
  moved into `<output_dir>/previous-<N>/`, never deleted.
- `run_identity(args)` is what defines a run (model, data, LoRA shape); checkpoints record it so a
  resume into a different run is refused (see checkpoint.check_resume).

Under msrun there is no lock: a process that stops before `init()` leaves the others waiting
there for the cluster (measured: a scheduler that refused the folder left both workers hanging),
and msrun's scheduler ends inside `init()` without unwinding, so it could not release one. Every
process makes the same earlier-results check instead, so all stop together; with
--overwrite_output_dir the scheduler alone moves the old files, before any worker passes `init()`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .checkpoint import CHECKPOINT_PREFIX, list_checkpoints

logger = logging.getLogger("train_dreambooth_lora_flux")

LOCK_NAME = ".mindflux-train.lock"
PREVIOUS_PREFIX = "previous-"
# what a run writes at the top of its output folder (checkpoints are matched by prefix)
RUN_OUTPUTS = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors", "README.md")
_RUN_OUTPUT_PATTERNS = (re.compile(r"^image_\d+\.png$"), re.compile(rf"^{CHECKPOINT_PREFIX}\d+(\.tmp-\d+|\.old-\d+)?$"))

# The arguments that define a run: a checkpoint of another model, data set or LoRA shape cannot be continued.
IDENTITY_PATHS = ("pretrained_model_name_or_path", "instance_data_dir", "class_data_dir", "precomputed_prompt_embeds")
IDENTITY_VALUES = ("instance_prompt", "class_prompt", "with_prior_preservation", "caption_column", "image_column",
                   "repeats", "resolution", "aspect_ratio_buckets", "center_crop", "rank", "lora_alpha",
                   "lora_layers", "train_text_encoder", "cond_image_column", "dataset_config_name")


class OutputDirError(ValueError):
    """The output folder is in use or holds an earlier run's results; the message names the folder."""


def run_identity(args: Any) -> dict[str, Any]:
    """The arguments that define a run (model, data, LoRA shape), paths made absolute, as JSON-friendly values."""
    identity: dict[str, Any] = {}
    for name in IDENTITY_PATHS:
        value = getattr(args, name, None)
        identity[name] = os.path.abspath(value) if value else None
    dataset = getattr(args, "dataset_name", None)  # a folder (made absolute) or a Hub id
    identity["dataset_name"] = os.path.abspath(dataset) if dataset and os.path.exists(dataset) else dataset
    for name in IDENTITY_VALUES:
        identity[name] = getattr(args, name, None)
    return identity


def earlier_outputs(output_dir: str) -> list[str]:
    """Names of an earlier run's results at the top of `output_dir` (final LoRA, checkpoints, card, images)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir)
                  if name in RUN_OUTPUTS or any(p.match(name) for p in _RUN_OUTPUT_PATTERNS))


def move_aside(output_dir: str, names: list[str], logging_dir: str | None = None) -> str:
    """Move `names` (and the validation/ and logging folders) into a new <output_dir>/previous-<N>; returns it."""
    n = 1
    while os.path.exists(os.path.join(output_dir, f"{PREVIOUS_PREFIX}{n}")):
        n += 1
    target = os.path.join(output_dir, f"{PREVIOUS_PREFIX}{n}")
    os.makedirs(target)
    extra = ["validation"] + ([logging_dir] if logging_dir and not os.path.isabs(logging_dir) else [])
    for name in list(names) + [e for e in extra if os.path.exists(os.path.join(output_dir, e))]:
        os.replace(os.path.join(output_dir, name), os.path.join(target, name))
    return target


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def acquire_lock(output_dir: str) -> str:
    """Create the lock file (atomically); a live holder stops this run, a dead one's lock is taken over."""
    path = os.path.join(output_dir, LOCK_NAME)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == mine["host"] and not _process_alive(pid):
                logger.warning("%s was locked by process %d, which no longer exists; taking it over", output_dir, pid)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            if not holder:  # being written this instant, or unreadable: look again
                time.sleep(0.1)
                if not _read_lock(path):
                    raise OutputDirError(f"--output_dir {output_dir} is locked by {path}, which cannot be read; "
                                         "delete it if no training run uses the folder") from None
                continue
            raise OutputDirError(f"--output_dir {output_dir} is in use by another training run (process {pid} on "
                                 f"{host}, since {holder.get('started')}): wait for it to finish or choose another "
                                 f"--output_dir (if no run is active, delete {path})") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(mine, f)
        return path
    raise OutputDirError(f"--output_dir {output_dir}: could not take the lock {path}")


def release_lock(path: str) -> None:
    holder = _read_lock(path)
    if holder.get("pid") == os.getpid():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


@contextmanager
def claim_output_dir(output_dir: str, resume: bool, overwrite: bool = False,
                     logging_dir: str | None = None) -> Iterator[None]:
    """Hold `output_dir` for one run: lock it, and for a fresh run check (or, with overwrite, move aside) an
    earlier run's results. Nothing is written or moved when the checks fail."""
    role = os.environ.get("MS_ROLE") if "MS_WORKER_NUM" in os.environ else None
    if role in ("MS_WORKER", "MS_SCHED"):  # msrun: no lock (see the module's docstring)
        if not (role == "MS_WORKER" and overwrite):
            _check_earlier_outputs(output_dir, resume, overwrite, logging_dir)
        yield
        return
    os.makedirs(output_dir, exist_ok=True)
    lock = acquire_lock(output_dir)
    try:
        _check_earlier_outputs(output_dir, resume, overwrite, logging_dir)
        yield
    finally:
        release_lock(lock)


def _check_earlier_outputs(output_dir: str, resume: bool, overwrite: bool, logging_dir: str | None) -> None:
    found = [] if resume else earlier_outputs(output_dir)
    if not found:
        return
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    if not overwrite:
        raise OutputDirError(f"--output_dir {output_dir} already holds an earlier run's results ({shown}): pass "
                             "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to start over "
                             "(its files are moved into a previous-N folder), or choose another --output_dir")
    target = move_aside(output_dir, found, logging_dir)
    logger.warning("--overwrite_output_dir: moved the earlier run's files (%s) to %s", shown, target)


def interrupted_message(output_dir: str) -> str:
    """What an interrupted run tells the user: where to resume from."""
    found = list_checkpoints(output_dir)
    if not found:
        return "no checkpoint was written (lower --checkpointing_steps to save more often)"
    return f"the last checkpoint is {found[-1]} (continue with --resume_from_checkpoint latest)"
