"""Issue 15 for generate.py and loading: no picture overwritten or truncated, nonsense numbers and NaN weights
refused naming the culprit, non-finite images reported, a real SIGTERM keeps the finished PNGs."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mindflux.safetensors_io import SafetensorsFile, save_file
from tests.conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infer"))
import generate  # noqa: E402

MODEL = FIXTURES / "pipeline" / "tiny_flux"
BASE = ["--model", str(MODEL), "--device", "cpu", "--mode", "pynative", "--max_sequence_length", "16",
        "--height", "16", "--width", "16", "--num_inference_steps", "1", "--prompt", "a red circle"]


def run_cli(args, capsys):
    rc = generate.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def write_lora(path: Path, value: float = 0.0, extra: dict | None = None) -> Path:
    """A diffusers-format LoRA on the tiny transformer's first to_q (inner dim 32), every weight `value`."""
    prefix = "transformer.transformer_blocks.0.attn.to_q"
    tensors = {f"{prefix}.lora_A.weight": (np.full((4, 32), value, np.float32), "F32"),
               f"{prefix}.lora_B.weight": (np.full((32, 4), value, np.float32), "F32")}
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return path


def test_a_run_never_overwrites_earlier_images_and_takes_num_inference_steps(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out / "000_seed0.png")  # an earlier run's picture
    earlier = (out / "000_seed0.png").read_bytes()
    rc, _, err = run_cli(BASE + ["--output_dir", out, "--seed", "0"], capsys)
    assert rc == 0, err
    # no temporary file left either
    assert sorted(f for f in os.listdir(out) if f != "images.jsonl") == ["000_seed0.png", "001_seed0.png"]
    assert (out / "000_seed0.png").read_bytes() == earlier
    assert Image.open(out / "001_seed0.png").text["steps"] == "1"
    assert generate.build_parser().parse_args(["--steps", "3"]).num_inference_steps == 3  # the old name


def test_a_full_disk_leaves_no_truncated_png_under_a_final_name(tmp_path, capsys, monkeypatch):
    def save_half(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half an image")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save_half)
    rc, _, err = run_cli(BASE + ["--output_dir", tmp_path / "out"], capsys)
    assert rc == 1 and "No space left on device" in err
    assert [f for f in os.listdir(tmp_path / "out") if f != "images.jsonl"] == []  # records only


@pytest.mark.parametrize("extra, message", [
    (["--guidance_scale", "nan"], "--guidance_scale must be a finite number; got nan"),
    (["--true_cfg_scale", "inf"], "--true_cfg_scale must be a finite number; got inf"),
    (["--lora", "LORA:nan"], ":nan: the scale must be a finite number"),
    (["--lora", "LORA:inf"], ":inf: the scale must be a finite number"),
    (["--lora", "LORA:-1e30"], ":-1e+30: the scale must be a finite number within +-100"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--prompt_file", "BINARY"], "BINARY is not UTF-8 text"),
    (["--output_dir", "UNDER_A_FILE"], "UNDER_A_FILE is not writable"),
    (["--output_dir", "A_FILE"], "A_FILE exists and is not a folder"),
])
def test_bad_options_are_named_before_the_model_loads(tmp_path, capsys, extra, message):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "prompts.bin").write_bytes(bytes(range(256)))
    places = {"BINARY": tmp_path / "prompts.bin", "UNDER_A_FILE": tmp_path / "file.txt" / "out",
              "A_FILE": tmp_path / "file.txt"}
    lora = write_lora(tmp_path / "lora.safetensors")
    extra = [str(places.get(e, e)).replace("LORA", str(lora)) for e in extra]
    for key, place in places.items():
        message = message.replace(key, str(place))
    rc, out, err = run_cli(BASE + ["--output_dir", tmp_path / "ok"] + extra, capsys)
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert "loading" not in out  # found before the (minutes-long, with FLUX.1-dev) model load


def test_a_lora_error_keeps_the_list_of_unknown_keys(tmp_path, capsys):
    unknown = {"transformer.not_a_module.lora_A.weight": (np.zeros((4, 32), np.float32), "F32"),
               "transformer.not_a_module.lora_B.weight": (np.zeros((32, 4), np.float32), "F32")}
    lora = write_lora(tmp_path / "lora.safetensors", extra=unknown)
    rc, _, err = run_cli(BASE + ["--lora", lora, "--output_dir", tmp_path], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "transformer.not_a_module.lora_A.weight: the transformer has no linear layer not_a_module" in err
    assert "transformer.not_a_module.lora_B.weight" in err


def test_nan_or_inf_weights_are_refused_naming_file_and_tensor(tmp_path, capsys):
    lora = tmp_path / "nan_lora.safetensors"
    write_lora(lora, extra={"transformer.transformer_blocks.0.attn.to_k.lora_A.weight":
                            (np.array([[0.0] * 31 + [np.nan]] * 4, np.float32), "F32"),
                            "transformer.transformer_blocks.0.attn.to_k.lora_B.weight":
                            (np.zeros((32, 4), np.float32), "F32")})
    rc, _, err = run_cli(BASE + ["--lora", lora, "--output_dir", tmp_path / "a"], capsys)
    assert rc == 1 and str(lora) in err and "'transformer.transformer_blocks.0.attn.to_k.lora_A.weight' holds NaN" \
        in err

    # a model whose transformer holds an inf (stored BF16: checked on its bits)
    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    st = SafetensorsFile(str(weights))
    tensors = {k: st.get(k) for k in st.keys()}
    name = sorted(tensors)[3]
    array, dtype = tensors[name]
    array = array.copy()
    array.reshape(-1)[-1] = 0x7F80 if dtype == "BF16" else np.inf
    tensors[name] = (array, dtype)
    del st
    save_file(tensors, str(weights))
    rc, _, err = run_cli(["--model", model] + BASE[2:] + ["--output_dir", tmp_path / "b"], capsys)
    assert rc == 1 and f"{weights}: tensor {name!r} holds NaN or inf" in err, err


def test_an_image_that_comes_out_non_finite_is_reported_not_saved(tmp_path, capsys):
    """Finite LoRA weights so large that the activations overflow: the image is NaN, not a black PNG."""
    lora = write_lora(tmp_path / "huge.safetensors", value=1e30)
    rc, out, err = run_cli(BASE + ["--lora", lora, "--output_dir", tmp_path / "out", "--num_images", "1"], capsys)
    assert rc == 1 and "1 of 1 images came out NaN/inf and were not saved" in err.strip().splitlines()[-1]
    assert [f for f in os.listdir(tmp_path / "out") if f != "images.jsonl"] == []  # records only


def test_a_real_sigterm_keeps_the_finished_pngs(tmp_path):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, str(ROOT / "infer" / "generate.py"), *BASE, "--num_images", "1000",
                              "--output_dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 240
        for line in child.stdout:  # the first finished PNG
            if line.startswith(str(out)):
                break
            assert time.monotonic() < deadline
        child.send_signal(signal.SIGTERM)
        rest, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("generate.py: interrupted;"), last
    files = sorted(f for f in os.listdir(out) if f.endswith(".png") or f.startswith("."))
    assert f"{len(files)} finished image(s) kept in {out}" in last and 1 <= len(files) < 1000
    assert not [f for f in files if f.startswith(".")]  # no temporary file left behind
    for name in files:
        Image.open(out / name).load()  # each one whole
