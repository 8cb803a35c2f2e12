"""Exact resume: N updates in one run and N/2 + resume + N/2 give the same LoRA (graph mode, fp32, CPU).

The run uses every source of host randomness: the epoch order, per-step flips and caption drops,
noise, sigmas and latent samples, and the checkpoint falls in the middle of an epoch. Measured:
the weights agree bit for bit (max difference 0.0); the threshold is the issue's 1e-6.
"""

import importlib.util
from pathlib import Path

import numpy as np

from mindflux.safetensors_io import load_file
from mindflux.training.checkpoint import list_checkpoints, read_state
from tests.tiny_flux import make_images, make_model_folder

SCRIPT = Path(__file__).resolve().parents[1] / "train" / "train_dreambooth_lora_flux.py"
spec = importlib.util.spec_from_file_location("train_dreambooth_lora_flux_resume", SCRIPT)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

STEPS = 6  # 5 images, batch 1: the checkpoint at step 3 is mid-epoch, and the resumed half crosses an epoch


def test_resume_gives_the_same_lora_as_one_run(tmp_path, graph_mode):
    make_model_folder(tmp_path / "model")
    make_images(tmp_path / "instance", count=5, size=40)
    base = ["--pretrained_model_name_or_path", str(tmp_path / "model"), "--instance_data_dir",
            str(tmp_path / "instance"), "--instance_prompt", "a photo of sks thing", "--resolution", "32",
            "--device", "cpu", "--mode", "graph", "--seed", "0", "--learning_rate", "1e-2", "--max_sequence_length",
            "8", "--train_batch_size", "1", "--random_flip", "--caption_dropout", "0.3", "--lr_scheduler", "cosine",
            "--lr_warmup_steps", "2", "--report_to", "none", "--checkpointing_steps", str(STEPS // 2)]
    one, two = tmp_path / "one", tmp_path / "two"
    assert script.cli(base + ["--output_dir", str(one), "--max_train_steps", str(STEPS)]) == 0
    assert script.cli(base + ["--output_dir", str(two), "--max_train_steps", str(STEPS // 2)]) == 0
    halfway = load_file(str(two / "pytorch_lora_weights.safetensors"))
    assert script.cli(base + ["--output_dir", str(two), "--max_train_steps", str(STEPS), "--resume_from_checkpoint",
                              "latest", "--checkpoints_total_limit", "1"]) == 0

    # checkpoint-3 was pruned by --checkpoints_total_limit 1 once checkpoint-6 was written
    assert [Path(p).name for p in list_checkpoints(str(two))] == [f"checkpoint-{STEPS}"]
    full, resumed = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (one, two))
    assert full.keys() == resumed.keys()
    error = max(float(np.abs(full[k] - resumed[k]).max()) for k in full)
    moved = max(float(np.abs(full[k] - halfway[k]).max()) for k in full)
    assert error <= 1e-6 and moved > 1e-3, (error, moved)
    # the checkpoints of both runs hold the same optimizer state and data position
    a, b = (load_file(str(d / f"checkpoint-{STEPS}" / "training_state.safetensors")) for d in (one, two))
    assert max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a) <= 1e-6
    assert read_state(str(one / f"checkpoint-{STEPS}"))["rng"] == read_state(str(two / f"checkpoint-{STEPS}"))["rng"]
