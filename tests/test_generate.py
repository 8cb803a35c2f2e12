"""infer/generate.py on the tiny pipeline fixture: PNGs, metadata, timing summary, one-line errors."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mindflux import FluxPipeline
from tests.conftest import FIXTURES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))
import generate  # noqa: E402

MODEL = FIXTURES / "pipeline" / "tiny_flux"
BASE = ["--model", str(MODEL), "--device", "cpu", "--mode", "pynative", "--max_sequence_length", "16"]


def run_cli(args, capsys):
    rc = generate.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_writes_pngs_named_by_index_and_seed_with_metadata(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\n\na blue square\n", encoding="utf-8")
    rc, out, err = run_cli(BASE + ["--prompt", "a red circle", "--prompt_file", prompts, "--seed", 5, "--steps", 2,
                                   "--height", 40, "--width", 32, "--output_dir", tmp_path / "out"], capsys)
    assert rc == 0, err
    assert "--height 40 is not a multiple of 16; rounded down to 32" in err
    files = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert files == ["000_seed5.png", "001_seed5.png"]
    image = Image.open(tmp_path / "out" / "001_seed5.png")
    assert image.size == (32, 32)
    assert {k: image.text[k] for k in ("prompt", "seed", "steps", "guidance_scale", "model")} == {
        "prompt": "a blue square", "seed": "5", "steps": "2", "guidance_scale": "3.5", "model": "tiny_flux"}
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("timing:") and all(w in summary for w in ("text encoding", "s/step", "decoding"))

    # the file is what the pipeline makes with that seed
    pipe = FluxPipeline.from_pretrained(str(MODEL))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a blue square", height=32, width=32, num_inference_steps=2, generator=5, max_sequence_length=16)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.images[0]))


@pytest.mark.parametrize("args, message", [
    (["--model", str(MODEL / "vae"), "--prompt", "x"], "has no model_index.json"),
    (["--model", "/no/such/folder", "--prompt", "x"], "is neither a folder nor a Hub repo id"),
    (BASE, "no prompt"),
    (BASE + ["--prompt", "x", "--dtype", "bf16"], "needs a GPU or Ascend device"),
    (BASE + ["--prompt", "x", "--lora", "/no/such/lora.safetensors:0.7"], "LoRA file /no/such/lora.safetensors does"),
    (BASE + ["--prompt", "x", "--max_sequence_length", "513"], "cannot be greater than 512"),
])
def test_mistakes_are_one_line_errors(args, message, capsys):
    rc, out, err = run_cli(args, capsys)
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_component_is_named(tmp_path, capsys):
    shutil.copytree(MODEL, tmp_path / "model", ignore=shutil.ignore_patterns("text_encoder_2"))
    rc, _, err = run_cli(["--model", tmp_path / "model", *BASE[2:], "--prompt", "x", "--output_dir", tmp_path], capsys)
    assert rc == 1 and "component 'text_encoder_2' (T5EncoderModel)" in err and len(err.strip().splitlines()) == 1


def test_usage_errors_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(BASE + ["--prompt", "x", "--steps", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid int value: 'many'" in err and len(err.strip().splitlines()) == 1
    help_text = generate.build_parser().format_help()
    assert "rounded down" in help_text and "multiple of 16" in help_text


def write_lora(folder: Path) -> Path:
    """A LoRA for the tiny pipeline's transformer, saved in diffusers' format by mindflux."""
    from mindflux import FluxTransformer2DModel
    from mindflux.lora import FluxLoraLoaderMixin, LoraConfig, get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(str(MODEL / "transformer"))
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights=False)
    transformer.add_adapter(config)
    FluxLoraLoaderMixin.save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(transformer),
                                          transformer_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_with_scale_and_fusing(tmp_path, capsys):
    lora = write_lora(tmp_path / "lora")
    common = ["--prompt", "a red circle", "--seed", 3, "--steps", 2, "--height", 32, "--width", 32]
    rc, _, err = run_cli(BASE + common + ["--lora", f"{lora}:0.5", "--fuse_lora", "--output_dir", tmp_path], capsys)
    assert rc == 0, err
    image = Image.open(tmp_path / "000_seed3.png")
    assert image.text["lora"] == "pytorch_lora_weights.safetensors:0.5"
    fused = np.asarray(image.convert("RGB"), np.int32)

    pipe = FluxPipeline.from_pretrained(str(MODEL))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    call = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, generator=3, max_sequence_length=16)
    unfused = np.asarray(pipe(**call).images[0], np.int32)
    without = np.asarray(pipe(**call, joint_attention_kwargs={"scale": 0.0}).images[0], np.int32)
    assert np.abs(fused - unfused).max() <= 1  # fusing changes only rounding
    assert np.abs(fused - without).mean() > 2  # the LoRA does change the image


def test_unreadable_lora_names_file_and_formats(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    rc, _, err = run_cli(BASE + ["--prompt", "x", "--lora", bad, "--output_dir", tmp_path], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert f"cannot load LoRA file {bad}" in err
    assert "accepted formats: diffusers, kohya, comfyui, bfl, xlabs, mixture, fal, lycoris" in err
