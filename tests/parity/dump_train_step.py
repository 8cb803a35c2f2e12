"""Reference numbers for the DreamBooth LoRA train step (issue 6), computed the way diffusers does.

The transformer is the tiny FLUX.1-dev-shaped fixture of the "transformer" topic
(tests/fixtures/transformer/flux_dev); regenerate this topic after that one. For each case:
peft LoRA on diffusers' FluxTransformer2DModel (B set non-zero so A gets gradients), fixed latents,
noise, sigmas and guidance, the flow-matching loss of diffusers' train_dreambooth_lora_flux.py
(v0.35.2), its backward, torch's clip_grad_norm_ and two torch.optim.AdamW steps on the same batch.
Also: diffusers' timestep-density sampling from recorded draws, the training schedule lookup,
FLUX's resolution shift, LR curves from diffusers.optimization.get_scheduler, and three
prodigyopt.Prodigy on a quadratic (needs `pip install --no-deps prodigyopt`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRANSFORMER = ROOT / "tests" / "fixtures" / "transformer" / "flux_dev"
SCHEDULER = ROOT / "tests" / "fixtures" / "scheduler" / "dev"

# diffusers' default --lora_layers for Flux, plus the single blocks' MLP projections (and the
# final proj_out, which the suffix "proj_out" also matches, as in peft).
TARGET_MODULES = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2", "proj_mlp", "proj_out"]
RANK, LORA_ALPHA = 4, 8
LATENT_CHANNELS, LATENT_H, LATENT_W, TEXT_LEN = 4, 6, 10, 7  # packed: 3 x 5 tokens of 16 channels
GUIDANCE_SCALE = 3.5
OPTIMIZER = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
# name -> (weighting_scheme, batch, with_prior_preservation, prior_loss_weight, max_grad_norm)
CASES = {
    "none": ("none", 2, False, 1.0, 10.0),  # a max norm above the gradient norm: no clipping
    "logit_normal": ("logit_normal", 2, False, 1.0, 1.0),  # diffusers' default max norm 1.0 clips these
    "sigma_sqrt": ("sigma_sqrt", 2, False, 1.0, 1.0),
    "cosmap": ("cosmap", 2, False, 1.0, 1.0),
    "prior": ("none", 2, True, 0.5, 1.0),  # one instance + one class image, as diffusers with batch size 1
}
DENSITY = dict(batch=64, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
LR_SCHEDULES = dict(num_warmup_steps=5, num_training_steps=30, num_cycles=2, power=2.0, steps=34)
# prodigyopt.Prodigy as the script builds it from its defaults (--learning_rate 1.0, as Prodigy wants)
PRODIGY = dict(lr=1.0, betas=(0.9, 0.999), beta3=None, weight_decay=1e-4, eps=1e-8, decouple=True,
               use_bias_correction=True, safeguard_warmup=True, steps=60, record=[1, 2, 10, 30, 60], max_grad_norm=1.0)


def _loss(transformer, case: dict, scheme: str, prior: bool, prior_loss_weight: float):
    """The loss lines of train_dreambooth_lora_flux.py (v0.35.2), with its tensors given."""
    import torch
    from diffusers import FluxPipeline

    model_input, noise = case["model_input"], case["noise"]
    b, c, h, w = model_input.shape
    sigmas = case["sigmas"].view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy_model_input, batch_size=b, num_channels_latents=c, height=h, width=w)
    guidance = torch.tensor([GUIDANCE_SCALE]).expand(b)
    model_pred = transformer(hidden_states=packed, timestep=case["timesteps"] / 1000, guidance=guidance,
                             pooled_projections=case["pooled_prompt_embeds"],
                             encoder_hidden_states=case["prompt_embeds"], txt_ids=case["text_ids"],
                             img_ids=case["latent_image_ids"], return_dict=False)[0]
    return script_loss(model_pred, model_input, noise, sigmas, scheme, prior, prior_loss_weight)


def script_loss(packed_pred, model_input, noise, sigmas, scheme: str, prior: bool, prior_loss_weight: float):
    """From the packed prediction on: unpack, weighting, target, the prior split and the weighted MSE, as
    train_dreambooth_lora_flux.py (v0.35.2) computes them."""
    import torch
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    _, _, h, w = model_input.shape
    vae_scale_factor = 8
    sigmas = sigmas.view(-1, 1, 1, 1)
    model_pred = FluxPipeline._unpack_latents(packed_pred, height=h * vae_scale_factor, width=w * vae_scale_factor,
                                              vae_scale_factor=vae_scale_factor)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = noise - model_input
    if prior:
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        prior_loss = torch.mean((weighting.float() * (model_pred_prior.float() - target_prior.float()) ** 2)
                                .reshape(target_prior.shape[0], -1), 1).mean()
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1),
                      1).mean()
    if prior:
        loss = loss + prior_loss_weight * prior_loss
    return loss


def _training_sigmas(scheduler, u):
    """u -> indices -> timesteps -> sigmas, as the script's loop and its get_sigmas do."""
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    return indices, timesteps, scheduler.sigmas[step_indices].flatten()


def _lora_transformer(generator):
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    transformer = FluxTransformer2DModel.from_pretrained(str(TRANSFORMER))
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian",
                                       target_modules=TARGET_MODULES))
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:  # non-zero B: A gets gradients and the adapter changes the output
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return transformer


def _lora_state(transformer) -> dict:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer).items()}


def _step_cases(arrays: dict, scheduler) -> None:
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft.utils import get_peft_model_state_dict

    from .dump_transformer import image_ids
    from .torch_common import seed

    for index, (name, (scheme, batch, prior, prior_loss_weight, max_grad_norm)) in enumerate(CASES.items()):
        generator = seed(300 + index)
        transformer = _lora_transformer(generator)
        transformer.train()
        initial = _lora_state(transformer)
        u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=batch, logit_mean=0.0,
                                                  logit_std=1.0, mode_scale=1.29, generator=generator)
        _, timesteps, sigmas = _training_sigmas(scheduler, u)
        case = {
            "model_input": torch.randn(batch, LATENT_CHANNELS, LATENT_H, LATENT_W, generator=generator),
            "noise": torch.randn(batch, LATENT_CHANNELS, LATENT_H, LATENT_W, generator=generator),
            "sigmas": sigmas,
            "timesteps": timesteps,
            "prompt_embeds": torch.randn(batch, TEXT_LEN, transformer.config.joint_attention_dim,
                                         generator=generator),
            "pooled_prompt_embeds": torch.randn(batch, transformer.config.pooled_projection_dim, generator=generator),
            "text_ids": torch.zeros(TEXT_LEN, 3),
            "latent_image_ids": image_ids(LATENT_H // 2, LATENT_W // 2),
        }
        params = [p for p in transformer.parameters() if p.requires_grad]
        # one parameter group with its own lr and no default lr, exactly as the script builds it
        optimizer = torch.optim.AdamW([{"params": params, "lr": OPTIMIZER["lr"]}], betas=OPTIMIZER["betas"],
                                      weight_decay=OPTIMIZER["weight_decay"], eps=OPTIMIZER["eps"])
        result = {}
        for step in (1, 2):  # the same batch twice: the second update uses the moments and bias correction k=2
            loss = _loss(transformer, case, scheme, prior, prior_loss_weight)
            loss.backward()
            if step == 1:
                result["loss"] = loss.detach()
            result.update({f"grad{'' if step == 1 else step}.{k}": v for k, v in _named_grads(transformer).items()})
            norm = torch.nn.utils.clip_grad_norm_(transformer.parameters(), max_grad_norm)
            result[f"grad_norm.{step}"] = norm.detach()
            optimizer.step()
            optimizer.zero_grad()
            result.update({f"after{step}.{k}": v.detach().clone()
                           for k, v in get_peft_model_state_dict(transformer).items()})
        arrays.update({f"{name}.input.{k}": v for k, v in case.items()})
        arrays.update({f"{name}.lora.{k}": v for k, v in initial.items()})
        arrays.update({f"{name}.{k}": v for k, v in result.items()})


def _prodigy_case(arrays: dict) -> None:
    """prodigyopt.Prodigy on a quadratic, 0.5 ||W - W*||^2 + 0.5 ||v - v*||^2, long enough for its
    step-size estimate d to grow from d0 (a few LoRA steps leave d at d0). v starts at zero, as
    LoRA's B does. Clipping to --max_grad_norm as the script does."""
    import torch
    from prodigyopt import Prodigy

    from .torch_common import seed

    generator = seed(901)
    targets = {"W": torch.randn(4, 8, generator=generator), "v": torch.randn(8, generator=generator)}
    params = {"W": torch.nn.Parameter(torch.randn(4, 8, generator=generator)), "v": torch.nn.Parameter(torch.zeros(8))}
    arrays.update({f"prodigy.target.{k}": v for k, v in targets.items()})
    arrays.update({f"prodigy.init.{k}": v.detach().clone() for k, v in params.items()})
    cfg = {k: v for k, v in PRODIGY.items() if k not in ("steps", "record", "max_grad_norm", "lr")}
    optimizer = Prodigy([{"params": list(params.values()), "lr": PRODIGY["lr"]}], lr=PRODIGY["lr"], **cfg)
    d = []
    for step in range(1, PRODIGY["steps"] + 1):
        loss = sum(0.5 * (params[k] - targets[k]).square().sum() for k in params)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), PRODIGY["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad()
        d.append(optimizer.param_groups[0]["d"])
        if step in PRODIGY["record"]:
            arrays.update({f"prodigy.after{step}.{k}": v.detach().clone() for k, v in params.items()})
    arrays["prodigy.d"] = torch.tensor(d, dtype=torch.float64)


def _named_grads(transformer) -> dict:
    """Gradients under peft's state-dict names (module.lora_A.weight), before clipping."""
    out = {}
    for name, param in transformer.named_parameters():
        if param.requires_grad:
            out[name.replace(".default", "")] = param.grad.detach().clone()
    return out


def _density_cases(arrays: dict, scheduler) -> None:
    """diffusers' compute_density_for_timestep_sampling, and the raw draws it made (same generator seed)."""
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    batch = DENSITY["batch"]
    for index, scheme in enumerate(("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")):
        u = compute_density_for_timestep_sampling(scheme, batch, DENSITY["logit_mean"], DENSITY["logit_std"],
                                                  DENSITY["mode_scale"], generator=torch.Generator().manual_seed(index))
        again = torch.Generator().manual_seed(index)
        if scheme == "logit_normal":
            draws = torch.normal(mean=0.0, std=1.0, size=(batch,), generator=again)
            assert torch.allclose(torch.sigmoid(DENSITY["logit_mean"] + DENSITY["logit_std"] * draws), u, atol=1e-6)
        else:
            draws = torch.rand(size=(batch,), generator=again)
        if scheme == "mode":
            u = u.clamp(max=1 - 1e-7)  # keep diffusers' own indexing in range for the lookup below
        indices, timesteps, sigmas = _training_sigmas(scheduler, u)
        arrays.update({f"density.{scheme}.draws": draws, f"density.{scheme}.u": u,
                       f"density.{scheme}.indices": indices, f"density.{scheme}.timesteps": timesteps,
                       f"density.{scheme}.sigmas": sigmas})


def _shift_case(arrays: dict, scheduler) -> None:
    """FLUX's resolution-dependent shift from diffusers' own pieces: calculate_shift and time_shift."""
    import numpy as np
    import torch
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sigmas = scheduler.sigmas[:: 37].clone()
    for seq_len in (256, 1024, 4096):
        cfg = scheduler.config
        mu = calculate_shift(seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        shifted = scheduler.time_shift(mu, 1.0, sigmas.double().numpy())
        arrays[f"shift.{seq_len}"] = torch.from_numpy(np.asarray(shifted, np.float32))
    arrays["shift.sigmas"] = sigmas


def _lr_curves(arrays: dict) -> None:
    import torch
    from diffusers.optimization import get_scheduler

    cfg = LR_SCHEDULES
    for name in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"):
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([{"params": [param], "lr": 1e-4}])  # the script's group lr, no default lr
        scheduler = get_scheduler(name, optimizer=optimizer, num_warmup_steps=cfg["num_warmup_steps"],
                                  num_training_steps=cfg["num_training_steps"], num_cycles=cfg["num_cycles"],
                                  power=cfg["power"])
        lrs = []
        for _ in range(cfg["steps"]):
            lrs.append(optimizer.param_groups[0]["lr"])  # the lr the next optimizer.step() uses
            optimizer.step()
            scheduler.step()
        arrays[f"lr.{name}"] = torch.tensor(lrs, dtype=torch.float64)


def make_reference(out: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .torch_common import save_arrays

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(SCHEDULER))
    arrays: dict = {}
    _step_cases(arrays, scheduler)
    _prodigy_case(arrays)
    _density_cases(arrays, scheduler)
    _shift_case(arrays, scheduler)
    _lr_curves(arrays)
    save_arrays(out / "cases.safetensors", arrays)
    config = {"target_modules": TARGET_MODULES, "rank": RANK, "lora_alpha": LORA_ALPHA,
              "guidance_scale": GUIDANCE_SCALE, "optimizer": OPTIMIZER, "density": DENSITY,
              "lr_schedules": LR_SCHEDULES, "prodigy": PRODIGY,
              "cases": {k: dict(zip(("weighting_scheme", "batch", "with_prior_preservation", "prior_loss_weight",
                                     "max_grad_norm"), v)) for k, v in CASES.items()}}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    assert math.isfinite(float(arrays["none.loss"]))
