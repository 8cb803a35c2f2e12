"""FlowMatchEulerDiscreteScheduler against diffusers 0.35.2 (tests/parity/dump_scheduler.py)."""

import json
import logging

import mindspore as ms
import numpy as np
import pytest

from mindflux import FlowMatchEulerDiscreteScheduler
from mindflux.latents import calculate_shift
from tests.conftest import FIXTURES, load_cases, max_abs_diff
from tests.parity.dump_scheduler import CONFIGS, NUM_STEPS, STEP_CASE

DUMPS = FIXTURES / "scheduler"
TOL = 1e-6
CASES = load_cases(DUMPS / "cases.safetensors")
META = json.loads((DUMPS / "cases.json").read_text())


def flux_mu(scheduler, seq_len):
    cfg = scheduler.config
    return calculate_shift(seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)


def step_scheduler():
    config, steps, seq_len = STEP_CASE
    scheduler = FlowMatchEulerDiscreteScheduler(**CONFIGS[config])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flux_mu(scheduler, seq_len))
    return scheduler


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_schedule_matches_diffusers(name):
    scheduler = FlowMatchEulerDiscreteScheduler(**CONFIGS[name])
    assert scheduler.timesteps.dtype == ms.float32 and scheduler.sigmas.dtype == ms.float32
    assert max_abs_diff(scheduler.timesteps, CASES[f"{name}.init.timesteps"]) <= TOL
    assert max_abs_diff(scheduler.sigmas, CASES[f"{name}.init.sigmas"]) <= TOL


@pytest.mark.parametrize("case", META["cases"], ids=[c["name"] for c in META["cases"]])
def test_set_timesteps_matches_diffusers(case):
    scheduler = FlowMatchEulerDiscreteScheduler(**CONFIGS[case["config"]])
    mu = None
    if case["seq_len"] is not None:
        mu = flux_mu(scheduler, case["seq_len"])  # the shared helper gives diffusers' mu exactly
        assert mu == case["mu"]
    steps = case["steps"]
    if case["flux_sigmas"]:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    else:
        scheduler.set_timesteps(steps, mu=mu)
    assert scheduler.num_inference_steps == steps
    assert scheduler.sigmas.shape == (steps + 1,) and scheduler.timesteps.shape == (steps,)
    assert max_abs_diff(scheduler.timesteps, CASES[f"{case['name']}.timesteps"]) <= TOL
    assert max_abs_diff(scheduler.sigmas, CASES[f"{case['name']}.sigmas"]) <= TOL


def test_custom_timesteps_match_diffusers():
    scheduler = FlowMatchEulerDiscreteScheduler(**CONFIGS["schnell"])
    scheduler.set_timesteps(timesteps=list(CASES["custom_timesteps.input"]))
    assert max_abs_diff(scheduler.timesteps, CASES["custom_timesteps.timesteps"]) == 0
    assert max_abs_diff(scheduler.sigmas, CASES["custom_timesteps.sigmas"]) <= TOL


def run_steps(dtype):
    scheduler = step_scheduler()
    sample = ms.Tensor(CASES["step.sample"]).astype(dtype)
    outputs = CASES["step.model_outputs"]
    errors = []
    for i, t in enumerate(scheduler.timesteps[:NUM_STEPS]):
        assert scheduler.step_index == (None if i == 0 else i)
        sample = scheduler.step(ms.Tensor(outputs[i]).astype(dtype), t, sample).prev_sample
        assert sample.dtype == dtype
        errors.append(max_abs_diff(sample.astype(ms.float32), CASES[f"step.{'fp32' if dtype == ms.float32 else 'bf16'}"
                                                                    f".prev_sample.{i}"]))
    return scheduler, errors


def test_steps_match_diffusers_in_pynative():
    _, errors = run_steps(ms.float32)
    assert max(errors) <= TOL


def test_steps_match_diffusers_in_graph_mode(graph_mode):
    _, errors = run_steps(ms.float32)
    assert max(errors) <= TOL


def test_bf16_steps_round_as_torch_does():
    # torch rounds dt and dt * model_output to bf16 before adding them to the fp32 sample
    _, errors = run_steps(ms.bfloat16)
    assert max(errors) == 0


@pytest.mark.parametrize("dtype, name", [(ms.float32, "fp32"), (ms.bfloat16, "bf16")])
def test_scale_noise_matches_diffusers(dtype, name):
    scheduler, _ = run_steps(dtype)
    sample = ms.Tensor(CASES["step.sample"]).astype(dtype)
    noise = ms.Tensor(CASES["step.noise"]).astype(dtype)
    tol = TOL if dtype == ms.float32 else 0
    for key, timesteps in (("scale_noise", "step.scale_noise_timesteps"),
                           ("scale_noise_two", "step.scale_noise_two_timesteps")):
        out = scheduler.scale_noise(sample, ms.Tensor(CASES[timesteps]), noise)
        assert out.dtype == dtype and out.shape == sample.shape
        assert max_abs_diff(out.astype(ms.float32), CASES[f"step.{name}.{key}"]) <= tol
    scheduler.set_begin_index(3)
    out = scheduler.scale_noise(sample, ms.Tensor(CASES["step.scale_noise_timesteps"]), noise)
    assert max_abs_diff(out.astype(ms.float32), CASES[f"step.{name}.scale_noise_begin"]) <= tol


def test_step_index_and_begin_index():
    scheduler = step_scheduler()
    sample = ms.Tensor(CASES["step.sample"])
    out = ms.Tensor(CASES["step.model_outputs"][0])
    scheduler.set_begin_index(2)
    assert scheduler.begin_index == 2
    # with a begin index the timestep is not looked up: the step goes from sigma[2] to sigma[3]
    prev = scheduler.step(out, scheduler.timesteps[0], sample, return_dict=False)[0]
    assert scheduler.step_index == 3
    sigmas = scheduler.sigmas.asnumpy()
    np.testing.assert_allclose(prev.asnumpy(), CASES["step.sample"] + (sigmas[3] - sigmas[2]) * CASES[
        "step.model_outputs"][0], atol=TOL)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=1.0)
    assert scheduler.step_index is None and scheduler.begin_index is None


def test_integer_timesteps_and_missing_mu_are_refused():
    scheduler = step_scheduler()
    sample = ms.Tensor(CASES["step.sample"])
    with pytest.raises(ValueError, match="integer indices"):
        scheduler.step(sample, 3, sample)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(sample, 123.456, sample)
    with pytest.raises(ValueError, match="mu"):
        FlowMatchEulerDiscreteScheduler(**CONFIGS["dev"]).set_timesteps(28)
    with pytest.raises(ValueError, match="same length"):
        scheduler.set_timesteps(4, sigmas=[1.0, 0.5], mu=1.0)


@pytest.mark.parametrize("key, value", [("use_beta_sigmas", True), ("stochastic_sampling", True),
                                        ("time_shift_type", "cosine")])
def test_unsupported_options_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        FlowMatchEulerDiscreteScheduler(**{key: value})


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_flux_scheduler_configs_load(name, tmp_path):
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(DUMPS), subfolder=name)
    for key, value in CONFIGS[name].items():
        assert scheduler.config[key] == value
    assert len(scheduler) == 1000 and scheduler.shift == CONFIGS[name]["shift"]
    scheduler.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    original = json.loads((DUMPS / name / "scheduler_config.json").read_text())
    assert {k: v for k, v in saved.items() if not k.startswith("_")} == \
        {k: v for k, v in original.items() if not k.startswith("_")}


def test_other_architecture_and_unknown_keys(tmp_path, caplog):
    config = json.loads((DUMPS / "dev" / "scheduler_config.json").read_text())
    (tmp_path / "scheduler_config.json").write_text(json.dumps(dict(config, _class_name="EulerDiscreteScheduler")))
    with pytest.raises(ValueError, match=rf"{tmp_path}.*EulerDiscreteScheduler, not a FlowMatchEulerDiscreteScheduler"):
        FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path))
    (tmp_path / "scheduler_config.json").write_text(json.dumps(dict(config, made_up_option=1)))
    with caplog.at_level(logging.WARNING):
        FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path))
    assert "made_up_option" in caplog.text

