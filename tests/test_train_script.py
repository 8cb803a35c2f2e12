"""train/train_dreambooth_lora_flux.py end to end on a tiny model folder (CPU, fp32), and its CLI errors."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mindflux.safetensors_io import SafetensorsFile, load_file
from tests.tiny_flux import make_images, make_model_folder, make_prompt_embeds

SCRIPT = Path(__file__).resolve().parents[1] / "train" / "train_dreambooth_lora_flux.py"
spec = importlib.util.spec_from_file_location("train_dreambooth_lora_flux", SCRIPT)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_model_folder(root / "model")
    make_images(root / "instance", count=3, size=40)
    make_images(root / "class", count=2, size=36, seed=5)
    make_prompt_embeds(root / "embeds.safetensors", with_class=True)
    return root


def base_args(root: Path, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / "model"), "--instance_data_dir", str(root / "instance"),
            "--instance_prompt", "a photo of sks thing", "--output_dir", str(out), "--resolution", "32",
            "--precomputed_prompt_embeds", str(root / "embeds.safetensors"), "--device", "cpu", "--mode", "pynative",
            "--seed", "0", "--learning_rate", "1e-3"]


def test_trains_and_writes_a_diffusers_lora(workdir, tmp_path):
    args = base_args(workdir, tmp_path) + ["--train_batch_size", "2", "--max_train_steps", "2", "--rank", "2",
                                           "--lora_layers", "to_q,to_k,proj_mlp", "--weighting_scheme", "logit_normal",
                                           "--gradient_accumulation_steps", "2", "--lr_scheduler", "linear",
                                           "--lr_warmup_steps", "0", "--random_flip", "--optimizer", "prodigy"]
    assert script.cli(args) == 0
    path = tmp_path / "pytorch_lora_weights.safetensors"
    weights = load_file(str(path))
    # to_q/to_k of 1 double + 1 single block, plus the single block's proj_mlp: 5 layers, A and B each
    assert len(weights) == 10 and all(k.startswith("transformer.") for k in weights)
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in weights
    assert weights["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (2, 32)
    b_weights = [v for k, v in weights.items() if ".lora_B." in k]
    assert all(np.abs(v).max() > 0 for v in b_weights)  # B starts at zero: non-zero means it trained
    header = SafetensorsFile(str(path))
    assert {header.dtype(k) for k in header.keys()} == {"F32"}
    metadata = json.loads(header.metadata["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 2 and metadata["transformer.lora_alpha"] == 4


def test_prompts_are_encoded_with_the_folders_text_encoders(workdir, tmp_path):
    """Without precomputed embeddings the script encodes the prompts with the model folder's CLIP and T5."""
    args = base_args(workdir, tmp_path)
    position = args.index("--precomputed_prompt_embeds")
    del args[position:position + 2]
    assert script.cli(args + ["--max_train_steps", "1", "--max_sequence_length", "16"]) == 0
    weights = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert len(weights) == 2 * 15  # diffusers' 12 default targets: 12 + 3 (single block q/k/v) layers


def test_prior_preservation_and_cached_latents_run(workdir, tmp_path):
    args = base_args(workdir, tmp_path) + ["--train_batch_size", "1", "--max_train_steps", "1",
                                           "--with_prior_preservation", "--class_data_dir", str(workdir / "class"),
                                           "--class_prompt", "a photo of a thing", "--num_class_images", "2",
                                           "--cache_latents", "--center_crop"]
    assert script.cli(args) == 0
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("extra, code, message", [
    (["--mixed_precision", "bf16"], 1, "needs a GPU or Ascend device"),
    (["--resolution", "30"], 1, "must be a multiple of 4"),
    (["--validation_prompt", "x"], 2, "--validation_prompt: validation images is not supported"),
    (["--optimizer", "sgd"], 2, "use AdamW, AdamWeightDecay or prodigy"),
    (["--with_prior_preservation"], 2, "data directory for class images"),
    (["--with_prior_preservation", "--class_data_dir", "CLASS", "--class_prompt", "c"], 1,
     "generating class images is not supported"),
    (["--weighting_scheme", "uniform"], 2, "invalid choice"),
])
def test_bad_input_is_one_line_and_non_zero(workdir, tmp_path, capsys, extra, code, message):
    extra = [str(workdir / "class") if e == "CLASS" else e for e in extra]
    with pytest.raises(SystemExit) if code == 2 else _no_raise():
        assert script.cli(base_args(workdir, tmp_path) + extra) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err), err


def test_missing_instance_folder_is_named(workdir, tmp_path, capsys):
    args = base_args(workdir, tmp_path)
    args[args.index("--instance_data_dir") + 1] = str(tmp_path / "nope")
    assert script.cli(args + ["--max_train_steps", "1"]) == 1
    assert "nope does not exist" in capsys.readouterr().err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
