"""Reference images of a tiny diffusers FluxPipeline (issue 4: FluxPipeline).

Topic "pipeline" writes tests/fixtures/pipeline/:
  tiny_flux/          a FLUX.1-dev-shaped pipeline saved by diffusers' save_pretrained: tiny transformer
                      (in_channels 64 = 16 latent channels x 2x2 patch, guidance embedding), tiny VAE
                      (4 blocks, so vae_scale_factor is 8 as FLUX's), tiny CLIP and T5 (bf16, as FLUX.1
                      ships them) with the real tokenizer fixtures, FLUX.1-dev's scheduler config
  transformer_schnell/, scheduler_schnell/   the schnell variant (no guidance embedding, no dynamic shift)
  cases.safetensors   fixed initial latents, and the images (np, fp32), final latents, per-step
                      latents and prompt embeddings diffusers produced from them
  cases.json          the call arguments of each case
The reference runs the saved folder reloaded by diffusers in fp32 (the bf16 text encoders upcast).
"""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                   axes_dims_rope=[4, 6, 6])
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 8, 16, 16],
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1,
           act_fn="silu", norm_num_groups=4, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
           latents_mean=None, latents_std=None, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
           mid_block_add_attention=True)
# FLUX.1's text encoders, shrunk: CLIP-L's vocabulary and legacy eos_token_id = 2 (pooling at
# argmax(input_ids)); T5 v1.1's gated-gelu, vocabulary padded past the tokenizer's 1100 tokens.
CLIP = dict(vocab_size=49408, hidden_size=16, intermediate_size=37, projection_dim=16, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
T5 = dict(vocab_size=1152, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_decoder_layers=1, num_heads=4,
          relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
          dropout_rate=0.1, layer_norm_epsilon=1e-6, tie_word_embeddings=False)
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

PROMPTS = ["a red circle on a white background", "two small blue triangles in the top left corner"]
# Each case: the FluxPipeline call (without latents), and the shape of the packed initial latents.
CASES = {
    # FLUX.1-dev: embedded guidance, batch of two prompts, non-square, dynamic shift from 12 image tokens
    "dev": dict(call=dict(prompt=PROMPTS, height=64, width=48, num_inference_steps=3, guidance_scale=3.5,
                          max_sequence_length=32), latents=[2, 12, 64]),
    # true CFG: a negative prompt and true_cfg_scale > 1, two images of one prompt
    "cfg": dict(call=dict(prompt=PROMPTS[1], negative_prompt="blurry, low quality", true_cfg_scale=4.0,
                          num_images_per_prompt=2, height=48, width=64, num_inference_steps=2, guidance_scale=2.0,
                          max_sequence_length=32), latents=[2, 12, 64]),
    # FLUX.1-schnell: no guidance, no dynamic shift, custom sigmas; 72 x 40 is rounded down to 64 x 32
    "schnell": dict(call=dict(prompt=PROMPTS[0], height=72, width=40, num_inference_steps=3, sigmas=[1.0, 0.7, 0.4],
                              guidance_scale=0.0, max_sequence_length=16), latents=[1, 8, 64]),
}


def tokenizers_folder(out: Path) -> Path:
    """The tokenizers regenerated in this run if there are any, else the committed ones."""
    fresh = out.parent / "tokenizers"
    return fresh if (fresh / "clip").is_dir() else FIXTURES / "tokenizers"


def init_weights(model, generator, scale: float = 1.0) -> None:
    """Weights of order one, so that every layer, norm and bias shows in the outputs."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                value = (1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(param.shape, generator=generator)
            elif "embedding" in name or "relative_attention_bias" in name or name == "shared.weight":
                value = torch.randn(param.shape, generator=generator)
            elif param.ndim >= 2:
                fan_in = param[0].numel()
                value = scale * torch.randn(param.shape, generator=generator) / fan_in ** 0.5
            else:
                value = 0.1 * torch.randn(param.shape, generator=generator)
            param.copy_(value)


def init_transformer(model, generator) -> None:
    """Order-one weights, with the output projection scaled so the predicted velocity is of order
    one (as a trained FLUX's) and the latents stay in range over the steps."""
    import torch

    init_weights(model, generator)
    with torch.no_grad():
        model.proj_out.weight.mul_(0.2)


def build_pipeline(out: Path, generator):
    """The tiny pipeline, built from configs and saved with save_pretrained."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    tokenizers = tokenizers_folder(out)
    transformer = FluxTransformer2DModel(**TRANSFORMER)
    init_transformer(transformer, generator)
    vae = AutoencoderKL(**VAE)
    init_weights(vae, generator)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP)).eval()
    init_weights(clip, generator, scale=1.5)
    t5 = T5EncoderModel(T5Config(**T5)).eval()
    init_weights(t5, generator)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER), vae=vae,
        text_encoder=clip.to(torch.bfloat16), tokenizer=CLIPTokenizer.from_pretrained(str(tokenizers / "clip")),
        text_encoder_2=t5.to(torch.bfloat16), tokenizer_2=T5TokenizerFast.from_pretrained(str(tokenizers / "t5")),
        transformer=transformer)
    pipe.save_pretrained(out / "tiny_flux")

    schnell = FluxTransformer2DModel(**dict(TRANSFORMER, guidance_embeds=False))
    init_transformer(schnell, generator)
    schnell.save_pretrained(out / "transformer_schnell")
    FlowMatchEulerDiscreteScheduler(**SCHNELL_SCHEDULER).save_pretrained(out / "scheduler_schnell")


def run_case(pipe, name: str, latents) -> dict:
    """Images, final latents, the latents after every step and the prompt embeddings of one case."""
    import torch

    call = dict(CASES[name]["call"])
    steps = []

    def record(pipeline, step, timestep, callback_kwargs):
        steps.append(callback_kwargs["latents"].clone())
        return {}

    with torch.no_grad():
        images = pipe(**call, latents=latents, output_type="np", callback_on_step_end=record).images
        final = pipe(**call, latents=latents, output_type="latent").images
        embeds, pooled, _ = pipe.encode_prompt(call["prompt"], max_sequence_length=call["max_sequence_length"],
                                               num_images_per_prompt=call.get("num_images_per_prompt", 1))
    arrays = {"latents": latents, "images": torch.from_numpy(images), "final_latents": final,
              "step_latents": torch.stack(steps), "prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if "negative_prompt" in call:
        neg, neg_pooled, _ = pipe.encode_prompt(call["negative_prompt"], num_images_per_prompt=call.get(
            "num_images_per_prompt", 1), max_sequence_length=call["max_sequence_length"])
        arrays.update({"negative_prompt_embeds": neg, "negative_pooled_prompt_embeds": neg_pooled})
    return {f"{name}.{k}": v for k, v in arrays.items()}


def make_reference(out: Path) -> None:
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from .torch_common import save_arrays, seed

    generator = seed(400)
    build_pipeline(out, generator)
    pipe = FluxPipeline.from_pretrained(str(out / "tiny_flux"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8 and pipe.text_encoder.dtype == torch.float32

    arrays = {}
    for name, case in CASES.items():
        if name == "schnell":
            pipe.transformer = FluxTransformer2DModel.from_pretrained(str(out / "transformer_schnell"))
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out / "scheduler_schnell"))
        latents = torch.randn(case["latents"], generator=generator)
        arrays.update(run_case(pipe, name, latents))
        images = arrays[f"{name}.images"].numpy()
        # images that use the range: few pixels clamped at 0 or 1, a spread of values
        assert np.mean((images == 0) | (images == 1)) < 0.2 and images.std() > 0.1, (name, images.std())
    assert arrays["schnell.images"].shape == (1, 64, 32, 3)
    save_arrays(out / "cases.safetensors", arrays)
    (out / "cases.json").write_text(json.dumps(CASES, indent=1) + "\n", encoding="utf-8")


def write_mindflux_copy(out: Path) -> None:
    """MindSpore stage: mindflux loads the diffusers folder and saves it again with save_pretrained."""
    import mindflux
    from mindflux import FluxPipeline

    mindflux.set_device("cpu", "pynative")
    FluxPipeline.from_pretrained(str(out / "tiny_flux")).save_pretrained(str(out / "mindflux_saved"))


def load_mindflux_copy(out: Path) -> None:
    """Torch stage: diffusers loads mindflux's folder and must reproduce the reference images from it.
    Its images and the content hash of every file mindflux wrote (mindflux_saved.json) are kept; the folder
    (a copy of tiny_flux) is removed to keep the fixtures small. tests/test_pipeline.py checks that what
    mindflux saves today has the same content, so these images speak for it."""
    import shutil

    import torch
    from diffusers import FluxPipeline
    from safetensors.numpy import load_file

    from .torch_common import save_arrays

    folder = out / "mindflux_saved"
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    assert index == json.loads((out / "tiny_flux" / "model_index.json").read_text(encoding="utf-8")), index
    pipe = FluxPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    cases = load_file(str(out / "cases.safetensors"))
    with torch.no_grad():
        images = pipe(**CASES["dev"]["call"], latents=torch.from_numpy(cases["dev.latents"]), output_type="np").images
    error = float(abs(images - cases["dev.images"]).max())
    assert error <= 1e-6, error
    save_arrays(out / "mindflux_saved.safetensors", {"dev.images": images})
    from .make_dumps import digest

    (out / "mindflux_saved.json").write_text(json.dumps(digest(folder), indent=1, sort_keys=True) + "\n",
                                            encoding="utf-8")
    shutil.rmtree(folder)
