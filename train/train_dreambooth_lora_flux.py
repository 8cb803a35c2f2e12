#!/usr/bin/env python
"""DreamBooth LoRA training of FLUX.1 on MindSpore, with diffusers' train_dreambooth_lora_flux.py arguments.

    python train/train_dreambooth_lora_flux.py --pretrained_model_name_or_path FLUX.1-dev \\
        --instance_data_dir dog --instance_prompt "a photo of sks dog" --output_dir out \\
        --mixed_precision bf16 --resolution 512 --train_batch_size 1 --max_train_steps 500 --seed 0

Every argument diffusers' script has is accepted with its meaning and default; the ones that
need parts not built yet (validation images, checkpoints and resume, hub upload, datasets,
text-encoder training, class-image generation) stop with a message when set. mindflux adds
--device, --mode, --dynamic_shift and --precomputed_prompt_embeds. The output is
<output_dir>/pytorch_lora_weights.safetensors, which diffusers' FluxPipeline.load_lora_weights reads.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, ROOT)

logger = logging.getLogger("train_dreambooth_lora_flux")

DEFAULT_LORA_LAYERS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2"]
WEIGHTING_SCHEMES = ["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"]
TORCH_ADAMW_DEFAULT_LR = 1e-3  # polynomial decay measures lr_end against it in diffusers' script (see lr_schedules)

# Arguments whose features are not built yet: set to anything but their default, they stop the run.
NOT_YET = {
    "dataset_name": "loading a dataset by name; use --instance_data_dir",
    "revision": "hub revisions; give a local folder",
    "variant": "weight variants",
    "resume_from_checkpoint": "checkpoints and resume",
    "checkpoints_total_limit": "checkpoints and resume",
    "validation_prompt": "validation images",
    "push_to_hub": "hub upload",
    "hub_model_id": "hub upload",
    "hub_token": "hub upload",
    "train_text_encoder": "text-encoder LoRA training",
    "use_8bit_adam": "8-bit Adam (bitsandbytes is CUDA-only)",
    "caption_column": "per-image captions",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bool(value: str) -> bool:
    # diffusers declares these type=bool, which reads any non-empty string as True; "False"/"0" mean False here.
    return str(value).strip().lower() not in ("false", "0", "no", "")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="train_dreambooth_lora_flux.py", description="DreamBooth LoRA training of FLUX.1 (mindflux).")
    a = p.add_argument
    a("--pretrained_model_name_or_path", type=str, default=None, required=True,
      help="Local diffusers-format FLUX folder (transformer/, vae/, scheduler/, text encoders and tokenizers).")
    a("--revision", type=str, default=None, help="Hub revision (not supported: give a local folder).")
    a("--variant", type=str, default=None, help="Weight variant, e.g. fp16 (not supported yet).")
    a("--dataset_name", type=str, default=None, help="Dataset name (not supported yet; use --instance_data_dir).")
    a("--dataset_config_name", type=str, default=None, help="Dataset config (with --dataset_name).")
    a("--instance_data_dir", type=str, default=None, help="A folder containing the training images.")
    a("--cache_dir", type=str, default=None, help="Download cache (unused: no hub).")
    a("--image_column", type=str, default="image", help="Dataset image column (with --dataset_name).")
    a("--caption_column", type=str, default=None, help="Dataset caption column (not supported yet).")
    a("--repeats", type=int, default=1, help="How many times to repeat the training data.")
    a("--class_data_dir", type=str, default=None, help="A folder containing class images (prior preservation).")
    a("--instance_prompt", type=str, default=None, required=True,
      help="The prompt with identifier specifying the instance, e.g. 'photo of a TOK dog'.")
    a("--class_prompt", type=str, default=None, help="The prompt of the class images.")
    a("--max_sequence_length", type=int, default=512, help="Maximum T5 sequence length.")
    a("--validation_prompt", type=str, default=None, help="Validation prompt (not supported yet).")
    a("--num_validation_images", type=int, default=4, help="Images per validation.")
    a("--validation_epochs", type=int, default=50, help="Validate every X epochs.")
    a("--rank", type=int, default=4, help="The dimension of the LoRA update matrices.")
    a("--lora_alpha", type=int, default=4, help="LoRA alpha to be used for additional scaling.")
    a("--lora_dropout", type=float, default=0.0, help="Dropout probability for LoRA layers.")
    a("--with_prior_preservation", default=False, action="store_true", help="Add the prior preservation loss.")
    a("--prior_loss_weight", type=float, default=1.0, help="The weight of prior preservation loss.")
    a("--num_class_images", type=int, default=100, help="Class images for prior preservation.")
    a("--output_dir", type=str, default="flux-dreambooth-lora", help="Where the LoRA weights are written.")
    a("--seed", type=int, default=None, help="A seed for reproducible training.")
    a("--resolution", type=int, default=512, help="Square training resolution.")
    a("--center_crop", default=False, action="store_true", help="Center crop instead of random crop.")
    a("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    a("--train_text_encoder", action="store_true", help="Train the CLIP text encoder (not supported yet).")
    a("--train_batch_size", type=int, default=4, help="Batch size (per device).")
    a("--sample_batch_size", type=int, default=4, help="Batch size for sampling class images.")
    a("--num_train_epochs", type=int, default=1)
    a("--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides num_train_epochs.")
    a("--checkpointing_steps", type=int, default=500, help="Checkpoint every X updates (not built yet).")
    a("--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints (not built yet).")
    a("--resume_from_checkpoint", type=str, default=None, help="Resume from a checkpoint (not built yet).")
    a("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer update.")
    a("--gradient_checkpointing", action="store_true", help="Recompute block activations in the backward pass.")
    a("--learning_rate", type=float, default=1e-4, help="Learning rate after warmup.")
    a("--guidance_scale", type=float, default=3.5, help="Guidance embedding value for FLUX.1-dev.")
    a("--text_encoder_lr", type=float, default=5e-6, help="Text encoder learning rate (with --train_text_encoder).")
    a("--scale_lr", action="store_true", default=False,
      help="Scale the learning rate by devices, accumulation steps and batch size.")
    a("--lr_scheduler", type=str, default="constant",
      help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup".')
    a("--lr_warmup_steps", type=int, default=500, help="Warmup steps of the lr scheduler.")
    a("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    a("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    a("--dataloader_num_workers", type=int, default=0, help="Accepted for compatibility; data loads in-process.")
    a("--weighting_scheme", type=str, default="none", choices=WEIGHTING_SCHEMES,
      help='Timestep sampling / loss weighting; "none" is uniform sampling with unit weights.')
    a("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal scheme.")
    a("--logit_std", type=float, default=1.0, help="Std of the logit_normal scheme.")
    a("--mode_scale", type=float, default=1.29, help="Scale of the mode scheme.")
    a("--optimizer", type=str, default="AdamW",
      help='"AdamW" (torch.optim.AdamW\'s numbers), "prodigy" (prodigyopt\'s) or "AdamWeightDecay" (MindSpore\'s, '
           'no bias correction).')
    a("--use_8bit_adam", action="store_true", help="8-bit Adam (not supported).")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--prodigy_beta3", type=float, default=None)
    a("--prodigy_decouple", type=_bool, default=True)
    a("--adam_weight_decay", type=float, default=1e-04, help="Weight decay of the LoRA parameters.")
    a("--adam_weight_decay_text_encoder", type=float, default=1e-03)
    a("--lora_layers", type=str, default=None,
      help='Comma-separated transformer modules to train, e.g. "to_k,to_q,to_v,to_out.0".')
    a("--adam_epsilon", type=float, default=1e-08)
    a("--prodigy_use_bias_correction", type=_bool, default=True)
    a("--prodigy_safeguard_warmup", type=_bool, default=True)
    a("--max_grad_norm", default=1.0, type=float, help="Max gradient norm.")
    a("--push_to_hub", action="store_true", help="Push to the hub (not supported).")
    a("--hub_token", type=str, default=None)
    a("--hub_model_id", type=str, default=None)
    a("--logging_dir", type=str, default="logs")
    a("--allow_tf32", action="store_true", help="Accepted for compatibility (no effect on MindSpore).")
    a("--cache_latents", action="store_true", default=False, help="Encode the images once and keep the latents.")
    a("--report_to", type=str, default="tensorboard", help="Accepted; logging integrations are not built yet.")
    a("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
      help="Frozen weights in bf16/fp16 (GPU or Ascend); LoRA weights stay fp32.")
    a("--upcast_before_saving", action="store_true", default=False, help="Save the LoRA in fp32.")
    a("--prior_generation_precision", type=str, default=None, choices=["no", "fp32", "fp16", "bf16"])
    a("--local_rank", type=int, default=-1, help="For distributed training: local_rank")
    # mindflux's own
    a("--device", type=str, default="auto", help="auto (Ascend, then GPU, then CPU), cpu, gpu or ascend.")
    a("--mode", type=str, default="graph", choices=["graph", "pynative"],
      help="graph: the whole train step compiled once; pynative: op by op, for debugging.")
    a("--dynamic_shift", action="store_true",
      help="Shift the sampled sigmas by image size, as FLUX.1 was trained (off in diffusers' script).")
    a("--precomputed_prompt_embeds", type=str, default=None,
      help="A safetensors file with prompt_embeds (L, D) and pooled_prompt_embeds (P,) (and class_prompt_embeds, "
           "class_pooled_prompt_embeds with prior preservation), used instead of the text encoders.")
    args = p.parse_args(input_args)

    defaults = vars(p.parse_args(["--pretrained_model_name_or_path", "x", "--instance_prompt", "x"]))
    for name, what in NOT_YET.items():
        if getattr(args, name) != defaults[name]:
            p.error(f"--{name}: {what} is not supported by mindflux yet")
    if args.optimizer.lower() not in ("adamw", "adamweightdecay", "prodigy"):
        p.error(f"--optimizer {args.optimizer!r} is not supported; use AdamW, AdamWeightDecay or prodigy")
    if args.instance_data_dir is None:
        p.error("Specify --instance_data_dir")
    if args.with_prior_preservation:
        if args.class_data_dir is None:
            p.error("You must specify a data directory for class images (--class_data_dir).")
        if args.class_prompt is None:
            p.error("You must specify prompt for class images (--class_prompt).")
    else:
        if args.class_data_dir is not None:
            warnings.warn("You need not use --class_data_dir without --with_prior_preservation.", stacklevel=2)
        if args.class_prompt is not None:
            warnings.warn("You need not use --class_prompt without --with_prior_preservation.", stacklevel=2)
    for name in ("train_batch_size", "gradient_accumulation_steps", "rank", "resolution", "num_train_epochs",
                 "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1; got {getattr(args, name)}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        p.error(f"--max_train_steps must be at least 1; got {args.max_train_steps}")
    return args


# ---- text conditioning ------------------------------------------------------------------------------------
def load_prompt_embeds(args, weight_dtype):
    """(instance (embeds (1, L, D), pooled (1, P)), class pair or None) as numpy float32."""
    import numpy as np

    if args.precomputed_prompt_embeds is not None:
        from mindflux.safetensors_io import load_file

        if not os.path.isfile(args.precomputed_prompt_embeds):
            raise FileNotFoundError(f"--precomputed_prompt_embeds {args.precomputed_prompt_embeds} does not exist")
        arrays = load_file(args.precomputed_prompt_embeds)

        def pair(prefix):
            keys = (f"{prefix}prompt_embeds", f"{prefix}pooled_prompt_embeds")
            missing = [k for k in keys if k not in arrays]
            if missing:
                raise ValueError(f"--precomputed_prompt_embeds lacks {', '.join(missing)}")
            embeds, pooled = (np.asarray(arrays[k], np.float32) for k in keys)
            return embeds.reshape((1,) + embeds.shape[-2:]), pooled.reshape(1, -1)

        return pair(""), pair("class_") if args.with_prior_preservation else None
    return encode_prompts_with_text_encoders(args, weight_dtype)


def encode_prompts_with_text_encoders(args, weight_dtype):
    """CLIP pooled + T5 embeddings of the instance (and class) prompt, as the pipeline computes them."""
    import mindspore as ms
    from transformers import CLIPTokenizer, T5TokenizerFast  # after mindflux: it keeps torch out of transformers

    from mindflux import CLIPTextModel, T5EncoderModel
    from mindflux.text_encoding import encode_prompt

    folder = args.pretrained_model_name_or_path
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    tokenizer_2 = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", mindspore_dtype=weight_dtype)
    text_encoder_2 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", mindspore_dtype=weight_dtype)

    def encode(prompt):
        embeds, pooled, _ = encode_prompt(text_encoder, tokenizer, text_encoder_2, tokenizer_2, prompt,
                                          max_sequence_length=args.max_sequence_length)
        return embeds.astype(ms.float32).asnumpy(), pooled.astype(ms.float32).asnumpy()

    instance = encode(args.instance_prompt)
    class_pair = encode(args.class_prompt) if args.with_prior_preservation else None
    return instance, class_pair  # the encoders are dropped here, as diffusers frees them


# ---- training -----------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> str:
    import mindspore as ms
    import numpy as np
    from tqdm.auto import tqdm

    import mindflux
    from mindflux import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from mindflux.latents import normalize_latents, prepare_latent_image_ids, prepare_text_ids, standard_normal
    from mindflux.lora import LoraConfig
    from mindflux.training import (
        FlowMatchingSampler,
        FluxFlowMatchingLoss,
        LoRATrainStep,
        create_loss_scaler,
        create_optimizer,
        freeze,
        get_scheduler,
        resolve_weight_dtype,
    )
    from mindflux.training.data import DreamBoothImages

    device = mindflux.set_device(args.device, args.mode)
    weight_dtype = resolve_weight_dtype(args.mixed_precision)
    if args.seed is not None:
        ms.set_seed(args.seed)  # LoRA init and dropout; host randomness uses the generators below
    seed = np.random.SeedSequence(args.seed)
    data_rng, step_rng = (np.random.default_rng(s) for s in seed.spawn(2))

    folder = args.pretrained_model_name_or_path
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % (vae_scale_factor * 2):
        raise ValueError(f"--resolution {args.resolution} must be a multiple of {vae_scale_factor * 2} "
                         "(latents are packed in 2x2 patches)")
    # The prompts are encoded before the transformer is loaded, so T5 and the transformer are never
    # resident together (FLUX.1: 9.5 GB + 23.8 GB in bf16).
    (instance_embeds, instance_pooled), class_pair = load_prompt_embeds(args, weight_dtype)
    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    freeze(vae, transformer, dtype=weight_dtype)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    target_modules = ([m.strip() for m in args.lora_layers.split(",")] if args.lora_layers is not None
                      else DEFAULT_LORA_LAYERS)
    lora_config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             init_lora_weights="gaussian", target_modules=target_modules)
    transformer.add_adapter(lora_config)

    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size  # x 1 device
    params = transformer.lora_parameters()
    prodigy_options = {}
    if args.optimizer.lower() == "prodigy":
        if learning_rate <= 0.1:
            logger.warning("Learning rate is too low. When using prodigy, it's generally better to set learning "
                           "rate around 1.0")
        prodigy_options = dict(beta3=args.prodigy_beta3, decouple=args.prodigy_decouple,
                               use_bias_correction=args.prodigy_use_bias_correction,
                               safeguard_warmup=args.prodigy_safeguard_warmup)
    optimizer = create_optimizer(args.optimizer, params, betas=(args.adam_beta1, args.adam_beta2),
                                 eps=args.adam_epsilon, weight_decay=args.adam_weight_decay, **prodigy_options)

    images = DreamBoothImages(args.instance_data_dir, args.resolution, args.center_crop, args.random_flip,
                              args.repeats, args.class_data_dir if args.with_prior_preservation else None,
                              args.num_class_images, rng=data_rng)
    if args.with_prior_preservation and len(images.class_paths) < args.num_class_images:
        raise ValueError(f"--class_data_dir has {len(images.class_paths)} images and --num_class_images is "
                         f"{args.num_class_images}: generating class images is not supported by mindflux yet; "
                         "add images or lower --num_class_images")
    num_batches = math.ceil(len(images) / args.train_batch_size)
    num_update_steps_per_epoch = math.ceil(num_batches / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * num_update_steps_per_epoch
    num_train_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)
    lr_init = TORCH_ADAMW_DEFAULT_LR if args.optimizer.lower() == "adamw" else learning_rate
    lr_scheduler = get_scheduler(args.lr_scheduler, learning_rate, args.lr_warmup_steps, max_train_steps,
                                 args.lr_num_cycles, args.lr_power, lr_init=lr_init)

    loss_net = FluxFlowMatchingLoss(transformer, args.weighting_scheme, args.with_prior_preservation,
                                    args.prior_loss_weight)
    train_step = LoRATrainStep(loss_net, optimizer, lr_scheduler, args.max_grad_norm,
                               args.gradient_accumulation_steps, create_loss_scaler(args.mixed_precision))
    sampler = FlowMatchingSampler(noise_scheduler, args.weighting_scheme, args.logit_mean, args.logit_std,
                                  args.mode_scale, args.dynamic_shift, generator=step_rng)

    def encode(pixels: np.ndarray, moments_only: bool = False):
        posterior = vae.encode(ms.Tensor(pixels).astype(vae.dtype)).latent_dist
        if moments_only:
            return posterior.mean.float().asnumpy(), posterior.std.float().asnumpy()
        latents = posterior.sample(generator=step_rng)
        return normalize_latents(latents, vae.config.scaling_factor, vae.config.shift_factor).astype(weight_dtype)

    cache = None
    if args.cache_latents:
        cache = {}
        for i in tqdm(range(len(images)), desc="Caching latents"):
            cache[("instance", i % len(images.instance_pixels))] = encode(images.instance(i)[None], True)
            if args.with_prior_preservation:
                cache[("class", i % len(images.class_paths))] = encode(images.class_image(i)[None], True)

    def model_input(indices) -> ms.Tensor:
        keys = [("instance", int(i) % len(images.instance_pixels)) for i in indices]
        if args.with_prior_preservation:
            keys += [("class", int(i) % len(images.class_paths)) for i in indices]
        if cache is None:
            pixels = [images.instance(i) for i in indices]
            if args.with_prior_preservation:
                pixels += [images.class_image(i) for i in indices]
            return encode(np.stack(pixels))
        mean = np.concatenate([cache[k][0] for k in keys])
        std = np.concatenate([cache[k][1] for k in keys])
        latents = mean + std * standard_normal(mean.shape, step_rng)
        return normalize_latents(ms.Tensor(latents), vae.config.scaling_factor,
                                 vae.config.shift_factor).astype(weight_dtype)

    def text_inputs(batch: int):
        embeds, pooled = np.repeat(instance_embeds, batch, 0), np.repeat(instance_pooled, batch, 0)
        if class_pair is not None:
            embeds = np.concatenate([embeds, np.repeat(class_pair[0], batch, 0)])
            pooled = np.concatenate([pooled, np.repeat(class_pair[1], batch, 0)])
        return ms.Tensor(embeds).astype(weight_dtype), ms.Tensor(pooled).astype(weight_dtype)

    logger.info("***** Running training on %s (%s mode, weights %s) *****", device, args.mode, weight_dtype)
    logger.info("  Num examples = %d, batches per epoch = %d, epochs = %d", len(images), num_batches,
                num_train_epochs)
    logger.info("  Batch size = %d, accumulation steps = %d, optimization steps = %d", args.train_batch_size,
                args.gradient_accumulation_steps, max_train_steps)
    logger.info("  LoRA rank %d on %d layers: %d trainable parameters", args.rank, len(dict(transformer.lora_layers())),
                sum(int(np.prod(p.shape)) for p in params))
    txt_ids = prepare_text_ids(instance_embeds.shape[1])
    progress = tqdm(range(max_train_steps), desc="Steps")
    done = False
    if max_train_steps >= args.checkpointing_steps:
        logger.warning("--checkpointing_steps %d: checkpoints are not written by mindflux yet; only the final LoRA "
                       "is saved", args.checkpointing_steps)
    for _ in range(num_train_epochs):
        batches = images.epoch_batches(args.train_batch_size)
        for position, indices in enumerate(batches):
            latents = model_input(indices)
            b, _, h, w = latents.shape
            draw = sampler.sample(latents.shape)
            embeds, pooled = text_inputs(len(indices))
            inputs = [latents, ms.Tensor(draw.noise), ms.Tensor(draw.sigmas), ms.Tensor(draw.timesteps), embeds,
                      pooled, prepare_latent_image_ids(h // 2, w // 2), txt_ids]
            if transformer.config.guidance_embeds:
                inputs.append(ms.Tensor(np.full(b, args.guidance_scale, np.float32)))
            out = train_step(*inputs, end_of_epoch=position == len(batches) - 1)
            if not np.isfinite(out.loss):
                raise FloatingPointError(f"the loss became {out.loss} at step {train_step.global_step}")
            if out.sync_gradients:
                progress.update(1)
            progress.set_postfix(loss=f"{out.loss:.4f}", lr=f"{out.lr:.3g}")
            if train_step.global_step >= max_train_steps:
                done = True
                break
        if done:
            break
    progress.close()

    return save_lora(args, transformer, lora_config, weight_dtype)


def save_lora(args, transformer, lora_config, weight_dtype) -> str:
    """pytorch_lora_weights.safetensors in the weight dtype (fp32 with --upcast_before_saving), as diffusers saves."""
    import mindspore as ms

    from mindflux.lora import LORA_WEIGHT_NAME_SAFE, FluxLoraLoaderMixin, get_peft_model_state_dict
    from mindflux.lora.loader import pack_metadata, write_lora

    dtype = "fp32" if args.upcast_before_saving else {ms.bfloat16: "bf16", ms.float16: "fp16"}.get(weight_dtype, "fp32")

    def save_function(tensors, path):  # save_lora_weights writes fp32; this keeps the metadata in half precision
        write_lora(path, tensors, pack_metadata({"transformer": lora_config}), dtype=dtype)

    FluxLoraLoaderMixin.save_lora_weights(args.output_dir,
                                          transformer_lora_layers=get_peft_model_state_dict(transformer),
                                          transformer_lora_adapter_metadata=lora_config.to_dict(),
                                          save_function=None if dtype == "fp32" else save_function)
    path = os.path.join(args.output_dir, LORA_WEIGHT_NAME_SAFE)
    logger.info("Saved the LoRA weights (%s) to %s", dtype, path)
    return path


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ warnings would bury the progress bar
    from mindflux.modeling_utils import WeightsLoadingError

    try:
        main(args)
    except (ValueError, FileNotFoundError, FloatingPointError, WeightsLoadingError) as err:
        print(f"train_dreambooth_lora_flux.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
