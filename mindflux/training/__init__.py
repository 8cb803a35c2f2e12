"""LoRA training: the core (flow matching, optimizers, LR schedules, precision, the train step) and the run
around it: run_config, arguments, dataset, prompts, batches, train_state (over checkpoint), distributed,
reporting, validation (with generation), export (with model_card), and the two trainers, dreambooth and
kontext."""

from .flow_matching import (
    WEIGHTING_SCHEMES,
    FlowMatchingSampler,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
    flow_matching_loss,
)
from .lr_schedules import SCHEDULES, LRScheduler, get_scheduler
from .optimizers import OPTIMIZERS, AdamW, AdamWeightDecay, create_optimizer
from .precision import DynamicLossScale, create_loss_scaler, freeze, resolve_weight_dtype
from .train_step import FluxFlowMatchingLoss, FluxTextEncoderLoss, LoRATrainStep, StepOutput

__all__ = ["OPTIMIZERS", "SCHEDULES", "WEIGHTING_SCHEMES", "AdamW", "AdamWeightDecay", "DynamicLossScale",
           "FlowMatchingSampler", "FluxFlowMatchingLoss", "FluxTextEncoderLoss", "LRScheduler", "LoRATrainStep",
           "StepOutput",
           "compute_density_for_timestep_sampling", "compute_loss_weighting_for_sd3", "create_loss_scaler",
           "create_optimizer", "flow_matching_loss", "freeze", "get_scheduler", "resolve_weight_dtype"]
