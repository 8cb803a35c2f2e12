"""Reference schedules and steps of diffusers' FlowMatchEulerDiscreteScheduler (issue 3: scheduler).

Schedules: for each named config, set_timesteps cases as FluxPipeline makes them (sigmas =
linspace(1, 1/N, N), mu from calculate_shift for an image of `seq_len` tokens) and without custom
sigmas. Steps and scale_noise: a few Euler steps of a FLUX-dev schedule on packed latents, in
fp32 and bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIGS = {
    "dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096),
    "schnell": dict(shift=1.0, use_dynamic_shifting=False),
    "static_shift": dict(shift=3.0, use_dynamic_shifting=False),
    "linear": dict(shift=3.0, use_dynamic_shifting=True, time_shift_type="linear"),
    "terminal": dict(shift=3.0, use_dynamic_shifting=True, shift_terminal=0.1),
    "inverted": dict(shift=3.0, use_dynamic_shifting=False, invert_sigmas=True),
    "karras": dict(shift=3.0, use_dynamic_shifting=True, use_karras_sigmas=True),
    "exponential": dict(shift=3.0, use_dynamic_shifting=True, use_exponential_sigmas=True),
}
# (config, steps, image seq_len or None for no mu, FluxPipeline-style sigmas?)
CASES = [
    ("dev", 1, 256, True), ("dev", 4, 1024, True), ("dev", 28, 4096, True), ("dev", 50, 4096, True),
    ("dev", 28, 6000, True), ("dev", 20, 1024, False),
    ("schnell", 1, None, True), ("schnell", 4, None, True), ("schnell", 4, None, False),
    ("static_shift", 10, None, False), ("static_shift", 10, None, True),
    ("linear", 28, 1024, True), ("linear", 8, 4096, False),
    ("terminal", 28, 1024, True),
    ("inverted", 6, None, False),
    ("karras", 12, 1024, True), ("exponential", 12, 1024, True),
]
BATCH, TOKENS, CHANNELS = 2, 24, 64  # packed FLUX latents
STEP_CASE = ("dev", 28, 1024)
NUM_STEPS = 4


def case_name(config: str, steps: int, seq_len, flux_sigmas: bool) -> str:
    return f"{config}.n{steps}.s{seq_len or 0}.{'flux' if flux_sigmas else 'default'}"


def make_reference(out: Path) -> None:
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from .torch_common import save_arrays, seed

    arrays = {}
    for name, cfg in CONFIGS.items():
        scheduler = FlowMatchEulerDiscreteScheduler(**cfg)
        arrays[f"{name}.init.timesteps"] = scheduler.timesteps
        arrays[f"{name}.init.sigmas"] = scheduler.sigmas
        if name in ("dev", "schnell"):
            scheduler.save_config(out / name)

    index = []
    for config, steps, seq_len, flux_sigmas in CASES:
        scheduler = FlowMatchEulerDiscreteScheduler(**CONFIGS[config])
        cfg = scheduler.config
        mu = None
        if seq_len is not None:
            mu = calculate_shift(seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                                 cfg.max_shift)
        sigmas = np.linspace(1.0, 1 / steps, steps) if flux_sigmas else None
        if flux_sigmas:  # as FluxPipeline's retrieve_timesteps calls it: no num_inference_steps
            scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        else:
            scheduler.set_timesteps(steps, mu=mu)
        name = case_name(config, steps, seq_len, flux_sigmas)
        arrays[f"{name}.timesteps"] = scheduler.timesteps
        arrays[f"{name}.sigmas"] = scheduler.sigmas
        index.append({"name": name, "config": config, "steps": steps, "seq_len": seq_len, "mu": mu,
                      "flux_sigmas": flux_sigmas})

    # Custom timesteps instead of sigmas.
    scheduler = FlowMatchEulerDiscreteScheduler(**CONFIGS["schnell"])
    custom = [1000.0, 750.0, 333.0, 20.0]
    scheduler.set_timesteps(timesteps=custom)
    arrays["custom_timesteps.input"] = torch.tensor(custom)
    arrays["custom_timesteps.timesteps"] = scheduler.timesteps
    arrays["custom_timesteps.sigmas"] = scheduler.sigmas

    # Euler steps and the forward process on packed latents.
    generator = seed(400)
    config, steps, seq_len = STEP_CASE
    mu = next(c["mu"] for c in index if c["config"] == config and c["seq_len"] == seq_len)
    sample = torch.randn(BATCH, TOKENS, CHANNELS, generator=generator)
    outputs = torch.randn(NUM_STEPS, BATCH, TOKENS, CHANNELS, generator=generator)
    noise = torch.randn(BATCH, TOKENS, CHANNELS, generator=generator)
    arrays.update({"step.sample": sample, "step.model_outputs": outputs, "step.noise": noise})
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        scheduler = FlowMatchEulerDiscreteScheduler(**CONFIGS[config])
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        x = sample.to(dtype)
        for i in range(NUM_STEPS):
            x = scheduler.step(outputs[i].to(dtype), scheduler.timesteps[i], x, return_dict=False)[0]
            arrays[f"step.{dtype_name}.prev_sample.{i}"] = x
        # scale_noise as FluxImg2ImgPipeline uses it: looked up by timestep, then from begin_index
        start = scheduler.timesteps[5:6].repeat(BATCH)
        arrays[f"step.{dtype_name}.scale_noise"] = scheduler.scale_noise(sample.to(dtype), start, noise.to(dtype))
        both = scheduler.timesteps[[2, 9]]
        arrays[f"step.{dtype_name}.scale_noise_two"] = scheduler.scale_noise(sample.to(dtype), both, noise.to(dtype))
        scheduler.set_begin_index(3)
        arrays[f"step.{dtype_name}.scale_noise_begin"] = scheduler.scale_noise(sample.to(dtype), start,
                                                                               noise.to(dtype))
    arrays["step.scale_noise_timesteps"] = start
    arrays["step.scale_noise_two_timesteps"] = both
    save_arrays(out / "cases.safetensors", arrays)
    (out / "cases.json").write_text(json.dumps({"step_mu": mu, "cases": index}, indent=1) + "\n")
