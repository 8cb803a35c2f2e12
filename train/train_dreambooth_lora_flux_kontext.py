#!/usr/bin/env python
"""FLUX.1 Kontext LoRA training (image editing) on MindSpore, with diffusers' train_dreambooth_lora_flux_kontext.py
arguments.

    python train/train_dreambooth_lora_flux_kontext.py --pretrained_model_name_or_path FLUX.1-Kontext-dev \\
        --dataset_name pairs --image_column output --cond_image_column input --caption_column text \\
        --output_dir out --mixed_precision bf16 --resolution 512 --train_batch_size 1 --max_train_steps 500 \\
        --validation_prompt "make it blue" --validation_image pairs/in/0.png --seed 0

`pairs/metadata.jsonl` holds one JSON object a line: the edited image (--image_column), the image it was
made from (--cond_image_column), both relative to the folder, and its instruction (--caption_column;
--instance_prompt when missing). Every DreamBooth LoRA option that applies works as in
train_dreambooth_lora_flux.py (msrun too); the run is mindflux.training.kontext (docs/training.md). The
output, <output_dir>/pytorch_lora_weights.safetensors, loads with FluxKontextPipeline.load_lora_weights.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, ROOT)
if __name__ == "__main__":  # SIGINT/SIGTERM blocked before MindSpore starts threads, which inherit the mask
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM))  # see mindflux/interrupts.py

from mindflux.training.arguments import (  # noqa: E402
    add_kontext_arguments,
    check_arguments,
    check_kontext_arguments,
    run_cli,
    training_parser,
)
from mindflux.training.kontext import train_kontext  # noqa: E402

PROG = "train_dreambooth_lora_flux_kontext.py"


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = training_parser(PROG, "Kontext (image editing) LoRA training of FLUX.1 (mindflux).",
                             output_dir="flux-kontext-lora", instance_prompt_required=False)
    add_kontext_arguments(parser)
    return check_kontext_arguments(parser, check_arguments(parser, parser.parse_args(input_args)))


def cli(argv: list[str] | None = None) -> int:
    """Parse and train; an expected failure is one line on stderr (exit 1), Ctrl-C / SIGTERM exit 130 / 143."""
    return run_cli(PROG, parse_args, train_kontext, argv)


if __name__ == "__main__":
    sys.exit(cli())
