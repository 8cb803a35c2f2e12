"""Exact resume of a Kontext run: 3 updates in one run and 1 + resume + 2 give the same LoRA (CPU, PyNative).

The run draws from every host generator the Kontext batch adds to DreamBooth's: the pair's shared flip,
the target's and the reference's latent samples (--vae_encode_mode sample), noise and sigmas. Two pairs
with batch 1 put the checkpoint in the middle of an epoch, and the resumed part crosses into the next
(a new order). Measured: the LoRA agrees bit for bit (0.0); the threshold is the DreamBooth test's 1e-6.
"""

from pathlib import Path

import numpy as np
from PIL import Image

from mindflux.safetensors_io import load_file
from mindflux.training.checkpoint import read_state
from tests.test_train_kontext import kontext_args, script, write_pairs
from tests.tiny_flux import make_images, make_model_folder, make_prompt_embeds

STEPS, INTERRUPTED = 3, 1


def test_an_interrupted_kontext_run_resumes_to_the_same_lora(tmp_path):
    make_model_folder(tmp_path / "model")
    make_images(tmp_path / "pairs" / "in", count=2, size=40)
    (tmp_path / "pairs" / "out").mkdir()
    for i in range(2):
        pixels = np.asarray(Image.open(tmp_path / "pairs" / "in" / f"{i:02d}.png"))
        Image.fromarray(pixels[:, ::-1] // 2).save(tmp_path / "pairs" / "out" / f"{i:02d}.png")
    write_pairs(tmp_path / "pairs", [(f"out/{i:02d}.png", f"in/{i:02d}.png") for i in range(2)])
    make_prompt_embeds(tmp_path / "embeds.safetensors")

    def run(out: Path, steps: int, *extra: str) -> int:
        args = kontext_args(tmp_path / "model", tmp_path / "pairs", out, tmp_path / "embeds.safetensors")
        return script.cli(args + ["--resolution", "16", "--train_batch_size", "1",
                                  "--random_flip", "--vae_encode_mode", "sample", "--learning_rate", "1e-2",
                                  "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--checkpointing_steps",
                                  str(INTERRUPTED), "--max_train_steps", str(steps), *extra])

    one, two = tmp_path / "one", tmp_path / "two"
    assert run(one, STEPS) == 0
    assert run(two, INTERRUPTED) == 0
    halfway = load_file(str(two / "pytorch_lora_weights.safetensors"))
    assert run(two, STEPS, "--resume_from_checkpoint", "latest") == 0

    full = load_file(str(one / "pytorch_lora_weights.safetensors"))
    assert any("proj_mlp" in k for k in full)  # Kontext's targets
    error = largest_difference(full, load_file(str(two / "pytorch_lora_weights.safetensors")))
    moved = largest_difference(full, halfway)
    assert error <= 1e-6 and moved > 1e-3, (error, moved)
    # the last checkpoints hold the same optimizer state, data position and generator states
    last = f"checkpoint-{STEPS}"
    states = [load_file(str(d / last / "training_state.safetensors")) for d in (one, two)]
    assert largest_difference(*states) <= 1e-6
    assert read_state(str(one / last))["rng"] == read_state(str(two / last))["rng"]


def largest_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two files' tensors; they must hold the same names."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
