"""Step caches against diffusers 0.35.2 (tests/parity/dump_cache.py): FluxPipeline with
FirstBlockCacheConfig on the tiny pipeline skips the same steps and makes the same images; TeaCache's
rule; graph mode compiles each part once. Graph mode throughout: 20 tiny steps op by op take 10x longer."""

import json
import logging

import numpy as np
import pytest

import mindflux
from mindflux import FirstBlockCacheConfig, FluxPipeline, TeaCacheConfig
from mindflux.models.cache_utils import FLUX_TEACACHE_COEFFICIENTS, _ContextState, parse_cache_config, should_compute
from tests.conftest import FIXTURES, load_cases, max_abs_diff

DUMPS = FIXTURES / "cache"
CASES = json.loads((DUMPS / "cases.json").read_text(encoding="utf-8"))
REF = load_cases(DUMPS / "cases.safetensors")
IMAGE_TOL = 0.5 / 255  # the bound


@pytest.fixture(scope="module")
def pipe():
    mindflux.set_device("cpu", "graph")
    pipe = FluxPipeline.from_pretrained(str(FIXTURES / "pipeline" / "tiny_flux"))
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    mindflux.set_device("cpu", "pynative")


def call(name: str) -> dict:
    kwargs = dict(CASES[name]["call"], prompt_embeds=REF[f"{name}.prompt_embeds"],
                  pooled_prompt_embeds=REF[f"{name}.pooled_prompt_embeds"], latents=REF[f"{name}.latents"],
                  output_type="np")
    if f"{name}.negative_prompt_embeds" in REF:
        kwargs.update(negative_prompt_embeds=REF[f"{name}.negative_prompt_embeds"],
                      negative_pooled_prompt_embeds=REF[f"{name}.negative_pooled_prompt_embeds"])
    return kwargs


def cached_run(pipe, name: str, config) -> tuple[np.ndarray, dict[str, list[int]]]:
    pipe.transformer.enable_cache(config)
    try:
        images = pipe(**call(name)).images
        return images, pipe.transformer.cache_skipped_steps
    finally:
        pipe.transformer.disable_cache()


def expected_skips(name: str) -> dict[str, list[int]]:
    return {key.split(".")[1]: REF[key].tolist() for key in REF if key.startswith(f"{name}.") and
            key.endswith(".skipped")}


@pytest.mark.parametrize("name", ["dev", "cfg"])
def test_first_block_cache_matches_diffusers(pipe, name):
    images, skipped = cached_run(pipe, name, FirstBlockCacheConfig(threshold=CASES[name]["threshold"]))
    assert skipped == expected_skips(name)
    assert max_abs_diff(images, REF[f"{name}.images"]) <= IMAGE_TOL
    # the cache did change the images: parity with the uncached ones would not pass
    assert max_abs_diff(images, REF[f"{name}.uncached_images"]) > 4 * IMAGE_TOL


def test_graph_mode_compiles_each_part_once(pipe):
    """Two calls of 20 steps with skipped and computed steps: one compiled graph per part, and
    the second call (the cache reset in between) repeats the first."""
    config = FirstBlockCacheConfig(threshold=CASES["dev"]["threshold"])
    pipe.transformer.enable_cache(config)
    try:
        runner = pipe.transformer._cache_runner
        first = pipe(**call("dev")).images
        skipped = pipe.transformer.cache_skipped_steps
        graphs = len(runner.head.compile_cache), len(runner.tail.compile_cache)
        second = pipe(**call("dev")).images
        # one graph per part and shape (the cfg case's shape may have been compiled before)
        assert graphs == (len(runner.head.compile_cache), len(runner.tail.compile_cache)) and max(graphs) <= 2
    finally:
        pipe.transformer.disable_cache()
    assert skipped == expected_skips("dev")
    assert max_abs_diff(first, REF["dev.images"]) <= IMAGE_TOL
    assert np.array_equal(first, second)


@pytest.mark.parametrize("config", [FirstBlockCacheConfig(threshold=0.0), TeaCacheConfig(threshold=0.0)],
                         ids=str)
def test_threshold_zero_computes_every_step(pipe, config):
    images, skipped = cached_run(pipe, "dev", config)
    assert skipped == {"cond": []}
    assert max_abs_diff(images, REF["dev.uncached_images"]) <= IMAGE_TOL


def test_teacache_skips_while_the_rescaled_change_accumulates(pipe):
    steps = CASES["dev"]["call"]["num_inference_steps"]
    # a threshold no change reaches: only the first and the last step are computed
    _, skipped = cached_run(pipe, "dev", TeaCacheConfig(threshold=1e9))
    assert skipped == {"cond": list(range(1, steps - 1))}
    images, skipped = cached_run(pipe, "dev", TeaCacheConfig(threshold=1.0))
    assert 0 < len(skipped["cond"]) < steps - 2 and 0 not in skipped["cond"] and steps - 1 not in skipped["cond"]
    assert max_abs_diff(images, REF["dev.uncached_images"]) > IMAGE_TOL


def test_teacache_rule():
    """TeaCache4FLUX: the change, rescaled by its polynomial, accumulates until it reaches the threshold."""
    config, state = TeaCacheConfig(threshold=0.4), _ContextState()
    assert config.coefficients == FLUX_TEACACHE_COEFFICIENTS
    assert should_compute(config, state, 0.0, 10)  # no previous signal
    state.previous_signal = state.cached_residual = object()
    state.step = 1
    # np.poly1d(coefficients)(0.05) = 0.1805: two such steps stay under 0.4, the third is computed
    decisions = [should_compute(config, state, 0.05, 10) for _ in range(4)]
    assert decisions == [False, False, True, False] and state.accumulated == pytest.approx(0.1805, abs=1e-4)
    state.step = 9  # the last step is always computed
    assert should_compute(config, state, 0.0, 10)


def test_config_errors(pipe, caplog):
    assert str(parse_cache_config("fbcache:0.12")) == "fbcache:0.12"
    assert parse_cache_config("teacache") == TeaCacheConfig()
    for spec in ("fbcache:x", "tea:0.4", "fbcache:-1"):
        with pytest.raises(ValueError, match="cache|threshold"):
            parse_cache_config(spec)
    pipe.transformer.enable_cache(FirstBlockCacheConfig())
    try:
        with pytest.raises(ValueError, match="already been enabled"):
            pipe.transformer.enable_cache(TeaCacheConfig())
    finally:
        pipe.transformer.disable_cache()
    with caplog.at_level(logging.WARNING):
        pipe.transformer.disable_cache()
    assert "nothing to disable" in caplog.text
    with pytest.raises(ValueError, match="not supported"):
        pipe.transformer.enable_cache({"threshold": 0.1})


def test_generate_cli_records_the_cache(tmp_path, capsys):
    import sys
    from pathlib import Path

    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))
    import generate

    # PyNative: 6 tiny steps op by op cost less than compiling the encoders, the two parts and the VAE
    base = ["--model", str(FIXTURES / "pipeline" / "tiny_flux"), "--device", "cpu", "--mode", "pynative",
            "--max_sequence_length", "16", "--prompt", "a red circle", "--height", "32", "--width", "32"]
    assert generate.main(base + ["--cache", "fbcache:x"]) == 1
    assert "cache 'fbcache:x': the threshold 'x' is not a number" in capsys.readouterr().err
    assert generate.main(base + ["--cache", "teacache:1e9", "--steps", "6", "--output_dir", str(tmp_path)]) == 0
    image = Image.open(tmp_path / "000_seed0.png")
    assert image.text["cache"] == "teacache:1e+09" and image.text["cache_skipped_steps"] == "4"  # all but 2
    mindflux.set_device("cpu", "graph")  # as the module's other tests run
