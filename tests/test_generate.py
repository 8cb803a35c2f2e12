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
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
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
    (["--prompt", "x"], "--model is required"),
    (["--model", "/no/such/folder", "--prompt", "x"], "is not a folder"),
    (BASE, "no prompt"),
    (BASE + ["--prompt", "x", "--dtype", "bf16"], "needs an Ascend or GPU device"),
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
