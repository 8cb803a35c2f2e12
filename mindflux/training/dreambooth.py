"""DreamBooth LoRA training of FLUX.1: the run behind train/train_dreambooth_lora_flux.py.

`train(args)` takes the script's parsed arguments (diffusers' names and meanings) and does, in order:
class images (prior preservation), data, prompt embeddings (then the text encoders are freed),
models and LoRA, optimizer and schedule, latent cache, resume, the loop (checkpoints, validation,
logs), and the outputs: the LoRA file, an optional kohya copy, validation images and README.md.

Host randomness comes from three numpy generators spawned from one seed: crops at load, the data
order and per-step flips / caption drops, and the step's noise, sigmas and latent samples. Their
states, the epoch's batch order and the position in it go into every checkpoint, so a resumed run
makes exactly the updates the uninterrupted one would have made.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..device import pynative as _pynative
from ..hub import resolve_pipeline
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
from .dataset import DreamBoothDataset, parse_buckets
from .distributed import DistributedContext, barrier, broadcast_parameters, init_distributed, rank_rows
from .output_dir import claim_output_dir, run_identity
from .reporting import TrainingReporter

logger = logging.getLogger("train_dreambooth_lora_flux")

DEFAULT_LORA_LAYERS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2"]
TEXT_ENCODER_LORA_LAYERS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # diffusers' CLIP targets
TORCH_ADAMW_DEFAULT_LR = 1e-3  # polynomial decay measures lr_end against it in diffusers' script (see lr_schedules)
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"


class TrainingError(ValueError):
    """Bad input found while setting up or running; the script prints it as one line."""


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients became NaN or inf; the run stops without saving anything further."""


@dataclass
class PromptTable:
    """Per prompt: T5 embeddings (L, D), and CLIP's pooled output (P,) or, when CLIP trains, its token ids (77,)."""

    t5: dict[str, np.ndarray] = field(default_factory=dict)
    pooled: dict[str, np.ndarray] = field(default_factory=dict)
    clip_ids: dict[str, np.ndarray] = field(default_factory=dict)


def _free_memory() -> None:
    from ..backend import empty_cache

    gc.collect()
    empty_cache()


def check_model_folder(folder: str) -> None:
    """A diffusers FLUX folder needs at least transformer/, vae/ and scheduler/ with their configs."""
    if not os.path.isdir(folder):
        raise TrainingError(f"--pretrained_model_name_or_path {folder} is neither a folder nor a Hub repo id "
                            "(org/name)")
    for sub, name in (("transformer", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        if not os.path.isfile(os.path.join(folder, sub, name)):
            raise TrainingError(f"{folder} has no {sub}/{name}: a diffusers FLUX folder has transformer/, vae/, "
                                "scheduler/, text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/")


# ---- prompts -------------------------------------------------------------------------------------------------
def load_text_encoders(folder: str, weight_dtype):
    from transformers import CLIPTokenizer, T5TokenizerFast  # after mindflux: it keeps torch out of transformers

    from .. import CLIPTextModel, T5EncoderModel

    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    tokenizer_2 = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", mindspore_dtype=weight_dtype)
    text_encoder_2 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", mindspore_dtype=weight_dtype)
    return tokenizer, text_encoder, tokenizer_2, text_encoder_2


def encode_prompts(args, prompts: list[str], weight_dtype, keep_clip: bool):
    """Every distinct prompt encoded once: (PromptTable, (tokenizer, CLIP) kept for training or None).

    T5 is frozen in every mode, so its embeddings are computed once and T5 is dropped. CLIP too,
    unless it trains (--train_text_encoder): then the table holds token ids and CLIP stays.
    """
    import mindspore as ms

    from ..text_encoding import CLIP_MAX_LENGTH, encode_clip_pooled, encode_t5, tokenize

    table = PromptTable()
    tokenizer, text_encoder, tokenizer_2, text_encoder_2 = load_text_encoders(args.pretrained_model_name_or_path,
                                                                              weight_dtype)
    chunk = 8
    with _pynative():
        for start in range(0, len(prompts), chunk):
            part = prompts[start:start + chunk]
            t5 = encode_t5(text_encoder_2, tokenizer_2, part, args.max_sequence_length).astype(ms.float32).asnumpy()
            table.t5.update(zip(part, t5))
            if keep_clip:
                table.clip_ids.update(zip(part, tokenize(tokenizer, part, CLIP_MAX_LENGTH, "CLIP")))
            else:
                pooled = encode_clip_pooled(text_encoder, tokenizer, part).astype(ms.float32).asnumpy()
                table.pooled.update(zip(part, pooled))
    del text_encoder_2, tokenizer_2
    if not keep_clip:
        del text_encoder, tokenizer
        _free_memory()
        return table, None
    _free_memory()
    return table, (tokenizer, text_encoder)


def precomputed_prompt_table(args, needed: list[str]) -> PromptTable:
    """--precomputed_prompt_embeds: the instance prompt's (and class prompt's) embeddings from a file."""
    from ..safetensors_io import load_file

    path = args.precomputed_prompt_embeds
    if not os.path.isfile(path):
        raise TrainingError(f"--precomputed_prompt_embeds {path} does not exist")
    arrays = load_file(path)
    table = PromptTable()
    sources = {args.instance_prompt: ""}
    if args.with_prior_preservation:
        sources[args.class_prompt] = "class_"
    unknown = sorted(set(needed) - set(sources))
    if unknown:
        raise TrainingError(f"--precomputed_prompt_embeds holds the instance (and class) prompt only, but the run "
                            f"also needs {unknown[:3]} (per-image captions, --caption_dropout or --validation_prompt): "
                            "drop --precomputed_prompt_embeds to encode them")
    for prompt, prefix in sources.items():
        keys = (f"{prefix}prompt_embeds", f"{prefix}pooled_prompt_embeds")
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise TrainingError(f"--precomputed_prompt_embeds lacks {', '.join(missing)}")
        embeds, pooled = (np.asarray(arrays[k], np.float32) for k in keys)
        table.t5[prompt] = embeds.reshape(embeds.shape[-2:])
        table.pooled[prompt] = pooled.reshape(-1)
    return table


# ---- the run ---------------------------------------------------------------------------------------------------
class DreamBoothTrainer:
    """One training run; `run()` returns the path of the LoRA file (on rank 0; None elsewhere)."""

    def __init__(self, args):
        self.args = args

    # -- setup ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        import mindspore as ms

        from .. import AutoencoderKL, set_device
        from ..backend import allow_tf32
        from ..backend.memory import check_model_fits
        from .precision import resolve_mixed_precision, resolve_weight_dtype

        args = self.args
        self.device = set_device(args.device, args.mode)
        self.dist: DistributedContext = init_distributed()
        if args.allow_tf32 and not allow_tf32():
            logger.info("--allow_tf32 concerns NVIDIA GPUs; no effect on %s", self.device)
        args.mixed_precision = resolve_mixed_precision(args.mixed_precision)  # None: the device's default
        self.weight_dtype = resolve_weight_dtype(args.mixed_precision)
        # a Hub / ModelScope repo id becomes its fetched folder, which every later load reads
        folder = args.pretrained_model_name_or_path = resolve_pipeline(
            args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir)
        check_model_folder(folder)
        check_model_fits(folder, {"no": "fp32"}.get(args.mixed_precision, args.mixed_precision), args.resolution,
                         args.resolution, args.max_sequence_length, "--mixed_precision", args.train_batch_size,
                         training=True, gradient_checkpointing=args.gradient_checkpointing)
        if self.dist.enabled and args.seed is None:
            raise TrainingError("--seed is required under msrun: every process draws the same host random numbers "
                                "and keeps its share")
        self.resume_path = (resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
                            if args.resume_from_checkpoint else None)
        self.saved = read_state(self.resume_path) if self.resume_path else None
        if self.saved is not None:
            check_resume(self.resume_path, self.saved, run_identity(args), args.max_train_steps)
        self.global_batch = args.train_batch_size * self.dist.world_size
        if self.saved is not None:
            for key, value in (("global_batch_size", self.global_batch),
                               ("gradient_accumulation_steps", args.gradient_accumulation_steps)):
                if self.saved.get(key) != value:
                    raise TrainingError(f"checkpoint {self.resume_path} was written with {key} {self.saved.get(key)}; "
                                        f"this run has {value}: resume with the same batch layout")
        entropy = self.saved["seed_entropy"] if self.saved else np.random.SeedSequence(args.seed).entropy
        self.seed_entropy = int(entropy)
        crop_seed, data_seed, step_seed = np.random.SeedSequence(self.seed_entropy).spawn(3)
        self.crop_rng, self.data_rng, self.step_rng = (np.random.default_rng(s) for s in
                                                       (crop_seed, data_seed, step_seed))
        if args.seed is not None:
            ms.set_seed(args.seed)  # LoRA initialisation (replaced on resume) and LoRA dropout
        if self.dist.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)

        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        multiple = self.vae_scale_factor * 2
        if args.resolution % multiple:
            raise TrainingError(f"--resolution {args.resolution} must be a multiple of {multiple} (the VAE downsamples "
                                f"{self.vae_scale_factor}x and latents are packed in 2x2 patches)")
        self.buckets = parse_buckets(args.aspect_ratio_buckets, multiple)
        if self.buckets is not None and args.with_prior_preservation:  # before any class image is generated
            raise TrainingError("--aspect_ratio_buckets cannot be combined with --with_prior_preservation: instance "
                                "and class images of one batch must share a shape")
        if args.with_prior_preservation:
            self.make_class_images()
        self.dataset = DreamBoothDataset(
            args.instance_data_dir, args.instance_prompt, args.resolution, args.center_crop, args.repeats,
            self.buckets, args.caption_column, args.image_column,
            args.class_data_dir if args.with_prior_preservation else None, args.class_prompt,
            args.num_class_images, rng=self.crop_rng, num_workers=args.dataloader_num_workers)
        if args.with_prior_preservation and len(self.dataset.class_images) < args.num_class_images:
            logger.warning("--class_data_dir has %d images, fewer than --num_class_images %d",
                           len(self.dataset.class_images), args.num_class_images)
        self.setup_prompts()
        self.setup_models()
        self.setup_optimization()
        broadcast_parameters(self.optimizer.parameters, self.dist)  # identical LoRA init on every rank

    def make_class_images(self) -> None:
        from ..backend import policy
        from ..modeling_utils import resolve_dtype
        from ..pipelines import FluxPipeline
        from .generation import count_class_images, generate_class_images

        args = self.args
        dtype = {None: self.weight_dtype, "no": self.weight_dtype, "fp32": "fp32"}.get(args.prior_generation_precision,
                                                                                      args.prior_generation_precision)
        dtype = resolve_dtype(dtype)
        try:
            policy().check_dtype(dtype, "--prior_generation_precision")
        except ValueError as error:
            raise TrainingError(str(error)) from None

        def factory():
            return FluxPipeline.from_pretrained(args.pretrained_model_name_or_path, mindspore_dtype=dtype)

        existing = count_class_images(args.class_data_dir)
        barrier(self.dist)  # every process counts before any writes
        with _pynative():
            generate_class_images(factory, args.class_data_dir, args.class_prompt, args.num_class_images,
                                  args.sample_batch_size, args.seed, self.dist.rank, self.dist.world_size,
                                  existing=existing, height=args.resolution, width=args.resolution,
                                  num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                  max_sequence_length=args.max_sequence_length)
        _free_memory()
        barrier(self.dist)

    def setup_prompts(self) -> None:
        args = self.args
        prompts = list(dict.fromkeys(self.dataset.captions))
        if args.caption_dropout > 0:
            prompts.append("")
        if args.with_prior_preservation:
            prompts.append(args.class_prompt)
        if args.validation_prompt is not None:
            prompts.append(args.validation_prompt)
        prompts = list(dict.fromkeys(prompts))
        self.clip = None
        if args.precomputed_prompt_embeds is not None:
            if args.train_text_encoder:
                raise TrainingError("--train_text_encoder needs the text encoders: drop --precomputed_prompt_embeds")
            self.prompts = precomputed_prompt_table(args, prompts)
        else:
            # encoded before the transformer is loaded: T5 and the transformer are never resident together
            self.prompts, self.clip = encode_prompts(args, prompts, self.weight_dtype, args.train_text_encoder)

    def setup_models(self) -> None:
        from .. import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from ..lora import LoraConfig
        from .precision import freeze

        args = self.args
        folder = args.pretrained_model_name_or_path
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
        self.transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
        self.text_encoder = self.clip[1] if self.clip is not None else None
        freeze(self.vae, self.transformer, self.text_encoder, dtype=self.weight_dtype)
        if args.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
            if self.text_encoder is not None:
                self.text_encoder.enable_gradient_checkpointing()
        targets = [m.strip() for m in args.lora_layers.split(",")] if args.lora_layers else DEFAULT_LORA_LAYERS
        self.lora_config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                      init_lora_weights="gaussian", target_modules=targets)
        try:
            self.transformer.add_adapter(self.lora_config)
        except ValueError as err:
            raise TrainingError(f"--lora_layers: {err}") from None
        self.text_lora_config = None
        if self.text_encoder is not None:
            self.text_lora_config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                               init_lora_weights="gaussian", target_modules=TEXT_ENCODER_LORA_LAYERS)
            self.text_encoder.add_adapter(self.text_lora_config)

    def setup_optimization(self) -> None:
        from .flow_matching import FlowMatchingSampler
        from .lr_schedules import get_scheduler
        from .optimizers import create_optimizer
        from .precision import create_loss_scaler
        from .train_step import FluxFlowMatchingLoss, FluxTextEncoderLoss, LoRATrainStep

        args = self.args
        learning_rate = args.learning_rate
        text_encoder_lr = args.text_encoder_lr if args.text_encoder_lr else learning_rate
        if args.scale_lr:
            factor = args.gradient_accumulation_steps * args.train_batch_size * self.dist.world_size
            learning_rate *= factor  # diffusers scales --learning_rate only, not the text encoder's
        optimizer_name = args.optimizer.lower()
        prodigy_options = {}
        if optimizer_name == "prodigy":
            if learning_rate <= 0.1:
                logger.warning("Learning rate is too low. When using prodigy, it's generally better to set learning "
                               "rate around 1.0")
            if self.text_encoder is not None and args.text_encoder_lr:
                logger.warning("Learning rates were provided both for the transformer and the text encoder; prodigy "
                               "uses --learning_rate for both")
                text_encoder_lr = learning_rate
            prodigy_options = dict(beta3=args.prodigy_beta3, decouple=args.prodigy_decouple,
                                   use_bias_correction=args.prodigy_use_bias_correction,
                                   safeguard_warmup=args.prodigy_safeguard_warmup)
        params = self.transformer.lora_parameters()
        groups = None
        if self.text_encoder is not None:
            groups = [{"params": params, "lr_scale": 1.0, "weight_decay": args.adam_weight_decay},
                      {"params": self.text_encoder.lora_parameters(), "lr_scale": text_encoder_lr / learning_rate,
                       "weight_decay": args.adam_weight_decay_text_encoder}]
        try:
            self.optimizer = create_optimizer(args.optimizer, params, betas=(args.adam_beta1, args.adam_beta2),
                                              eps=args.adam_epsilon, weight_decay=args.adam_weight_decay,
                                              param_groups=groups, **prodigy_options)
        except ValueError as err:
            raise TrainingError(f"--optimizer {args.optimizer}: {err}") from None

        # batches are cut within each bucket (one bucket without --aspect_ratio_buckets)
        self.num_batches = sum(math.ceil(n / self.global_batch) for n in self._bucket_sizes().values())
        self.num_update_steps_per_epoch = math.ceil(self.num_batches / args.gradient_accumulation_steps)
        self.max_train_steps = args.max_train_steps or args.num_train_epochs * self.num_update_steps_per_epoch
        self.num_train_epochs = math.ceil(self.max_train_steps / self.num_update_steps_per_epoch)
        lr_init = TORCH_ADAMW_DEFAULT_LR if optimizer_name == "adamw" else learning_rate
        self.lr_scheduler = get_scheduler(args.lr_scheduler, learning_rate, args.lr_warmup_steps, self.max_train_steps,
                                          args.lr_num_cycles, args.lr_power, lr_init=lr_init)
        loss_net = FluxFlowMatchingLoss(self.transformer, args.weighting_scheme, args.with_prior_preservation,
                                        args.prior_loss_weight)
        if self.text_encoder is not None:
            loss_net = FluxTextEncoderLoss(loss_net, self.text_encoder)
        self.loss_scaler = create_loss_scaler(args.mixed_precision)
        self.train_step = LoRATrainStep(loss_net, self.optimizer, self.lr_scheduler, args.max_grad_norm,
                                        args.gradient_accumulation_steps, self.loss_scaler, self.dist.world_size)
        self.sampler = FlowMatchingSampler(self.noise_scheduler, args.weighting_scheme, args.logit_mean,
                                           args.logit_std, args.mode_scale, args.dynamic_shift,
                                           generator=self.step_rng)

    def _bucket_sizes(self) -> dict[tuple[int, int], int]:
        sizes: dict[tuple[int, int], int] = {}
        for i in range(len(self.dataset)):
            shape = self.dataset.shape_of(i)
            sizes[shape] = sizes.get(shape, 0) + 1
        return sizes

    # -- latents --------------------------------------------------------------------------------------------
    def encode_moments(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """VAE posterior (mean, std) of (B, 3, H, W) pixels, float32 on the host."""
        import mindspore as ms

        posterior = self.vae.encode(ms.Tensor(pixels).astype(self.vae.dtype)).latent_dist
        return posterior.mean.float().asnumpy(), posterior.std.float().asnumpy()

    def build_latent_cache(self) -> None:
        """--cache_latents: each distinct image (and its mirror image with --random_flip) encoded once, keyed by
        image and flip, so a cached latent always belongs to the image and caption it is drawn with."""
        from tqdm.auto import tqdm

        self.cache = None
        if not self.args.cache_latents:
            return
        cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        flips = (False, True) if self.args.random_flip else (False,)
        keys = [("instance", self.dataset.image_id(i), f) for i in range(self.dataset.num_instance_images)
                for f in flips]
        keys += [("class", i, False) for i in range(len(self.dataset.class_images))]
        for key in tqdm(list(dict.fromkeys(keys)), desc="Caching latents", disable=not self.dist.is_main_process):
            kind, index, flip = key
            pixels = (self.dataset.instance_by_id(index, flip) if kind == "instance"
                      else self.dataset.class_image(index))
            mean, std = self.encode_moments(pixels[None])
            cache[key] = (mean[0], std[0])
        self.cache = cache

    def model_input_moments(self, items: list[int], flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of this process's rows: its instance items, then (prior preservation) their class images."""
        prior = self.args.with_prior_preservation
        n_class = len(self.dataset.class_images)
        if self.cache is not None:
            keys = [("instance", self.dataset.image_id(i), bool(f)) for i, f in zip(items, flips)]
            if prior:
                keys += [("class", i % n_class, False) for i in items]
            return (np.stack([self.cache[k][0] for k in keys]), np.stack([self.cache[k][1] for k in keys]))
        pixels = [self.dataset.instance(i, bool(f)) for i, f in zip(items, flips)]
        if prior:
            pixels += [self.dataset.class_image(i) for i in items]
        return self.encode_moments(np.stack(pixels))

    # -- one batch ------------------------------------------------------------------------------------------
    def batch_inputs(self, batch: list[int]) -> list:
        """The train step's inputs for this process's share of a global batch (see distributed.rank_rows)."""
        import mindspore as ms

        from ..latents import normalize_latents, prepare_latent_image_ids, prepare_text_ids, standard_normal

        args = self.args
        size = len(batch)
        halves = 2 if args.with_prior_preservation else 1
        draw = self.dataset.draw_step(size, self.data_rng, args.random_flip, args.caption_dropout)
        rows = rank_rows(size, self.dist.world_size, self.dist.rank, halves)
        mine = rows[: len(rows) // halves]  # this process's instance rows
        mean, std = self.model_input_moments([batch[i] for i in mine], draw.flips[mine])
        shape = (size * halves,) + mean.shape[1:]
        eps = standard_normal(shape, self.step_rng)[rows]
        step_draw = self.sampler.sample(shape)
        cfg = self.vae.config
        latents = normalize_latents(ms.Tensor(mean + std * eps), cfg.scaling_factor, cfg.shift_factor or 0.0)
        prompts = ["" if drop else self.dataset.caption(i) for i, drop in zip(batch, draw.drop_captions)]
        if halves == 2:
            prompts += [args.class_prompt] * size
        prompts = [prompts[r] for r in rows]
        t5 = np.stack([self.prompts.t5[p] for p in prompts])
        text = (np.stack([self.prompts.clip_ids[p] for p in prompts]) if self.text_encoder is not None
                else ms.Tensor(np.stack([self.prompts.pooled[p] for p in prompts])).astype(self.weight_dtype))
        _, _, h, w = latents.shape
        inputs = [latents.astype(self.weight_dtype), ms.Tensor(step_draw.noise[rows]),
                  ms.Tensor(step_draw.sigmas[rows]), ms.Tensor(step_draw.timesteps[rows]),
                  ms.Tensor(t5).astype(self.weight_dtype), ms.Tensor(text) if isinstance(text, np.ndarray) else text,
                  prepare_latent_image_ids(h // 2, w // 2), prepare_text_ids(t5.shape[1])]
        if self.transformer.config.guidance_embeds:
            inputs.append(ms.Tensor(np.full(len(rows), args.guidance_scale, np.float32)))
        return inputs

    # -- checkpoints ----------------------------------------------------------------------------------------
    def lora_state(self) -> dict[str, dict[str, np.ndarray]]:
        from ..lora import get_peft_model_state_dict

        state = {"transformer": get_peft_model_state_dict(self.transformer)}
        if self.text_encoder is not None:
            state["text_encoder"] = get_peft_model_state_dict(self.text_encoder)
        return state

    def write_lora(self, folder: str, dtype: str = "fp32") -> str:
        """pytorch_lora_weights.safetensors in diffusers' layout; the transformer's in `dtype`, CLIP's in fp32
        (as diffusers saves them), the adapter configs in the metadata."""
        from ..lora import LORA_WEIGHT_NAME_SAFE
        from ..lora.loader import pack_metadata
        from ..safetensors_io import float32_to_bf16_bits, save_file

        tensors = {}
        for component, layers in self.lora_state().items():
            for key, value in layers.items():
                value = np.asarray(value, np.float32)
                if component == "transformer" and dtype == "bf16":
                    tensors[f"{component}.{key}"] = (float32_to_bf16_bits(value), "BF16")
                elif component == "transformer" and dtype == "fp16":
                    tensors[f"{component}.{key}"] = (value.astype(np.float16), "F16")
                else:
                    tensors[f"{component}.{key}"] = (value, "F32")
        metadata = pack_metadata({"transformer": self.lora_config, "text_encoder": self.text_lora_config})
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, LORA_WEIGHT_NAME_SAFE)
        save_file(tensors, path, metadata=metadata)
        return path

    def stateful_cells(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "loss_scaler": self.loss_scaler}

    def save_checkpoint(self, epoch: int, batches: list[list[int]], position: int) -> str:
        args = self.args
        state = {
            "epoch": epoch, "position": position, "batches": batches,
            "lr_scheduler": self.lr_scheduler.state_dict(), "micro_step": self.train_step.micro_step,
            "rng": {"data": rng_state(self.data_rng), "step": rng_state(self.step_rng)},
            "seed_entropy": self.seed_entropy, "global_batch_size": self.global_batch,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "world_size": self.dist.world_size,
            "run": run_identity(args),
        }
        tensors = parameters_state(self.stateful_cells(), exclude=self.optimizer.parameters)
        return save_checkpoint(args.output_dir, self.train_step.global_step, self.write_lora, tensors, state,
                               args.checkpoints_total_limit)

    def restore(self) -> tuple[int, list[list[int]] | None, int]:
        """Load the checkpoint being resumed from; returns (epoch, its batch order, next position)."""
        from ..lora import read_lora

        saved, path = self.saved, self.resume_path
        check_resume(path, saved, max_train_steps=self.max_train_steps)  # also when derived from the epochs
        lora, _ = read_lora(path)
        models = {"transformer": self.transformer, "text_encoder": self.text_encoder}
        for component, model in models.items():
            if model is None:
                continue
            prefix = f"{component}."
            try:
                model.set_adapter_state_dict({k[len(prefix):]: v for k, v in lora.items() if k.startswith(prefix)})
            except ValueError as err:
                raise TrainingError(f"checkpoint {path} does not fit this run's LoRA ({component}): {err}") from None
        try:
            load_parameters_state(self.stateful_cells(), load_checkpoint_tensors(path), path,
                                  exclude=self.optimizer.parameters)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        set_rng_state(self.data_rng, saved["rng"]["data"])
        set_rng_state(self.step_rng, saved["rng"]["step"])
        self.train_step.global_step = int(saved["global_step"])
        self.train_step.micro_step = int(saved.get("micro_step", 0))
        logger.info("Resumed from %s at step %d", path, self.train_step.global_step)
        if self.args.lora_dropout > 0:
            logger.warning("--lora_dropout %s: the dropout masks after a resume are new draws (MindSpore's in-graph "
                           "random state is not saved); everything else continues exactly", self.args.lora_dropout)
        batches, position = saved["batches"], int(saved["position"])
        if position >= len(batches):
            return int(saved["epoch"]) + 1, None, 0
        return int(saved["epoch"]), batches, position

    # -- validation -----------------------------------------------------------------------------------------
    def validation_pipeline(self):
        from ..pipelines import FluxPipeline

        args = self.args
        return FluxPipeline.from_pretrained(args.pretrained_model_name_or_path, vae=self.vae,
                                           transformer=self.transformer, text_encoder=None, text_encoder_2=None,
                                           tokenizer=None, tokenizer_2=None)

    def validate(self, epoch: int, final: bool = False) -> list[str]:
        """`--num_validation_images` images of --validation_prompt (seeded with --seed), saved under output_dir;
        returns their paths relative to output_dir."""
        import mindspore as ms

        from .generation import generate_images

        args = self.args
        if args.validation_prompt is None or args.num_validation_images <= 0 or not self.dist.is_main_process:
            return []
        logger.info("Running validation... Generating %d images with prompt: %s", args.num_validation_images,
                    args.validation_prompt)
        pipeline = self.validation_pipeline()
        pipeline.set_progress_bar_config(disable=True)
        prompt = args.validation_prompt
        t5 = ms.Tensor(self.prompts.t5[prompt][None]).astype(self.weight_dtype)
        if self.text_encoder is not None:
            from ..text_encoding import encode_clip_pooled

            with _pynative():
                pooled = encode_clip_pooled(self.text_encoder, self.clip[0], [prompt])
        else:
            pooled = ms.Tensor(self.prompts.pooled[prompt][None])
        generator = np.random.default_rng(args.seed) if args.seed is not None else None
        size = args.validation_resolution
        self.transformer.set_train(False)  # LoRA dropout off
        try:
            images = generate_images(pipeline, args.num_validation_images, prompt_embeds=t5,
                                     pooled_prompt_embeds=pooled.astype(self.weight_dtype), generator=generator,
                                     height=size, width=size, num_inference_steps=args.num_inference_steps,
                                     guidance_scale=args.guidance_scale)
        finally:
            self.transformer.set_train(True)
        step = self.train_step.global_step
        if final:
            names = [f"image_{i}.png" for i in range(len(images))]
        else:
            names = [os.path.join("validation", f"step{step:06d}_epoch{epoch:04d}_{i}.png") for i in range(len(images))]
        for name, image in zip(names, images):
            path = os.path.join(args.output_dir, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            image.save(path)
        self.reporter.log_images("test" if final else "validation", images, step)
        self.reporter.log_event("validation", step, epoch=epoch, images=names, final=final)
        return names

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> str | None:
        args = self.args
        self.setup()
        self.build_latent_cache()
        epoch, batches, position = self.restore() if self.saved is not None else (0, None, 0)
        main = self.dist.is_main_process
        self.reporter = TrainingReporter(os.path.join(args.output_dir, args.logging_dir), self.max_train_steps,
                                         self.train_step.global_step, enabled=main, report_to=args.report_to,
                                         config=vars(args))
        logger.info("***** Running training on %s (%s mode, weights %s, %d process(es)) *****", self.device,
                    args.mode, self.weight_dtype, self.dist.world_size)
        logger.info("  Num examples = %d, batches per epoch = %d, epochs = %d", len(self.dataset), self.num_batches,
                    self.num_train_epochs)
        logger.info("  Batch size per process = %d, total batch = %d, accumulation steps = %d, optimization steps = %d",
                    args.train_batch_size, self.global_batch * args.gradient_accumulation_steps,
                    args.gradient_accumulation_steps, self.max_train_steps)
        logger.info("  LoRA rank %d on %d layers: %d trainable parameters", args.rank,
                    len(dict(self.transformer.lora_layers())),
                    sum(int(np.prod(p.shape)) for p in self.optimizer.parameters))
        last_checkpoint = self.resume_path
        try:
            done = self.train_step.global_step >= self.max_train_steps
            while not done and epoch < self.num_train_epochs:
                if batches is None:
                    batches = self.dataset.epoch_batches(args.train_batch_size, self.data_rng, self.dist.world_size)
                    position = 0
                while position < len(batches):
                    inputs = self.batch_inputs(batches[position])
                    position += 1
                    out = self.train_step(*inputs, end_of_epoch=position == len(batches))
                    step = self.train_step.global_step if out.sync_gradients else self.train_step.global_step + 1
                    self.check_finite(out, step, last_checkpoint)
                    if not out.sync_gradients:
                        continue
                    self.reporter.log_step(self.train_step.global_step, epoch, out.loss, out.lr, out.grad_norm)
                    if main and self.train_step.global_step % args.checkpointing_steps == 0:
                        last_checkpoint = self.save_checkpoint(epoch, batches, position)
                        logger.info("Saved state to %s", last_checkpoint)
                        self.reporter.log_event("checkpoint", self.train_step.global_step, path=last_checkpoint)
                    if self.train_step.global_step >= self.max_train_steps:
                        done = True
                        break
                if args.validation_prompt is not None and epoch % args.validation_epochs == 0:
                    self.validate(epoch)
                    barrier(self.dist)  # rank 0 validated (and compiled): the others wait here, not in a step
                epoch += 1
                batches = None
            return self.finish(epoch)
        finally:
            self.reporter.close()

    def check_finite(self, out, step: int, last_checkpoint: str | None) -> None:
        """Stop at the first NaN/inf loss, or NaN/inf gradients that would reach the weights (fp16 loss
        scaling skips those updates by design); nothing more is written, earlier checkpoints stay."""
        bad = None
        if not math.isfinite(out.loss):
            bad = f"the loss became {out.loss}"
        elif out.grad_norm is not None and not math.isfinite(out.grad_norm) and self.loss_scaler is None:
            bad = f"the gradient norm became {out.grad_norm}"
        if bad is None:
            return
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        self.reporter.log_event("error", step, message=bad)
        raise NonFiniteLossError(f"{bad} at step {step}; training stopped without saving ({kept}). Lower "
                                 "--learning_rate, or check the data and --mixed_precision")

    def finish(self, epoch: int) -> str | None:
        import mindspore as ms

        args = self.args
        barrier(self.dist)
        path = None
        if self.dist.is_main_process:
            dtype = "fp32" if args.upcast_before_saving else \
                {ms.bfloat16: "bf16", ms.float16: "fp16"}.get(self.weight_dtype, "fp32")
            path = self.write_lora(args.output_dir, dtype)
            logger.info("Saved the LoRA weights (%s) to %s", dtype, path)
            kohya = None
            if args.export_kohya:
                from ..lora import save_kohya_lora

                kohya = KOHYA_WEIGHT_NAME
                save_kohya_lora(os.path.join(args.output_dir, kohya), transformer=self.transformer,
                                text_encoder=self.text_encoder, dtype=dtype)
                logger.info("Saved a kohya-format copy (ComfyUI) to %s", os.path.join(args.output_dir, kohya))
            images = self.final_validation(path, epoch)
            from .model_card import write_model_card

            write_model_card(args.output_dir, vars(args), images, args.validation_prompt, self.train_step.global_step,
                             kohya)
            print(self.reporter.summary(self.train_step.global_step), flush=True)
        barrier(self.dist)
        return path

    def final_validation(self, lora_path: str, epoch: int) -> list[str]:
        """As diffusers: the saved file is loaded (as a second adapter of the same models, so the base weights
        are not loaded twice) and the validation prompt is rendered with it alone."""
        if self.args.validation_prompt is None or self.args.num_validation_images <= 0:
            return []
        from ..lora import FluxLoraLoaderMixin

        class _Holder(FluxLoraLoaderMixin):
            def __init__(self, transformer, text_encoder):
                self.transformer, self.text_encoder = transformer, text_encoder

        holder = _Holder(self.transformer, self.text_encoder)
        holder.load_lora_weights(lora_path, adapter_name="saved")
        holder.set_adapters(["saved"])
        try:
            return self.validate(epoch, final=True)
        finally:
            holder.delete_adapters("saved")
            holder.set_adapters(["default"])


def train(args) -> str | None:
    """Run DreamBooth LoRA training with the script's arguments; returns the LoRA file's path (rank 0)."""
    with claim_output_dir(args.output_dir, resume=bool(args.resume_from_checkpoint),
                          overwrite=getattr(args, "overwrite_output_dir", False), logging_dir=args.logging_dir):
        return DreamBoothTrainer(args).run()
