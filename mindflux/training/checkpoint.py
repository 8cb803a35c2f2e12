"""Training checkpoints: everything a run needs to continue exactly where it stopped.

    output_dir/checkpoint-<global_step>/
        pytorch_lora_weights.safetensors   the LoRA weights in diffusers' format (loadable as a LoRA)
        training_state.safetensors         optimizer state, loss scale (fp16), ... by Parameter name
        training_state.json                step, epoch, position in the epoch, the epoch's batch order,
                                           LR schedule position, host RNG states, seed, and the
                                           arguments that define the run ("run"); written last

A checkpoint is written into `checkpoint-<step>.tmp-<pid>` and renamed when complete, so a job
killed while writing leaves the earlier checkpoints as they were and no half checkpoint under a
real name. `--checkpoints_total_limit` is applied after the new one is in place: the newest
complete checkpoint is never removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any

import numpy as np

from ..safetensors_io import load_file, numpy_to_safetensors, save_file

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that does not exist or cannot be used; the message names it."""


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in `output_dir`, oldest step first (temporary folders are not listed)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_JSON)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str) -> str:
    """The folder to resume from: "latest" (the newest in output_dir), a path, or a name inside output_dir."""
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"--resume_from_checkpoint latest: {output_dir} holds no checkpoint")
        return found[-1]
    candidates = [resume_from_checkpoint, os.path.join(output_dir, resume_from_checkpoint)]
    for path in candidates:
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, STATE_JSON)):
                raise CheckpointError(f"--resume_from_checkpoint {path} is not a complete checkpoint (no {STATE_JSON})")
            return path
    raise CheckpointError(f"--resume_from_checkpoint {resume_from_checkpoint} does not exist")


def read_state(path: str) -> dict[str, Any]:
    """The JSON part of a checkpoint."""
    try:
        with open(os.path.join(path, STATE_JSON), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from None


def check_resume(path: str, saved: dict[str, Any], run: dict[str, Any] | None = None,
                 max_train_steps: int | None = None) -> None:
    """Refuse, before anything is written, a checkpoint this run cannot continue: one already past
    --max_train_steps (it would train nothing and overwrite the final LoRA with its own), or one written by a
    run of another model, data set or LoRA shape (`run`: output_dir.run_identity of the arguments)."""
    step = int(saved.get("global_step", 0))
    if max_train_steps is not None and step > max_train_steps:
        raise CheckpointError(f"checkpoint {path} is at step {step}, past --max_train_steps {max_train_steps}: "
                              "it belongs to a longer run; raise --max_train_steps, or start a fresh run "
                              "(--overwrite_output_dir moves the old files aside)")
    recorded = saved.get("run")
    if run is None or not isinstance(recorded, dict):
        return  # written before runs were recorded
    changed = [f"--{k} {recorded[k]!r} -> {run[k]!r}" for k in recorded if k in run and recorded[k] != run[k]]
    if changed:
        raise CheckpointError(f"checkpoint {path} belongs to another run: {'; '.join(changed)}. Resume with the "
                              "same model, data and LoRA arguments, or start a fresh run (--overwrite_output_dir "
                              "moves the old files aside)")


def _named_parameters(cells: dict[str, Any], exclude: set[int]):
    for prefix, cell in cells.items():
        if cell is None:
            continue
        for name, param in cell.parameters_and_names():
            if id(param) not in exclude:
                yield f"{prefix}/{name}", param


def parameters_state(cells: dict[str, Any], exclude=()) -> dict[str, np.ndarray]:
    """{"<cell>/<parameter name>": array} of every Parameter of the given Cells (optimizer, loss scaler),
    except those in `exclude` (the trained weights: the checkpoint's LoRA file holds them)."""
    skip = {id(p) for p in exclude}
    return {key: param.asnumpy() for key, param in _named_parameters(cells, skip)}


def load_parameters_state(cells: dict[str, Any], arrays: dict[str, np.ndarray], source: str, exclude=()) -> None:
    """Put saved arrays back into the Cells' Parameters; every Parameter must be present, with its shape."""
    import mindspore as ms

    skip = {id(p) for p in exclude}
    for key, param in _named_parameters(cells, skip):
        if key not in arrays:
            raise CheckpointError(f"checkpoint {source} has no {key}: was it written with another optimizer or "
                                  "other LoRA layers?")
        value = arrays[key]
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"checkpoint {source}: {key} has shape {value.shape}, the run has {param.shape}")
        param.set_data(ms.Tensor(value).astype(param.dtype))


def save_checkpoint(output_dir: str, global_step: int, write_lora, tensors: dict[str, np.ndarray],
                    state: dict[str, Any], checkpoints_total_limit: int | None = None) -> str:
    """Write checkpoint-<global_step> atomically, then prune to `checkpoints_total_limit`.

    `write_lora(folder)` writes the LoRA weights into the folder; `tensors` are saved to
    training_state.safetensors and `state` (JSON-serialisable) to training_state.json.
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    tmp = f"{final}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        write_lora(tmp)
        save_file({k: numpy_to_safetensors(np.asarray(v)) for k, v in tensors.items()},
                  os.path.join(tmp, STATE_TENSORS))
        with open(os.path.join(tmp, STATE_JSON), "w", encoding="utf-8") as f:
            json.dump(dict(state, global_step=global_step), f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # a re-run reaching the same step: replace the old one only now
            old = f"{final}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    if checkpoints_total_limit is not None:
        prune_checkpoints(output_dir, checkpoints_total_limit, keep=final)
    return final


def prune_checkpoints(output_dir: str, limit: int, keep: str | None = None) -> list[str]:
    """Remove the oldest complete checkpoints beyond `limit` (never `keep`, never the newest); returns them."""
    found = list_checkpoints(output_dir)
    limit = max(1, int(limit))
    removable = [p for p in found[:-limit] if os.path.abspath(p) != os.path.abspath(keep or "")]
    for path in removable:
        shutil.rmtree(path, ignore_errors=True)
    if removable:
        names = ", ".join(os.path.basename(p) for p in removable)
        logger.info("removed %d old checkpoint(s): %s", len(removable), names)
    return removable


def load_checkpoint_tensors(path: str) -> dict[str, np.ndarray]:
    file = os.path.join(path, STATE_TENSORS)
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint {path} has no {STATE_TENSORS}")
    return load_file(file)


def rng_state(generator: np.random.Generator) -> dict[str, Any]:
    """A numpy Generator's state as JSON-friendly data (its ints are exact in Python's json)."""
    return generator.bit_generator.state


def set_rng_state(generator: np.random.Generator, state: dict[str, Any]) -> None:
    generator.bit_generator.state = state
