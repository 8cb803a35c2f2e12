"""DreamBooth LoRA training of FLUX.1: the run behind train/train_dreambooth_lora_flux.py.

`train(config)` takes a TrainingConfig (diffusers' argument names and meanings) and the trainer
sets up, in this order: device and processes, the train state (resume, host generators), the VAE,
class images (prior preservation), data, prompt embeddings (then the text encoders are freed),
models and LoRA, optimizer and schedule, the batch builder and validation; `run()` then caches
latents, resumes, and runs the loop (checkpoints, validation, logs) and the outputs (the LoRA
file, an optional kohya copy, validation images with the saved file, README.md).

The parts live in their own modules: run_config, prompts, batches (latent source, batch builder),
train_state (save / restore), validation and export. The Kontext trainer (kontext.py) is the same
run with another dataset, batch builder, loss and pipeline.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from ..device import pynative as _pynative
from .batches import BatchBuilder, LatentSource
from .data_source import read_data_source
from .dataset import DreamBoothDataset, parse_buckets
from .distributed import barrier, broadcast_parameters, init_distributed
from .export import LoraExport, saving_dtype
from .output_dir import claim_output_dir, run_identity
from .prompts import build_prompt_table, free_memory, prompts_needed
from .reporting import TrainingReporter
from .run_config import TrainingConfig, TrainingError
from .train_state import TrainState

logger = logging.getLogger("train_dreambooth_lora_flux")

DEFAULT_LORA_LAYERS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2"]
TEXT_ENCODER_LORA_LAYERS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # diffusers' CLIP targets
TORCH_ADAMW_DEFAULT_LR = 1e-3  # polynomial decay measures lr_end against it in diffusers' script (see lr_schedules)

__all__ = ["DreamBoothTrainer", "NonFiniteLossError", "TrainingConfig", "TrainingError", "train"]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients became NaN or inf; the run stops without saving anything further."""


def check_model_folder(folder: str) -> None:
    """A diffusers FLUX folder needs at least transformer/, vae/ and scheduler/ with their configs."""
    if not os.path.isdir(folder):
        raise TrainingError(f"--pretrained_model_name_or_path {folder} is neither a folder nor a Hub repo id "
                            "(org/name)")
    for sub, name in (("transformer", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        if not os.path.isfile(os.path.join(folder, sub, name)):
            raise TrainingError(f"{folder} has no {sub}/{name}: a diffusers FLUX folder has transformer/, vae/, "
                                "scheduler/, text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/")


def lora_config(config: TrainingConfig, targets: list[str]):
    from ..lora import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      init_lora_weights="gaussian", target_modules=targets)


class DreamBoothTrainer:
    """One training run; `run()` returns the path of the LoRA file (on rank 0; None elsewhere)."""

    default_lora_layers = DEFAULT_LORA_LAYERS
    pipeline_class = None  # validation: FluxPipeline
    batch_builder_class = BatchBuilder

    def __init__(self, config: TrainingConfig):
        import mindspore as ms

        from .. import AutoencoderKL, set_device
        from ..backend import allow_tf32
        from ..backend.memory import check_model_fits
        from ..hub import resolve_pipeline
        from .precision import resolve_mixed_precision, resolve_weight_dtype

        c = self.config = config
        # the data's rows first (columns, files: bad data stops here), pixels after the VAE fixes the shapes
        self.data_source = read_data_source(c.instance_data_dir, c.dataset_name, c.image_column, c.caption_column,
                                            c.cond_image_column, c.dataset_config_name, c.cache_dir,
                                            c.instance_prompt)
        self.device = set_device(c.device, c.mode)
        self.dist = init_distributed()
        if c.allow_tf32 and not allow_tf32():
            logger.info("--allow_tf32 concerns NVIDIA GPUs; no effect on %s", self.device)
        c.mixed_precision = resolve_mixed_precision(c.mixed_precision)  # None: the device's default
        self.weight_dtype = resolve_weight_dtype(c.mixed_precision)
        # a Hub / ModelScope repo id becomes its fetched folder, which every later load reads
        c.pretrained_model_name_or_path = resolve_pipeline(c.pretrained_model_name_or_path, revision=c.revision,
                                                           cache_dir=c.cache_dir)
        check_model_folder(c.pretrained_model_name_or_path)
        check_model_fits(c.pretrained_model_name_or_path, {"no": "fp32"}.get(c.mixed_precision, c.mixed_precision),
                         c.resolution, c.resolution, c.max_sequence_length, "--mixed_precision", c.train_batch_size,
                         training=True, gradient_checkpointing=c.gradient_checkpointing)
        if self.dist.enabled and c.seed is None:
            raise TrainingError("--seed is required under msrun: every process draws the same host random numbers "
                                "and keeps its share")
        self.global_batch = c.train_batch_size * self.dist.world_size
        self.state = TrainState(c.seed, c.output_dir, c.resume_from_checkpoint, self.global_batch,
                                c.gradient_accumulation_steps, self.dist.world_size, run_identity(c),
                                c.max_train_steps)
        if c.seed is not None:
            ms.set_seed(c.seed)  # LoRA initialisation (replaced on resume) and LoRA dropout
        if self.dist.is_main_process:
            os.makedirs(c.output_dir, exist_ok=True)

        self.vae = AutoencoderKL.from_pretrained(c.pretrained_model_name_or_path, subfolder="vae")
        vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        multiple = vae_scale_factor * 2
        if c.resolution % multiple:
            raise TrainingError(f"--resolution {c.resolution} must be a multiple of {multiple} (the VAE downsamples "
                                f"{vae_scale_factor}x and latents are packed in 2x2 patches)")
        self.buckets = parse_buckets(c.aspect_ratio_buckets, multiple)
        if self.buckets is not None and c.with_prior_preservation:  # before any class image is generated
            raise TrainingError("--aspect_ratio_buckets cannot be combined with --with_prior_preservation: instance "
                                "and class images of one batch must share a shape")
        if c.with_prior_preservation:
            self.make_class_images()
        self.dataset = self.load_dataset()
        self.data_source = None  # decoded: a dataset's in-memory image files can go
        class_prompt = c.class_prompt if c.with_prior_preservation else None
        self.prompts, clip = build_prompt_table(
            c.pretrained_model_name_or_path, prompts_needed(self.dataset.captions, c.caption_dropout, class_prompt,
                                                            c.validation_prompt),
            c.max_sequence_length, self.weight_dtype, c.train_text_encoder, c.precomputed_prompt_embeds,
            c.instance_prompt, class_prompt)
        self.clip_tokenizer, self.text_encoder = clip if clip is not None else (None, None)
        self.transformer, self.noise_scheduler, self.export = self.load_models()
        self.train_step, self.sampler, self.max_train_steps, self.num_batches = self.setup_optimization()
        broadcast_parameters(self.train_step.optimizer.parameters, self.dist)  # identical LoRA init on every rank
        self.num_train_epochs = math.ceil(self.max_train_steps / math.ceil(self.num_batches /
                                                                           c.gradient_accumulation_steps))
        self.batches = self.batch_builder()
        self.validator = self.make_validator()

    # -- setup ------------------------------------------------------------------------------------------------
    def make_class_images(self) -> None:
        from ..backend import policy
        from ..modeling_utils import resolve_dtype
        from ..pipelines import FluxPipeline
        from .generation import count_class_images, generate_class_images

        c = self.config
        dtype = {None: self.weight_dtype, "no": self.weight_dtype, "fp32": "fp32"}.get(c.prior_generation_precision,
                                                                                      c.prior_generation_precision)
        dtype = resolve_dtype(dtype)
        try:
            policy().check_dtype(dtype, "--prior_generation_precision")
        except ValueError as error:
            raise TrainingError(str(error)) from None

        def factory():
            return FluxPipeline.from_pretrained(c.pretrained_model_name_or_path, mindspore_dtype=dtype)

        existing = count_class_images(c.class_data_dir)
        barrier(self.dist)  # every process counts before any writes
        with _pynative():
            generate_class_images(factory, c.class_data_dir, c.class_prompt, c.num_class_images,
                                  c.sample_batch_size, c.seed, self.dist.rank, self.dist.world_size,
                                  existing=existing, height=c.resolution, width=c.resolution,
                                  num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
                                  max_sequence_length=c.max_sequence_length)
        free_memory()
        barrier(self.dist)

    def load_dataset(self):
        c = self.config
        dataset = DreamBoothDataset(
            self.data_source.name, c.instance_prompt, c.resolution, c.center_crop, c.repeats,
            self.buckets, c.caption_column, c.image_column,
            c.class_data_dir if c.with_prior_preservation else None, c.class_prompt,
            c.num_class_images, rng=self.state.crop_rng, num_workers=c.dataloader_num_workers,
            source=self.data_source)
        if c.with_prior_preservation and len(dataset.class_images) < c.num_class_images:
            logger.warning("--class_data_dir has %d images, fewer than --num_class_images %d",
                           len(dataset.class_images), c.num_class_images)
        return dataset

    def load_models(self):
        """(transformer with its LoRA, the noise scheduler, the export of the adapters); CLIP gets its LoRA too."""
        from .. import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from .precision import freeze

        c = self.config
        folder = c.pretrained_model_name_or_path
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
        transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
        freeze(self.vae, transformer, self.text_encoder, dtype=self.weight_dtype)
        if c.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
            if self.text_encoder is not None:
                self.text_encoder.enable_gradient_checkpointing()
        targets = [m.strip() for m in c.lora_layers.split(",")] if c.lora_layers else self.default_lora_layers
        transformer_config = lora_config(c, targets)
        try:
            transformer.add_adapter(transformer_config)
        except ValueError as err:
            raise TrainingError(f"--lora_layers: {err}") from None
        text_config = None
        if self.text_encoder is not None:
            text_config = lora_config(c, TEXT_ENCODER_LORA_LAYERS)
            self.text_encoder.add_adapter(text_config)
        return transformer, noise_scheduler, LoraExport(transformer, transformer_config, self.text_encoder,
                                                        text_config)

    def loss_net(self):
        from .train_step import FluxFlowMatchingLoss

        c = self.config
        return FluxFlowMatchingLoss(self.transformer, c.weighting_scheme, c.with_prior_preservation,
                                    c.prior_loss_weight)

    def setup_optimization(self):
        """(train step, flow-matching sampler, max_train_steps, batches per epoch)."""
        from .flow_matching import FlowMatchingSampler
        from .lr_schedules import get_scheduler
        from .optimizers import create_optimizer
        from .precision import create_loss_scaler
        from .train_step import FluxTextEncoderLoss, LoRATrainStep

        c = self.config
        learning_rate = c.learning_rate
        text_encoder_lr = c.text_encoder_lr if c.text_encoder_lr else learning_rate
        if c.scale_lr:
            factor = c.gradient_accumulation_steps * c.train_batch_size * self.dist.world_size
            learning_rate *= factor  # diffusers scales --learning_rate only, not the text encoder's
        optimizer_name = c.optimizer.lower()
        prodigy_options = {}
        if optimizer_name == "prodigy":
            if learning_rate <= 0.1:
                logger.warning("Learning rate is too low. When using prodigy, it's generally better to set learning "
                               "rate around 1.0")
            if self.text_encoder is not None and c.text_encoder_lr:
                logger.warning("Learning rates were provided both for the transformer and the text encoder; prodigy "
                               "uses --learning_rate for both")
                text_encoder_lr = learning_rate
            prodigy_options = dict(beta3=c.prodigy_beta3, decouple=c.prodigy_decouple,
                                   use_bias_correction=c.prodigy_use_bias_correction,
                                   safeguard_warmup=c.prodigy_safeguard_warmup)
        params = self.transformer.lora_parameters()
        groups = None
        if self.text_encoder is not None:
            groups = [{"params": params, "lr_scale": 1.0, "weight_decay": c.adam_weight_decay},
                      {"params": self.text_encoder.lora_parameters(), "lr_scale": text_encoder_lr / learning_rate,
                       "weight_decay": c.adam_weight_decay_text_encoder}]
        try:
            optimizer = create_optimizer(c.optimizer, params, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon,
                                         weight_decay=c.adam_weight_decay, param_groups=groups, **prodigy_options)
        except ValueError as err:
            raise TrainingError(f"--optimizer {c.optimizer}: {err}") from None

        # batches are cut within each bucket (one bucket without --aspect_ratio_buckets)
        sizes: dict[tuple[int, int], int] = {}
        for i in range(len(self.dataset)):
            shape = self.dataset.shape_of(i)
            sizes[shape] = sizes.get(shape, 0) + 1
        num_batches = sum(math.ceil(n / self.global_batch) for n in sizes.values())
        max_train_steps = c.max_train_steps or c.num_train_epochs * math.ceil(num_batches /
                                                                              c.gradient_accumulation_steps)
        lr_init = TORCH_ADAMW_DEFAULT_LR if optimizer_name == "adamw" else learning_rate
        lr_scheduler = get_scheduler(c.lr_scheduler, learning_rate, c.lr_warmup_steps, max_train_steps,
                                     c.lr_num_cycles, c.lr_power, lr_init=lr_init)
        loss_net = self.loss_net()
        if self.text_encoder is not None:
            loss_net = FluxTextEncoderLoss(loss_net, self.text_encoder)
        train_step = LoRATrainStep(loss_net, optimizer, lr_scheduler, c.max_grad_norm, c.gradient_accumulation_steps,
                                   create_loss_scaler(c.mixed_precision), self.dist.world_size)
        sampler = FlowMatchingSampler(self.noise_scheduler, c.weighting_scheme, c.logit_mean, c.logit_std,
                                      c.mode_scale, c.dynamic_shift, generator=self.state.step_rng)
        return train_step, sampler, max_train_steps, num_batches

    def batch_builder(self) -> BatchBuilder:
        c = self.config
        latents = LatentSource(self.vae, self.dataset, c.random_flip, c.cache_latents, self.dist.is_main_process)
        return self.batch_builder_class(
            self.dataset, latents, self.prompts, self.sampler, self.vae.config, self.state.data_rng,
            self.state.step_rng, self.weight_dtype, c.random_flip, c.caption_dropout,
            c.class_prompt if c.with_prior_preservation else None,
            c.guidance_scale if self.transformer.config.guidance_embeds else None, self.text_encoder is not None,
            self.dist.world_size, self.dist.rank, vae_sample=c.vae_encode_mode == "sample")

    def make_validator(self, **pipeline_kwargs):
        from .validation import Validator

        c = self.config
        return Validator(c.pretrained_model_name_or_path, c.output_dir, c.validation_prompt, c.num_validation_images,
                         c.seed, c.validation_resolution, c.num_inference_steps, c.guidance_scale, self.prompts,
                         self.weight_dtype, self.transformer, self.vae, self.text_encoder, self.clip_tokenizer,
                         self.pipeline_class, pipeline_kwargs)

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> str | None:
        c, step = self.config, self.train_step
        self.batches.latents.build_cache()
        epoch, batches, position = (self.state.restore({"transformer": self.transformer,
                                                        "text_encoder": self.text_encoder}, step, c.lora_dropout,
                                                       self.max_train_steps)
                                    if self.state.saved is not None else (0, None, 0))
        main = self.dist.is_main_process
        reporter = TrainingReporter(os.path.join(c.output_dir, c.logging_dir), self.max_train_steps, step.global_step,
                                    enabled=main, report_to=c.report_to, config=c.arguments)
        logger.info("***** Running training on %s (%s mode, weights %s, %d process(es)) *****", self.device,
                    c.mode, self.weight_dtype, self.dist.world_size)
        logger.info("  Num examples = %d, batches per epoch = %d, epochs = %d", len(self.dataset), self.num_batches,
                    self.num_train_epochs)
        logger.info("  Batch size per process = %d, total batch = %d, accumulation steps = %d, optimization steps = %d",
                    c.train_batch_size, self.global_batch * c.gradient_accumulation_steps,
                    c.gradient_accumulation_steps, self.max_train_steps)
        logger.info("  LoRA rank %d on %d layers: %d trainable parameters", c.rank,
                    len(dict(self.transformer.lora_layers())),
                    sum(int(np.prod(p.shape)) for p in step.optimizer.parameters))
        last_checkpoint = self.state.resume_path
        try:
            done = step.global_step >= self.max_train_steps
            while not done and epoch < self.num_train_epochs:
                if batches is None:
                    batches = self.dataset.epoch_batches(c.train_batch_size, self.state.data_rng, self.dist.world_size)
                    position = 0
                while position < len(batches):
                    inputs = self.batches(batches[position])
                    position += 1
                    out = step(*inputs, end_of_epoch=position == len(batches))
                    self.check_finite(out, step.global_step if out.sync_gradients else step.global_step + 1,
                                      last_checkpoint, reporter)
                    if not out.sync_gradients:
                        continue
                    reporter.log_step(step.global_step, epoch, out.loss, out.lr, out.grad_norm)
                    if main and step.global_step % c.checkpointing_steps == 0:
                        last_checkpoint = self.state.save(c.output_dir, step, self.export.write_lora, epoch, batches,
                                                          position, c.checkpoints_total_limit)
                        logger.info("Saved state to %s", last_checkpoint)
                        reporter.log_event("checkpoint", step.global_step, path=last_checkpoint)
                    if step.global_step >= self.max_train_steps:
                        done = True
                        break
                if c.validation_prompt is not None and epoch % c.validation_epochs == 0:
                    if main:
                        self.validator.validate(step.global_step, epoch, reporter)
                    barrier(self.dist)  # rank 0 validated (and compiled): the others wait here, not in a step
                epoch += 1
                batches = None
            return self.finish(epoch, reporter)
        finally:
            reporter.close()

    def check_finite(self, out, step: int, last_checkpoint: str | None, reporter) -> None:
        """Stop at the first NaN/inf loss, or NaN/inf gradients that would reach the weights (fp16 loss
        scaling skips those updates by design); nothing more is written, earlier checkpoints stay."""
        bad = None
        if not math.isfinite(out.loss):
            bad = f"the loss became {out.loss}"
        elif out.grad_norm is not None and not math.isfinite(out.grad_norm) and self.train_step.loss_scaler is None:
            bad = f"the gradient norm became {out.grad_norm}"
        if bad is None:
            return
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        reporter.log_event("error", step, message=bad)
        raise NonFiniteLossError(f"{bad} at step {step}; training stopped without saving ({kept}). Lower "
                                 "--learning_rate, or check the data and --mixed_precision")

    def finish(self, epoch: int, reporter) -> str | None:
        """The LoRA file, the kohya copy, the final validation with the saved file and the model card (rank 0)."""
        from .model_card import write_model_card

        c = self.config
        barrier(self.dist)
        path = None
        if self.dist.is_main_process:
            dtype = saving_dtype(self.weight_dtype, c.upcast_before_saving)
            path = self.export.write_lora(c.output_dir, dtype)
            logger.info("Saved the LoRA weights (%s) to %s", dtype, path)
            kohya = None
            if c.export_kohya:
                kohya = self.export.write_kohya(c.output_dir, dtype)
                logger.info("Saved a kohya-format copy (ComfyUI) to %s", os.path.join(c.output_dir, kohya))
            images = self.validator.validate_saved(path, self.train_step.global_step, epoch, reporter)
            write_model_card(c.output_dir, c.arguments, images, c.validation_prompt, self.train_step.global_step,
                             kohya, **self.card_options())
            print(reporter.summary(self.train_step.global_step), flush=True)
        barrier(self.dist)
        return path

    def card_options(self) -> dict:
        return {}


def run_training(trainer_class: type[DreamBoothTrainer], config: TrainingConfig) -> str | None:
    """Hold the output folder (lock; an earlier run's files checked or moved aside), then run a trainer."""
    with claim_output_dir(config.output_dir, resume=bool(config.resume_from_checkpoint),
                          overwrite=config.overwrite_output_dir, logging_dir=config.logging_dir):
        return trainer_class(config).run()


def train(config: TrainingConfig) -> str | None:
    """Run DreamBooth LoRA training; returns the LoRA file's path (rank 0)."""
    return run_training(DreamBoothTrainer, config)
