#!/usr/bin/env python
"""DreamBooth LoRA training of FLUX.1 on MindSpore, with diffusers' train_dreambooth_lora_flux.py arguments.

    python train/train_dreambooth_lora_flux.py --pretrained_model_name_or_path FLUX.1-dev \\
        --instance_data_dir dog --instance_prompt "a photo of sks dog" --output_dir out \\
        --mixed_precision bf16 --resolution 512 --train_batch_size 1 --max_train_steps 500 --seed 0

    msrun --worker_num=8 --local_worker_num=8 --master_port=8118 --join=True --log_dir=msrun_logs \\
        train/train_dreambooth_lora_flux.py ...        # data parallel, one process per NPU

Every argument of diffusers' script (v0.35.2) is accepted with its meaning and default; those that
need the Hub or CUDA-only packages stop with a message when set. The run itself is
mindflux.training.dreambooth (docs/training.md). The output is
<output_dir>/pytorch_lora_weights.safetensors, which diffusers' FluxPipeline.load_lora_weights reads.
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

from mindflux.training.arguments import check_arguments, run_cli, training_parser  # noqa: E402
from mindflux.training.dreambooth import train  # noqa: E402

PROG = "train_dreambooth_lora_flux.py"


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = training_parser(PROG, "DreamBooth LoRA training of FLUX.1 (mindflux).")
    return check_arguments(parser, parser.parse_args(input_args))


def cli(argv: list[str] | None = None) -> int:
    """Parse and train; an expected failure is one line on stderr (exit 1), Ctrl-C / SIGTERM exit 130 / 143."""
    return run_cli(PROG, parse_args, train, argv)


if __name__ == "__main__":
    sys.exit(cli())
