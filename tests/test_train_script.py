"""train/train_dreambooth_lora_flux.py end to end on a tiny model folder (CPU, fp32, PyNative), and its errors."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mindflux.lora import detect_format
from mindflux.safetensors_io import SafetensorsFile, load_file
from mindflux.training.checkpoint import read_state
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


def base_args(root: Path, out: Path, embeds: bool = True) -> list[str]:
    args = ["--pretrained_model_name_or_path", str(root / "model"), "--instance_data_dir", str(root / "instance"),
            "--instance_prompt", "a photo of sks thing", "--output_dir", str(out), "--resolution", "32",
            "--device", "cpu", "--mode", "pynative", "--seed", "0", "--learning_rate", "1e-3", "--report_to", "none"]
    return args + (["--precomputed_prompt_embeds", str(root / "embeds.safetensors")] if embeds
                   else ["--max_sequence_length", "16"])


def lora_b_trained(weights: dict, prefix: str = "transformer.") -> bool:
    b_weights = [v for k, v in weights.items() if k.startswith(prefix) and ".lora_B." in k]
    return bool(b_weights) and all(np.abs(v).max() > 0 for v in b_weights)  # B starts at zero


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
    assert lora_b_trained(weights)
    header = SafetensorsFile(str(path))
    assert {header.dtype(k) for k in header.keys()} == {"F32"}
    metadata = json.loads(header.metadata["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 2 and metadata["transformer.lora_alpha"] == 4
    records = [json.loads(line) for line in open(tmp_path / "logs" / "train_log.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["s_per_step"] > 0 and r["lr"] > 0 for r in steps)
    assert records[-1]["event"] == "summary" and records[-1]["host_peak_gib"] > 0
    card = (tmp_path / "README.md").read_text()
    assert "a photo of sks thing" in card and str(workdir / "model") in card and "| `--rank` | `2` |" in card


def test_captions_and_caption_dropout_with_the_folders_text_encoders(workdir, tmp_path):
    """Per-image .txt captions and the empty caption (dropout) are encoded with the folder's CLIP and T5."""
    data = tmp_path / "captioned"
    make_images(data, count=2, size=40)
    (data / "00.txt").write_text("a photo of sks thing on a table", encoding="utf-8")
    args = base_args(workdir, tmp_path / "out", embeds=False)
    args[args.index("--instance_data_dir") + 1] = str(data)
    assert script.cli(args + ["--max_train_steps", "1", "--caption_dropout", "0.5", "--train_batch_size", "2"]) == 0
    weights = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert len(weights) == 2 * 15  # diffusers' 12 default targets: 12 + 3 (single block q/k/v) layers


def test_prior_preservation_generates_the_missing_class_images(workdir, tmp_path):
    from mindflux import FluxPipeline
    from mindflux.training.generation import generate_images

    class_dir = tmp_path / "class"
    make_images(class_dir, count=1, size=36, seed=5)  # one there, one to generate
    args = base_args(workdir, tmp_path / "out", embeds=False) + [
        "--train_batch_size", "1", "--max_train_steps", "1", "--with_prior_preservation", "--class_data_dir",
        str(class_dir), "--class_prompt", "a photo of a thing", "--num_class_images", "2", "--cache_latents",
        "--center_crop", "--num_inference_steps", "2", "--sample_batch_size", "2"]
    assert script.cli(args) == 0
    made = [p for p in sorted(class_dir.iterdir()) if p.name != "00.png"]
    assert len(made) == 1 and made[0].name.startswith("1-") and made[0].suffix == ".jpg"
    # the image is the pipeline's with the seed's generator, saved as JPEG
    pipe = FluxPipeline.from_pretrained(str(workdir / "model"))
    pipe.set_progress_bar_config(disable=True)
    expected = generate_images(pipe, 1, prompt="a photo of a thing", generator=np.random.default_rng([0, 0]),
                               height=32, width=32, num_inference_steps=2, max_sequence_length=16)[0]
    expected.save(tmp_path / "expected.jpg", format="JPEG")
    np.testing.assert_array_equal(np.asarray(Image.open(made[0])), np.asarray(Image.open(tmp_path / "expected.jpg")))
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_validation_images_model_card_kohya_and_tensorboard(workdir, tmp_path):
    tensorboard = importlib.util.find_spec("tensorboardX") is not None  # only the events file needs it
    out = tmp_path / "out"
    args = base_args(workdir, out, embeds=False) + [
        "--train_batch_size", "3", "--max_train_steps", "2", "--validation_prompt", "sks thing on the moon",
        "--num_validation_images", "2", "--validation_epochs", "1", "--validation_resolution", "32",
        "--num_inference_steps", "2", "--export_kohya", "--report_to", "tensorboard" if tensorboard else "none"]
    assert script.cli(args) == 0
    # 3 images in batches of 3: one update per epoch, validation after epochs 0 and 1, then with the saved file
    names = sorted(os.listdir(out / "validation"))
    assert names == [f"step{s:06d}_epoch{e:04d}_{i}.png" for s, e in ((1, 0), (2, 1)) for i in (0, 1)]
    # the final images come from the LoRA file loaded back: the same pixels as the last in-training validation
    for i in (0, 1):
        final = np.asarray(Image.open(out / f"image_{i}.png"))
        np.testing.assert_array_equal(final, np.asarray(Image.open(out / "validation" / names[2 + i])))
    assert not np.array_equal(np.asarray(Image.open(out / "validation" / names[0])),
                              np.asarray(Image.open(out / "validation" / names[2])))  # training changed them
    card = (out / "README.md").read_text()
    assert "![image_0.png](image_0.png)" in card and "pytorch_lora_weights_kohya.safetensors" in card
    assert "instance_prompt: \"a photo of sks thing\"" in card and "sks thing on the moon" in card
    kohya = load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
    assert detect_format(kohya) == "kohya"
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in kohya)
    if tensorboard:
        assert any(n.startswith("events.out.tfevents") for n in os.listdir(out / "logs"))
    events = [json.loads(line) for line in open(out / "logs" / "train_log.jsonl") if '"event"' in line]
    assert [e["final"] for e in events if e["event"] == "validation"] == [False, False, True]


def test_text_encoder_lora_trains_at_its_own_learning_rate(workdir, tmp_path):
    """AdamW's first update moves every weight by lr * g / (|g| + eps), so the largest change is the group's lr."""
    args = base_args(workdir, tmp_path, embeds=False) + ["--train_batch_size", "1", "--max_train_steps", "1",
                                                         "--train_text_encoder", "--text_encoder_lr", "1e-5"]
    assert script.cli(args) == 0
    path = tmp_path / "pytorch_lora_weights.safetensors"
    weights = load_file(str(path))
    assert lora_b_trained(weights, "transformer.") and lora_b_trained(weights, "text_encoder.")
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in weights
    largest = {c: max(float(np.abs(v).max()) for k, v in weights.items() if k.startswith(c) and ".lora_B." in k)
               for c in ("transformer.", "text_encoder.")}
    assert largest["transformer."] == pytest.approx(1e-3, rel=1e-3)
    assert largest["text_encoder."] == pytest.approx(1e-5, rel=1e-3)
    metadata = json.loads(SafetensorsFile(str(path)).metadata["lora_adapter_metadata"])
    assert sorted(metadata["text_encoder.target_modules"]) == ["k_proj", "out_proj", "q_proj", "v_proj"]


def test_resume_with_a_text_encoder_lora(workdir, tmp_path):
    """Both LoRAs and both parameter groups' optimizer state go through a checkpoint: 1 + resume + 1 updates
    equal 2 (PyNative; each update moves weights by about the learning rate, 1e-3)."""
    args = base_args(workdir, tmp_path, embeds=False) + [
        "--train_batch_size", "1", "--train_text_encoder", "--text_encoder_lr", "1e-3", "--checkpointing_steps", "1",
        "--random_flip"]
    assert script.cli(args + ["--output_dir", str(tmp_path / "one"), "--max_train_steps", "2"]) == 0
    assert script.cli(args + ["--output_dir", str(tmp_path / "two"), "--max_train_steps", "1"]) == 0
    assert script.cli(args + ["--output_dir", str(tmp_path / "two"), "--max_train_steps", "2",
                              "--resume_from_checkpoint", str(tmp_path / "two" / "checkpoint-1")]) == 0
    one, two = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in ("one", "two"))
    assert lora_b_trained(one, "text_encoder.") and one.keys() == two.keys()
    assert max(float(np.abs(one[k] - two[k]).max()) for k in one) <= 1e-6


def test_aspect_ratio_buckets_train(workdir, tmp_path):
    data = tmp_path / "mixed"
    data.mkdir()
    for i, size in enumerate([(48, 32), (50, 30), (32, 48)]):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(data / f"{i}.png")
    args = base_args(workdir, tmp_path / "out")
    args[args.index("--instance_data_dir") + 1] = str(data)
    assert script.cli(args + ["--aspect_ratio_buckets", "32,48;48,32", "--max_train_steps", "2",
                              "--train_batch_size", "2"]) == 0
    assert lora_b_trained(load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors")))


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(workdir, tmp_path, capsys):
    """A learning rate of 1e30 blows the LoRA weights up in the first update; the second loss is not finite."""
    args = base_args(workdir, tmp_path) + ["--train_batch_size", "1", "--max_train_steps", "4",
                                           "--checkpointing_steps", "1", "--learning_rate", "1e30"]
    assert script.cli(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "at step 2; training stopped without saving" in err[-1] and "Traceback" not in "\n".join(err), err
    assert str(tmp_path / "checkpoint-1") in err[-1]
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint")) == ["checkpoint-1"]
    assert read_state(str(tmp_path / "checkpoint-1"))["global_step"] == 1
    weights = load_file(str(tmp_path / "checkpoint-1" / "pytorch_lora_weights.safetensors"))
    assert all(np.isfinite(v).all() for v in weights.values())
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()


def _corrupt_folder(root):
    folder = root / "corrupt"
    make_images(folder, count=1, size=40)
    (folder / "01.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return folder


def _no_transformer(root):
    import shutil

    folder = root / "no_transformer"
    shutil.copytree(root / "model", folder, ignore=shutil.ignore_patterns("transformer"))
    return folder


@pytest.mark.parametrize("extra, code, message", [
    (["--mixed_precision", "bf16"], 1, "needs a GPU or Ascend device"),
    (["--resolution", "30"], 1, "--resolution 30 must be a multiple of 4"),
    (["--optimizer", "sgd"], 2, "use AdamW, AdamWeightDecay or prodigy"),
    (["--with_prior_preservation"], 2, "data directory for class images"),
    (["--weighting_scheme", "uniform"], 2, "invalid choice"),
    (["--report_to", "wandb"], 2, "wandb and comet_ml are not supported"),
    (["--push_to_hub"], 2, "--push_to_hub: hub upload is not supported"),
    (["--dataset_config_name", "cats"], 2, "--dataset_config_name needs --dataset_name"),
    (["--instance_data_dir", "EMPTY"], 1, "empty has no images"),
    (["--instance_data_dir", "MISSING"], 1, "nope does not exist"),
    (["--instance_data_dir", "CORRUPT"], 1, "cannot read image"),
    (["--pretrained_model_name_or_path", "NO_TRANSFORMER"], 1, "has no transformer/config.json"),
    (["--resume_from_checkpoint", "checkpoint-99"], 1, "--resume_from_checkpoint checkpoint-99 does not exist"),
    (["--resume_from_checkpoint", "latest"], 1, "holds no checkpoint"),
    (["--validation_prompt", "x"], 1, "drop --precomputed_prompt_embeds"),
    (["--aspect_ratio_buckets", "32,32", "--with_prior_preservation", "--class_data_dir", "CLASS", "--class_prompt",
      "c"], 1, "cannot be combined with --with_prior_preservation"),
])
def test_bad_input_is_one_line_and_non_zero(workdir, tmp_path, capsys, extra, code, message):
    (tmp_path / "empty").mkdir()
    places = {"CLASS": workdir / "class", "EMPTY": tmp_path / "empty", "MISSING": tmp_path / "nope",
              "CORRUPT": None, "NO_TRANSFORMER": None}
    extra = [str(_corrupt_folder(tmp_path)) if e == "CORRUPT" else str(_no_transformer(workdir))
             if e == "NO_TRANSFORMER" else str(places[e]) if e in places else e for e in extra]
    args = base_args(workdir, tmp_path / "out")
    for name in ("--instance_data_dir", "--pretrained_model_name_or_path"):
        if name in extra or (name == "--instance_data_dir" and "--dataset_name" in extra):  # replace the base value
            i = args.index(name)
            del args[i:i + 2]
    if code == 2:
        with pytest.raises(SystemExit) as exit_info:
            script.cli(args + extra)
        assert exit_info.value.code == 2
    else:
        assert script.cli(args + extra + ["--max_train_steps", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err), err
    if "CORRUPT" in str(extra) or "corrupt" in str(extra):
        assert "01.jpg" in err[-1]
