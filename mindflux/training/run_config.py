"""The run configuration of a LoRA training run: what the trainer parts read, as one dataclass.

Each script builds it from its parsed arguments (`TrainingConfig.from_arguments(vars(args))`); the
library never sees an argparse namespace. Names, meanings and defaults are those of diffusers'
train_dreambooth_lora_flux.py (and, for the Kontext fields, train_dreambooth_lora_flux_kontext.py).
`arguments` keeps every argument the script was given, for the model card and the run's log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class TrainingError(ValueError):
    """Bad input found while setting up or running; the script prints it as one line."""


@dataclass
class TrainingConfig:
    pretrained_model_name_or_path: str
    instance_data_dir: str | None  # a folder; None with dataset_name
    instance_prompt: str | None
    output_dir: str = "flux-dreambooth-lora"
    overwrite_output_dir: bool = False
    # where the model comes from when pretrained_model_name_or_path is a Hub / ModelScope repo id
    revision: str | None = None
    cache_dir: str | None = None
    # data: dataset_name instead of instance_data_dir reads a metadata.jsonl folder or, through the `datasets`
    # library, anything it loads (data_source.py); dataset_config_name is that library's config name
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    image_column: str = "image"
    caption_column: str | None = None
    repeats: int = 1
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    aspect_ratio_buckets: str | None = None
    caption_dropout: float = 0.0
    dataloader_num_workers: int = 0
    cache_latents: bool = False
    # prior preservation
    with_prior_preservation: bool = False
    class_data_dir: str | None = None
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    sample_batch_size: int = 4
    prior_generation_precision: str | None = None
    # prompts
    max_sequence_length: int = 512
    precomputed_prompt_embeds: str | None = None
    train_text_encoder: bool = False
    # LoRA
    rank: int = 4
    lora_alpha: int = 4
    lora_dropout: float = 0.0
    lora_layers: str | None = None
    # the step
    seed: int | None = None
    train_batch_size: int = 4
    num_train_epochs: int = 1
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    guidance_scale: float = 3.5
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    dynamic_shift: bool = False
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None
    allow_tf32: bool = False
    # optimizer and schedule
    optimizer: str = "AdamW"
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = 5e-6
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_weight_decay_text_encoder: float = 1e-3
    adam_epsilon: float = 1e-8
    prodigy_beta3: float | None = None
    prodigy_decouple: bool = True
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True
    # checkpoints
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    # validation and outputs
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_epochs: int = 50
    validation_resolution: int | None = None
    num_inference_steps: int = 28
    logging_dir: str = "logs"
    report_to: str | None = None
    upcast_before_saving: bool = False
    export_kohya: bool = False
    # where it runs
    device: str = "auto"
    mode: str = "graph"
    # Kontext (image editing): the reference image's column, the validation reference, the VAE read-out
    cond_image_column: str | None = None
    validation_image: str | None = None
    vae_encode_mode: str = "sample"
    arguments: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_arguments(cls, values: Mapping[str, Any], **overrides: Any) -> TrainingConfig:
        """The config from a script's argument values (e.g. `vars(args)`): the fields it knows are taken, the
        rest only recorded in `arguments`; `overrides` replace values (a script's own defaults)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"arguments"}
        chosen = {k: v for k, v in values.items() if k in names}
        chosen.update(overrides)
        return cls(**chosen, arguments=dict(values))
