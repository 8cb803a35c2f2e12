"""Reference numbers for the Kontext LoRA train step and batch, computed the way diffusers does.

Step: the tiny FLUX.1-dev-shaped transformer of the "transformer" topic with a peft LoRA (B non-zero),
fixed target latents, reference latents, noise, sigmas and guidance; the loss lines of diffusers'
train_dreambooth_lora_flux_kontext.py (the noisy target packed, the clean reference packed and
appended, img_ids [target; reference with first axis 1], the prediction cut to the target's tokens),
backward, clip_grad_norm_ (1.0) and one torch.optim.AdamW step. Settings as the "train_step" topic.

Batch: the Kontext script's reference tokens from the "train_batch" topic's images and VAE
(latent_dist.mode(), its default --vae_encode_mode), for tests/test_train_kontext.py.

Interop: a LoRA file written by mindflux's Kontext export (mindspore stage) loaded into diffusers'
FluxKontextPipeline with load_lora_weights (torch stage), which records the transformer's output
with it on fixed inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .dump_train_step import GUIDANCE_SCALE, LORA_ALPHA, OPTIMIZER, RANK, TARGET_MODULES, TRANSFORMER

ROOT = Path(__file__).resolve().parents[2]
BATCH = ROOT / "tests" / "fixtures" / "train_batch"
LATENT_CHANNELS, LATENT_H, LATENT_W, TEXT_LEN, BATCH_SIZE = 4, 6, 10, 7, 2
MAX_GRAD_NORM = 1.0


def _forward(transformer, case: dict):
    """The Kontext script's transformer call: [noisy target; reference] tokens, the target's outputs kept."""
    import torch
    from diffusers import FluxKontextPipeline

    model_input, cond = case["model_input"], case["cond_model_input"]
    b, c, h, w = model_input.shape
    sigmas = case["sigmas"].view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * model_input + sigmas * case["noise"]
    packed = FluxKontextPipeline._pack_latents(noisy, batch_size=b, num_channels_latents=c, height=h, width=w)
    orig_inp_shape = packed.shape
    packed_cond = FluxKontextPipeline._pack_latents(cond, batch_size=b, num_channels_latents=c, height=h, width=w)
    hidden_states = torch.cat([packed, packed_cond], dim=1)
    guidance = torch.tensor([GUIDANCE_SCALE]).expand(b)
    pred = transformer(hidden_states=hidden_states, timestep=case["timesteps"] / 1000, guidance=guidance,
                       pooled_projections=case["pooled_prompt_embeds"], encoder_hidden_states=case["prompt_embeds"],
                       txt_ids=case["text_ids"], img_ids=case["img_ids"], return_dict=False)[0]
    return pred[:, : orig_inp_shape[1]]


def kontext_img_ids(b: int, h: int, w: int):
    """The script's latent_image_ids: the target's, then the reference's with first axis 1."""
    import torch
    from diffusers import FluxKontextPipeline

    ids = FluxKontextPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    cond_ids = FluxKontextPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    cond_ids[..., 0] = 1
    return torch.cat([ids, cond_ids], dim=0)


def _step_case(arrays: dict) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from .dump_train_step import SCHEDULER, _lora_state, _lora_transformer, _named_grads, _training_sigmas, script_loss
    from .torch_common import seed

    generator = seed(700)
    transformer = _lora_transformer(generator)
    transformer.train()
    initial = _lora_state(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(SCHEDULER))
    u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=BATCH_SIZE, generator=generator)
    _, timesteps, sigmas = _training_sigmas(scheduler, u)
    shape = (BATCH_SIZE, LATENT_CHANNELS, LATENT_H, LATENT_W)
    case = {
        "model_input": torch.randn(*shape, generator=generator),
        "cond_model_input": torch.randn(*shape, generator=generator),
        "noise": torch.randn(*shape, generator=generator),
        "sigmas": sigmas, "timesteps": timesteps,
        "prompt_embeds": torch.randn(BATCH_SIZE, TEXT_LEN, transformer.config.joint_attention_dim,
                                     generator=generator),
        "pooled_prompt_embeds": torch.randn(BATCH_SIZE, transformer.config.pooled_projection_dim,
                                            generator=generator),
        "text_ids": torch.zeros(TEXT_LEN, 3),
        "img_ids": kontext_img_ids(BATCH_SIZE, LATENT_H, LATENT_W),
    }
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params, "lr": OPTIMIZER["lr"]}], betas=OPTIMIZER["betas"],
                                  weight_decay=OPTIMIZER["weight_decay"], eps=OPTIMIZER["eps"])
    loss = script_loss(_forward(transformer, case), case["model_input"], case["noise"], sigmas, "none", False, 1.0)
    loss.backward()
    grads = _named_grads(transformer)
    norm = torch.nn.utils.clip_grad_norm_(transformer.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    arrays.update({f"step.input.{k}": v for k, v in case.items()})
    arrays.update({f"step.lora.{k}": v for k, v in initial.items()})
    arrays.update({f"step.grad.{k}": v for k, v in grads.items()})
    arrays.update({f"step.after1.{k}": v for k, v in _lora_state(transformer).items()})
    arrays["step.loss"] = loss.detach()
    arrays["step.grad_norm.1"] = norm.detach()


def _batch_case(arrays: dict) -> None:
    """Reference latents and ids of the Kontext script for the train_batch images (target 00, reference 01)."""
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from .dump_train_batch import VAE, model_input_of, to_pixel_values

    vae = AutoencoderKL.from_pretrained(str(VAE))
    images = [np.asarray(Image.open(BATCH / "instance" / f"{i:02d}.png")) for i in (0, 1)]
    flips = [True]
    target = torch.stack([to_pixel_values(images[0], f) for f in flips])
    reference = torch.stack([to_pixel_values(images[1], f) for f in flips])
    with torch.no_grad():
        model_input = model_input_of(vae, target, None, mode=True)
        cond = model_input_of(vae, reference, None, mode=True)
    b, c, h, w = model_input.shape
    arrays.update({"batch.flips": torch.tensor(flips), "batch.target_pixels": target,
                   "batch.reference_pixels": reference, "batch.model_input": model_input,
                   "batch.cond_model_input": cond, "batch.img_ids": kontext_img_ids(b, h, w),
                   "batch.target_mean": vae.encode(target).latent_dist.mean.detach(),
                   "batch.reference_mean": vae.encode(reference).latent_dist.mean.detach()})


def make_reference(out: Path) -> None:
    from .torch_common import save_arrays

    arrays: dict = {}
    _step_case(arrays)
    _batch_case(arrays)
    save_arrays(out / "cases.safetensors", arrays)
    config = {"target_modules": TARGET_MODULES, "rank": RANK, "lora_alpha": LORA_ALPHA,
              "guidance_scale": GUIDANCE_SCALE, "optimizer": OPTIMIZER, "max_grad_norm": MAX_GRAD_NORM}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


INTEROP_TOKENS = LATENT_H // 2 * LATENT_W // 2  # target tokens; as many reference tokens follow


def write_mindflux_lora(out: Path) -> None:
    """MindSpore stage: a Kontext LoRA (diffusers' Kontext targets, random A and B) written by mindflux's export."""
    import mindflux
    from mindflux import FluxTransformer2DModel
    from mindflux.training.dreambooth import lora_config
    from mindflux.training.export import LoraExport
    from mindflux.training.kontext import KONTEXT_LORA_LAYERS
    from mindflux.training.run_config import TrainingConfig

    mindflux.set_device("cpu", "pynative")
    transformer = FluxTransformer2DModel.from_pretrained(str(TRANSFORMER))
    config = lora_config(TrainingConfig("", "", "", rank=RANK, lora_alpha=LORA_ALPHA), KONTEXT_LORA_LAYERS)
    transformer.add_adapter(config)
    rng = np.random.default_rng(11)
    state = {k: (0.2 * rng.standard_normal(v.shape)).astype(np.float32)
             for k, v in transformer.get_adapter_state_dict().items()}
    transformer.set_adapter_state_dict(state)
    LoraExport(transformer, config).write_lora(str(out / "kontext_lora"), "bf16")


def load_mindflux_lora(out: Path) -> None:
    """Torch stage: diffusers' FluxKontextPipeline loads that file; the transformer's output on fixed Kontext
    inputs (target and reference tokens) with it is the reference for mindflux's own loading."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

    from .dump_train_step import SCHEDULER
    from .torch_common import save_arrays, seed

    generator = seed(12)
    transformer = FluxTransformer2DModel.from_pretrained(str(TRANSFORMER))
    pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(SCHEDULER)), vae=None,
                               text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                               transformer=transformer)
    pipe.load_lora_weights(str(out / "kontext_lora"), adapter_name="kontext")
    loaded = sum("lora_A" in n for n, _ in transformer.named_parameters())
    cfg = transformer.config
    inputs = {
        "hidden_states": torch.randn(1, 2 * INTEROP_TOKENS, cfg.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, TEXT_LEN, cfg.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.6]), "guidance": torch.tensor([GUIDANCE_SCALE]),
        "img_ids": kontext_img_ids(1, LATENT_H, LATENT_W), "txt_ids": torch.zeros(TEXT_LEN, 3),
    }
    with torch.no_grad():
        output = transformer(**inputs, return_dict=False)[0]
    arrays = {f"interop.input.{k}": v for k, v in inputs.items()}
    arrays.update({"interop.output": output, "interop.lora_layers": torch.tensor(loaded)})
    save_arrays(out / "interop.safetensors", arrays)
