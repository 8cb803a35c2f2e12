"""The training state a checkpoint saves and a resumed run restores, over training/checkpoint.py's files.

Host randomness comes from three numpy generators spawned from one seed: crops at load, the data
order and per-step flips / caption drops, and the step's noise, sigmas and latent samples. Their
states, the epoch's batch order and the position in it, the LR schedule, the optimizer and loss
scale, and the LoRA weights go into every checkpoint, so a resumed run makes exactly the updates
the uninterrupted one would have made.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from .checkpoint import (
    check_resume,
    load_checkpoint_tensors,
    load_parameters_state,
    parameters_state,
    read_state,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .run_config import TrainingError

logger = logging.getLogger("train_dreambooth_lora_flux")


class TrainState:
    """The run's host generators and the checkpoint being resumed from (if any).

    Built before any model is loaded: a checkpoint written with another batch layout stops the run
    early, and the generators are seeded from the checkpoint's seed when resuming.
    """

    def __init__(self, seed: int | None, output_dir: str, resume_from_checkpoint: str | None, global_batch: int,
                 gradient_accumulation_steps: int, world_size: int, run: dict[str, Any] | None = None,
                 max_train_steps: int | None = None):
        self.global_batch, self.world_size, self.run = global_batch, world_size, run
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.resume_path = resolve_checkpoint(resume_from_checkpoint, output_dir) if resume_from_checkpoint else None
        self.saved: dict[str, Any] | None = read_state(self.resume_path) if self.resume_path else None
        if self.saved is not None:
            check_resume(self.resume_path, self.saved, run, max_train_steps)  # before anything is written
            for key, value in (("global_batch_size", global_batch),
                               ("gradient_accumulation_steps", gradient_accumulation_steps)):
                if self.saved.get(key) != value:
                    raise TrainingError(f"checkpoint {self.resume_path} was written with {key} {self.saved.get(key)}; "
                                        f"this run has {value}: resume with the same batch layout")
        entropy = self.saved["seed_entropy"] if self.saved else np.random.SeedSequence(seed).entropy
        self.seed_entropy = int(entropy)
        crop_seed, data_seed, step_seed = np.random.SeedSequence(self.seed_entropy).spawn(3)
        self.crop_rng, self.data_rng, self.step_rng = (np.random.default_rng(s) for s in
                                                       (crop_seed, data_seed, step_seed))

    @staticmethod
    def _cells(train_step) -> dict[str, Any]:
        return {"optimizer": train_step.optimizer, "loss_scaler": train_step.loss_scaler}

    def save(self, output_dir: str, train_step, write_lora: Callable[[str], str], epoch: int,
             batches: list[list[int]], position: int, checkpoints_total_limit: int | None = None) -> str:
        """checkpoint-<global step> in output_dir; `write_lora(folder)` writes the LoRA file into it."""
        state = {
            "epoch": epoch, "position": position, "batches": batches,
            "lr_scheduler": train_step.lr_scheduler.state_dict(), "micro_step": train_step.micro_step,
            "rng": {"data": rng_state(self.data_rng), "step": rng_state(self.step_rng)},
            "seed_entropy": self.seed_entropy, "global_batch_size": self.global_batch,
            "gradient_accumulation_steps": self.gradient_accumulation_steps, "world_size": self.world_size,
            "run": self.run,
        }
        tensors = parameters_state(self._cells(train_step), exclude=train_step.optimizer.parameters)
        return save_checkpoint(output_dir, train_step.global_step, write_lora, tensors, state,
                               checkpoints_total_limit)

    def restore(self, models: dict[str, Any], train_step, lora_dropout: float = 0.0,
                max_train_steps: int | None = None) -> tuple[int, Any, int]:
        """Load the checkpoint into the LoRA models, the optimizer, the schedule and the generators; returns
        (epoch, its batch order or None for a fresh epoch, next position). `max_train_steps`: the run's, also when
        derived from the epochs, which a checkpoint past it cannot continue."""
        from ..lora import read_lora

        saved, path = self.saved, self.resume_path
        check_resume(path, saved, max_train_steps=max_train_steps)
        lora, _ = read_lora(path)
        for component, model in models.items():
            if model is None:
                continue
            prefix = f"{component}."
            try:
                model.set_adapter_state_dict({k[len(prefix):]: v for k, v in lora.items() if k.startswith(prefix)})
            except ValueError as err:
                raise TrainingError(f"checkpoint {path} does not fit this run's LoRA ({component}): {err}") from None
        try:
            load_parameters_state(self._cells(train_step), load_checkpoint_tensors(path), path,
                                  exclude=train_step.optimizer.parameters)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        train_step.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        set_rng_state(self.data_rng, saved["rng"]["data"])
        set_rng_state(self.step_rng, saved["rng"]["step"])
        train_step.global_step = int(saved["global_step"])
        train_step.micro_step = int(saved.get("micro_step", 0))
        logger.info("Resumed from %s at step %d", path, train_step.global_step)
        if lora_dropout > 0:
            logger.warning("--lora_dropout %s: the dropout masks after a resume are new draws (MindSpore's in-graph "
                           "random state is not saved); everything else continues exactly", lora_dropout)
        batches, position = saved["batches"], int(saved["position"])
        if position >= len(batches):
            return int(saved["epoch"]) + 1, None, 0
        return int(saved["epoch"]), batches, position
