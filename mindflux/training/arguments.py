"""The training scripts' command line: diffusers' argument names, meanings and defaults, and their checks.

    parser = training_parser("train_dreambooth_lora_flux.py", "DreamBooth LoRA training of FLUX.1 (mindflux).")
    args = check_arguments(parser, parser.parse_args(argv))
    sys.exit(run_cli("train_dreambooth_lora_flux.py", train, TrainingConfig.from_arguments(vars(args))))

Every argument of diffusers' train_dreambooth_lora_flux.py (v0.35.2) is accepted with its meaning and
default; those that need the Hub or CUDA-only packages stop with a message when set. The Kontext
script adds its own few (kontext.add_kontext_arguments). Bad values stop with one line naming the
option, before anything is loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Callable

from .argument_checks import check_training_values
from .data_source import check_dataset_name

WEIGHTING_SCHEMES = ["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"]

# Arguments whose features cannot exist here: set to anything but their default, they stop the run.
NOT_SUPPORTED = {
    "variant": "weight variants; give a folder with the weights to use",
    "push_to_hub": "hub upload",
    "hub_model_id": "hub upload",
    "hub_token": "hub upload",
    "use_8bit_adam": "8-bit Adam (bitsandbytes is CUDA-only)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bool(value: str) -> bool:
    # diffusers declares these type=bool, which reads any non-empty string as True; "False"/"0" mean False here.
    return str(value).strip().lower() not in ("false", "0", "no", "")


def training_parser(prog: str, description: str, output_dir: str = "flux-dreambooth-lora",
                    instance_prompt_required: bool = True) -> argparse.ArgumentParser:
    """A parser with every argument the DreamBooth and Kontext scripts share."""
    p = _Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--pretrained_model_name_or_path", type=str, default=None, required=True,
      help="A diffusers-format FLUX folder (transformer/, vae/, scheduler/, text encoders and tokenizers) or a "
           "Hub repo id (MINDFLUX_MODEL_SOURCE=modelscope for ModelScope ids).")
    a("--revision", type=str, default=None, help="Hub revision (branch, tag or commit) of a repo id.")
    a("--variant", type=str, default=None, help="Weight variant, e.g. fp16 (not supported yet).")
    a("--dataset_name", type=str, default=None,
      help="A local folder with metadata.jsonl (image paths relative to it), or anything the datasets library "
           "loads (pip install datasets): a Hub dataset id, a save_to_disk or parquet/imagefolder folder.")
    a("--dataset_config_name", type=str, default=None, help="The datasets library's config of --dataset_name.")
    a("--instance_data_dir", type=str, default=None, help="A folder containing the training images.")
    a("--cache_dir", type=str, default=None,
      help="Hub download cache of the model and of a --dataset_name the datasets library loads.")
    a("--image_column", type=str, default="image",
      help="Column (metadata.jsonl key) of the image: an image or a file path ('file_name' also works in "
           "metadata.jsonl).")
    a("--caption_column", type=str, default=None,
      help="Column (metadata.jsonl key) of the caption (default: text, caption or prompt when present).")
    a("--repeats", type=int, default=1, help="How many times to repeat the training data.")
    a("--class_data_dir", type=str, default=None, help="A folder containing class images (prior preservation).")
    a("--instance_prompt", type=str, default=None, required=instance_prompt_required,
      help="The prompt with identifier specifying the instance, e.g. 'photo of a TOK dog'.")
    a("--class_prompt", type=str, default=None, help="The prompt of the class images.")
    a("--max_sequence_length", type=int, default=512, help="Maximum T5 sequence length.")
    a("--validation_prompt", type=str, default=None, help="Prompt rendered every --validation_epochs and at the end.")
    a("--num_validation_images", type=int, default=4, help="Images per validation.")
    a("--validation_epochs", type=int, default=50, help="Validate every X epochs.")
    a("--rank", type=int, default=4, help="The dimension of the LoRA update matrices.")
    a("--lora_alpha", type=int, default=4, help="LoRA alpha to be used for additional scaling.")
    a("--lora_dropout", type=float, default=0.0, help="Dropout probability for LoRA layers.")
    a("--with_prior_preservation", default=False, action="store_true", help="Add the prior preservation loss.")
    a("--prior_loss_weight", type=float, default=1.0, help="The weight of prior preservation loss.")
    a("--num_class_images", type=int, default=100, help="Class images for prior preservation.")
    a("--output_dir", type=str, default=output_dir, help="Where the LoRA weights are written.")
    a("--seed", type=int, default=None, help="A seed for reproducible training.")
    a("--resolution", type=int, default=512, help="Square training resolution.")
    a("--center_crop", default=False, action="store_true", help="Center crop instead of random crop.")
    a("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    a("--train_text_encoder", action="store_true",
      help="Train a LoRA on CLIP too (T5 stays frozen), at --text_encoder_lr.")
    a("--train_batch_size", type=int, default=4, help="Batch size (per device).")
    a("--sample_batch_size", type=int, default=4, help="Batch size for sampling class images.")
    a("--num_train_epochs", type=int, default=1, help="Epochs to train (unless --max_train_steps is set).")
    a("--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides num_train_epochs.")
    a("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every X updates.")
    a("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints (oldest go first).")
    a("--resume_from_checkpoint", type=str, default=None,
      help='Resume from a checkpoint folder, or "latest" (the newest in --output_dir).')
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
    a("--dataloader_num_workers", type=int, default=0, help="Threads decoding the images at start (0: none).")
    a("--weighting_scheme", type=str, default="none", choices=WEIGHTING_SCHEMES,
      help='Timestep sampling / loss weighting; "none" is uniform sampling with unit weights.')
    a("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal scheme.")
    a("--logit_std", type=float, default=1.0, help="Std of the logit_normal scheme.")
    a("--mode_scale", type=float, default=1.29, help="Scale of the mode scheme.")
    a("--optimizer", type=str, default="AdamW",
      help='"AdamW" (torch.optim.AdamW\'s numbers), "prodigy" (prodigyopt\'s) or "AdamWeightDecay" (MindSpore\'s, '
           'no bias correction).')
    a("--use_8bit_adam", action="store_true", help="8-bit Adam (not supported).")
    a("--adam_beta1", type=float, default=0.9, help="Beta1 of AdamW and prodigy.")
    a("--adam_beta2", type=float, default=0.999, help="Beta2 of AdamW and prodigy.")
    a("--prodigy_beta3", type=float, default=None, help="Prodigy's beta3 (None: the square root of beta2).")
    a("--prodigy_decouple", type=_bool, default=True, help="Prodigy: AdamW-style decoupled weight decay.")
    a("--adam_weight_decay", type=float, default=1e-04, help="Weight decay of the LoRA parameters.")
    a("--adam_weight_decay_text_encoder", type=float, default=1e-03,
      help="Weight decay of the text encoder's LoRA parameters.")
    a("--lora_layers", type=str, default=None,
      help='Comma-separated transformer modules to train, e.g. "to_k,to_q,to_v,to_out.0".')
    a("--adam_epsilon", type=float, default=1e-08, help="Epsilon of AdamW and prodigy.")
    a("--prodigy_use_bias_correction", type=_bool, default=True, help="Prodigy: Adam's bias correction.")
    a("--prodigy_safeguard_warmup", type=_bool, default=True,
      help="Prodigy: no D estimate growth during warmup.")
    a("--max_grad_norm", default=1.0, type=float, help="Max gradient norm.")
    a("--push_to_hub", action="store_true", help="Push to the hub (not supported).")
    a("--hub_token", type=str, default=None, help="Hub token (not supported).")
    a("--hub_model_id", type=str, default=None, help="Hub repository (not supported).")
    a("--logging_dir", type=str, default="logs", help="Under --output_dir: train_log.jsonl and TensorBoard events.")
    a("--allow_tf32", action="store_true", help="TF32 matmuls and convolutions on NVIDIA GPUs (no effect elsewhere).")
    a("--cache_latents", action="store_true", default=False, help="Encode the images once and keep the latents.")
    a("--report_to", type=str, default=None,
      help='"tensorboard" or "none"; unset: TensorBoard when tensorboardX is installed (pip install '
           'mindflux[tensorboard]), else the JSON-lines log only, which is always written.')
    a("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
      help="Frozen weights in bf16/fp16; LoRA weights stay fp32. Default: the device's (bf16 on Ascend Atlas A2, "
           "fp16 on GPUs and the Ascend 910A, fp32 ('no') on the CPU); fp32 on a card is refused when FLUX cannot fit.")
    a("--upcast_before_saving", action="store_true", default=False, help="Save the LoRA in fp32.")
    a("--prior_generation_precision", type=str, default=None, choices=["no", "fp32", "fp16", "bf16"],
      help="Precision of the class image generation (None: the weights' precision).")
    a("--local_rank", type=int, default=-1, help="Accepted for launchers; under msrun the rank comes from the cluster.")
    # mindflux's own
    a("--device", type=str, default="auto", help="auto (Ascend, then GPU, then CPU), cpu, gpu or ascend.")
    a("--mode", type=str, default="graph", choices=["graph", "pynative"],
      help="graph: the whole train step compiled once; pynative: op by op, for debugging.")
    a("--dynamic_shift", action="store_true",
      help="Shift the sampled sigmas by image size, as FLUX.1 was trained (off in diffusers' script).")
    a("--aspect_ratio_buckets", type=str, default=None,
      help='Train on several shapes: "h1,w1;h2,w2;..." (multiples of 16); each image goes to the nearest aspect '
           "ratio and batches hold one shape.")
    a("--caption_dropout", type=float, default=0.0, help="Probability of training a sample with the empty caption.")
    a("--export_kohya", action="store_true",
      help="Also write pytorch_lora_weights_kohya.safetensors (kohya format, for ComfyUI).")
    a("--validation_resolution", type=int, default=None, help="Validation image size (default: the pipeline's, 1024).")
    a("--num_inference_steps", type=int, default=28, help="Denoising steps of validation and class images.")
    a("--overwrite_output_dir", action="store_true",
      help="Start a fresh run in an --output_dir that holds an earlier run's LoRA or checkpoints; its files are moved "
           "into <output_dir>/previous-N (not deleted).")
    a("--precomputed_prompt_embeds", type=str, default=None,
      help="A safetensors file with prompt_embeds (L, D) and pooled_prompt_embeds (P,) (and class_prompt_embeds, "
           "class_pooled_prompt_embeds with prior preservation), used instead of the text encoders.")
    return p


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The shared checks (p.error names the option); --dataset_name is checked, not read (data_source.py)."""
    for name, what in NOT_SUPPORTED.items():
        if getattr(args, name) != p.get_default(name):
            p.error(f"--{name}: {what} is not supported by mindflux")
    if args.optimizer.lower() not in ("adamw", "adamweightdecay", "prodigy"):
        p.error(f"--optimizer {args.optimizer!r} is not supported; use AdamW, AdamWeightDecay or prodigy")
    if args.dataset_name is not None:
        if args.instance_data_dir is not None:
            p.error("Specify only one of --dataset_name or --instance_data_dir")
        problem = check_dataset_name(args.dataset_name, args.dataset_config_name)
        if problem:
            p.error(problem)
    elif args.instance_data_dir is None:
        p.error("Specify either --dataset_name or --instance_data_dir")
    elif args.dataset_config_name is not None:
        p.error("--dataset_config_name needs --dataset_name")
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
                 "repeats", "checkpointing_steps", "validation_epochs", "sample_batch_size", "num_inference_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1; got {getattr(args, name)}")
    for name in ("max_train_steps", "checkpoints_total_limit", "validation_resolution"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1; got {getattr(args, name)}")
    if not 0.0 <= args.caption_dropout <= 1.0:
        p.error(f"--caption_dropout must be in [0, 1]; got {args.caption_dropout}")
    if args.dataloader_num_workers < 0:
        p.error(f"--dataloader_num_workers must be >= 0; got {args.dataloader_num_workers}")
    problem = check_training_values(vars(args))
    if problem:
        p.error(problem)
    if args.report_to is not None and args.report_to.lower() not in ("tensorboard", "all", "none"):
        p.error(f"--report_to {args.report_to}: mindflux reports to tensorboard or none (wandb and comet_ml are not "
                "supported)")
    return args



def run_cli(prog: str, parse_args: Callable, train: Callable, argv: list[str] | None = None) -> int:
    """Parse, build the TrainingConfig and train; every expected failure becomes one line on stderr and exit
    status 1; SIGINT / SIGTERM end it with 130 / 143, one line naming the last checkpoint, and no traceback.
    The script must have blocked SIGINT / SIGTERM before importing mindflux (see mindflux/interrupts.py)."""
    from ..interrupts import exit_code, interrupt_guard

    with interrupt_guard(prog):
        args = parse_args(argv)
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
        from ..modeling_utils import WeightsLoadingError
        from ..safetensors_io import SafetensorsError
        from .output_dir import interrupted_message
        from .run_config import TrainingConfig

        try:
            train(TrainingConfig.from_arguments(vars(args)))
        except KeyboardInterrupt as err:
            print(f"{prog}: interrupted; {interrupted_message(args.output_dir)}", file=sys.stderr)
            return exit_code(err)
        except (ValueError, FileNotFoundError, FloatingPointError, WeightsLoadingError, SafetensorsError,
                OSError) as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 1
    return 0


def add_kontext_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments diffusers' train_dreambooth_lora_flux_kontext.py adds."""
    a = p.add_argument
    a("--cond_image_column", type=str, default=None, required=True,
      help="Column (metadata.jsonl key) of the reference (condition) image; --image_column is the edited target.")
    a("--validation_image", type=str, default=None, help="The image to edit in validation (with --validation_prompt).")
    a("--vae_encode_mode", type=str, default="mode", choices=["sample", "mode"],
      help="Latents from the VAE posterior's mode (its mean; diffusers' default here) or a sample.")


def check_kontext_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.with_prior_preservation:
        p.error("--with_prior_preservation is not supported with --cond_image_column (as in diffusers)")
    if args.train_text_encoder:
        p.error("--train_text_encoder is not supported with --cond_image_column (as in diffusers)")
    if args.validation_image is not None and not os.path.isfile(args.validation_image):
        p.error(f"--validation_image {args.validation_image} does not exist")
    return args
