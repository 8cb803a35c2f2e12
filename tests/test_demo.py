"""The demo model shipped in mindflux/demo: it draws what it is asked, generate.py uses it by default,
and the DreamBooth demo teaches it a shape it never saw (docs/demo.md)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mindflux.demo.model import (
    DEMO_MODEL_DIR,
    DEMO_PROMPT,
    INSTANCE_DIR,
    INSTANCE_PROMPT,
    drawn_as_asked,
    eval_cases,
    evaluate,
    instance_specs,
)
from mindflux.demo.shapes import classify, hole_ratio, render
from mindflux.pipelines import FluxPipeline

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipe():
    pipe = FluxPipeline.from_pretrained(str(DEMO_MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_demo_model_draws_what_the_prompt_asks(pipe, graph_mode):
    # graph mode, as generate.py runs, in batches of 8: one compile serves all six batches and the
    # DreamBooth test's eight seeds below (CPU time 27 s against PyNative's 162 s, the same readings)
    cases = eval_cases()
    readings = evaluate(pipe, cases, batch_size=8)
    correct = [drawn_as_asked(r, c.spec) for r, c in zip(readings, cases)]
    # measured 46/48 (95.8%) for the shipped model, in PyNative and in graph mode; the goal is 90%
    print(f"drawn as asked: {sum(correct)}/{len(cases)}")
    assert np.mean(correct) >= 0.9, [(c.prompt, r) for c, r, ok in zip(cases, readings, correct) if not ok]


def test_generate_without_arguments_uses_the_demo_model(tmp_path, graph_mode):
    generate = load_script(ROOT / "infer" / "generate.py", "generate_demo")
    assert generate.main(["--device", "cpu", "--output_dir", str(tmp_path / "a")]) == 0
    asked = "a blue triangle on a black background"
    assert generate.main(["--device", "cpu", "--prompt", asked, "--output_dir", str(tmp_path / "b")]) == 0
    (first,), (second,) = (sorted((tmp_path / d).glob("*.png")) for d in "ab")
    for path, prompt in ((first, DEMO_PROMPT), (second, asked)):
        image = Image.open(path)
        assert image.text["prompt"] == prompt and image.size == (64, 64)
        reading = classify(image.convert("RGB"))
        assert f"{reading.colour} {reading.shape} on a {reading.background}" in prompt, (prompt, reading)


def test_instance_images_are_the_rendered_rings():
    files = sorted(INSTANCE_DIR.glob("*.png"))
    specs = instance_specs()
    assert len(files) == len(specs) >= 4
    for path, spec in zip(files, specs):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(render(spec)))
        assert hole_ratio(Image.open(path)) > 0.95  # what makes a ring: the middle is background


def test_dreambooth_demo_teaches_the_ring(pipe, tmp_path, graph_mode):
    """The metric is the hole ratio: how much of the middle of the drawn shape is background. It is
    what sets the instance images (rings, ~1.0) apart from every shape of the pretraining data (filled
    circles, squares and triangles, ~0.0), and it does not depend on position or size, which vary
    in the instance images too."""
    seeds = list(range(8))

    def holes() -> list[float]:
        images = pipe([INSTANCE_PROMPT] * len(seeds), generator=seeds, num_inference_steps=28, output_type="pil").images
        return [hole_ratio(image) for image in images]

    before = holes()
    script = load_script(ROOT / "train" / "train_dreambooth_lora_flux.py", "train_dreambooth_demo")
    out = tmp_path / "ring-lora"
    # docs/demo.md's command with lr 1e-2 and 200 steps instead of 3e-3 and 600: the same rise in a third of
    # the steps (its pictures keep the slower recipe, whose outlines are smoother)
    assert script.cli(["--pretrained_model_name_or_path", str(DEMO_MODEL_DIR), "--instance_data_dir",
                       str(INSTANCE_DIR), "--instance_prompt", INSTANCE_PROMPT, "--resolution", "64",
                       "--train_batch_size", "2", "--learning_rate", "1e-2", "--max_train_steps", "200", "--rank", "8",
                       "--lora_alpha", "8", "--seed", "0", "--output_dir", str(out), "--report_to", "none"]) == 0
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    try:
        after = holes()
    finally:
        pipe.unload_lora_weights()
    print(f"hole ratio before {np.round(before, 2)}, after {np.round(after, 2)}")
    # measured on the CPU: before 0.0 for all 8 seeds, after 0.33 on average (0.19 to 0.49 per seed; training
    # seed 1: 0.27); docs' 600-step recipe: 0.34 (0.05 to 0.92). A LoRA that does not learn (lr 1e-9): 0.0
    assert np.mean(before) < 0.02 and np.mean(after) - np.mean(before) > 0.15, (before, after)
