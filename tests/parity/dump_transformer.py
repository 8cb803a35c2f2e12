"""Reference outputs and gradients of tiny diffusers FluxTransformer2DModels (issue: foundation)."""

from __future__ import annotations

import inspect
from pathlib import Path

# Tiny FLUX-shaped configs: dev (guidance embedding) and schnell (none).
CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=[4, 6, 6])
MODELS = {"flux_dev": dict(CONFIG, guidance_embeds=True), "flux_schnell": dict(CONFIG, guidance_embeds=False)}
BATCH, GRID_H, GRID_W, TEXT_LEN = 2, 3, 5, 7  # a non-square 3 x 5 latent grid
GRAD_WEIGHTS = [
    "x_embedder.weight",
    "context_embedder.bias",
    "time_text_embed.timestep_embedder.linear_1.weight",
    "transformer_blocks.0.attn.to_q.weight",
    "transformer_blocks.0.ff_context.net.2.bias",
    "transformer_blocks.1.attn.norm_added_k.weight",
    "single_transformer_blocks.0.attn.norm_k.weight",
    "single_transformer_blocks.1.proj_out.weight",
    "norm_out.linear.weight",
]


def image_ids(h: int, w: int):
    import torch

    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def make_inputs(generator, guidance: bool) -> dict:
    import torch

    inputs = {
        "hidden_states": torch.randn(BATCH, GRID_H * GRID_W, CONFIG["in_channels"], generator=generator),
        "encoder_hidden_states": torch.randn(BATCH, TEXT_LEN, CONFIG["joint_attention_dim"], generator=generator),
        "pooled_projections": torch.randn(BATCH, CONFIG["pooled_projection_dim"], generator=generator),
        "timestep": torch.tensor([0.25, 0.9]),
        "img_ids": image_ids(GRID_H, GRID_W),
        "txt_ids": torch.zeros(TEXT_LEN, 3),
    }
    if guidance:
        inputs["guidance"] = torch.tensor([3.5, 1.5])
    return inputs


def diffusers_to_bfl(sd: dict) -> dict:
    """diffusers -> BFL layout, written independently of mindflux and checked by diffusers' own converter."""
    import torch

    out, sd = {}, dict(sd)

    def move(bfl, *names):
        for suffix in ("weight", "bias"):
            parts = [sd.pop(f"{n}.{suffix}") for n in names]
            out[f"{bfl}.{suffix}"] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]

    move("img_in", "x_embedder")
    move("txt_in", "context_embedder")
    embedders = (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder"))
    for src, dst in embedders:
        if f"time_text_embed.{dst}.linear_1.weight" in sd:
            move(f"{src}.in_layer", f"time_text_embed.{dst}.linear_1")
            move(f"{src}.out_layer", f"time_text_embed.{dst}.linear_2")
    i = 0
    while f"transformer_blocks.{i}.norm1.linear.weight" in sd:
        b, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        move(o + "img_mod.lin", b + "norm1.linear")
        move(o + "txt_mod.lin", b + "norm1_context.linear")
        move(o + "img_attn.qkv", b + "attn.to_q", b + "attn.to_k", b + "attn.to_v")
        move(o + "txt_attn.qkv", b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj")
        move(o + "img_attn.proj", b + "attn.to_out.0")
        move(o + "txt_attn.proj", b + "attn.to_add_out")
        move(o + "img_mlp.0", b + "ff.net.0.proj")
        move(o + "img_mlp.2", b + "ff.net.2")
        move(o + "txt_mlp.0", b + "ff_context.net.0.proj")
        move(o + "txt_mlp.2", b + "ff_context.net.2")
        for bfl, name in (("img_attn.norm.query_norm", "norm_q"), ("img_attn.norm.key_norm", "norm_k"),
                          ("txt_attn.norm.query_norm", "norm_added_q"), ("txt_attn.norm.key_norm", "norm_added_k")):
            out[f"{o}{bfl}.scale"] = sd.pop(f"{b}attn.{name}.weight")
        i += 1
    i = 0
    while f"single_transformer_blocks.{i}.norm.linear.weight" in sd:
        b, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        move(o + "linear1", b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp")
        move(o + "linear2", b + "proj_out")
        move(o + "modulation.lin", b + "norm.linear")
        out[o + "norm.query_norm.scale"] = sd.pop(b + "attn.norm_q.weight")
        out[o + "norm.key_norm.scale"] = sd.pop(b + "attn.norm_k.weight")
        i += 1
    move("final_layer.linear", "proj_out")
    for suffix in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{suffix}").chunk(2, 0)
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift, scale], 0)
    assert not sd, f"unmapped keys: {sorted(sd)}"
    return out


def check_with_diffusers_converter(bfl: dict, original: dict, inner_dim: int) -> None:
    """Run diffusers' BFL -> diffusers converter (its inner size is fixed at FLUX's 3072, so it is
    re-read with the tiny size) and require the original state dict back, tensor for tensor."""
    import torch
    from diffusers.loaders import single_file_utils

    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in source
    namespace = {"torch": torch}
    exec(source.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)
    back = namespace["convert_flux_transformer_checkpoint_to_diffusers"](dict(bfl))
    assert set(back) == set(original), set(back) ^ set(original)
    for k in original:
        assert torch.equal(back[k], original[k]), k


def forward_and_grads(model, inputs: dict, generator) -> dict:
    import torch

    leaf = {k: v.clone().requires_grad_(k in ("hidden_states", "encoder_hidden_states", "pooled_projections"))
            for k, v in inputs.items()}
    model.zero_grad()
    out = model(**leaf).sample
    weights = torch.randn(out.shape, generator=generator)
    (out * weights).sum().backward()
    params = dict(model.named_parameters())
    # clone: casting the model afterwards (to bf16) would otherwise cast these gradients in place
    result = {"output": out.detach().clone(), "loss_weights": weights}
    for k in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        result[f"grad.{k}"] = leaf[k].grad.clone()
    for name in GRAD_WEIGHTS + (["time_text_embed.guidance_embedder.linear_2.weight"] if "guidance" in inputs else []):
        result[f"grad.{name}"] = params[name].grad.clone()
    return result


def make_reference(out: Path) -> None:
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from .torch_common import perturb_norm_weights, save_arrays, seed

    arrays = {}
    for index, (name, cfg) in enumerate(MODELS.items()):
        generator = seed(100 + index)
        model = FluxTransformer2DModel(**cfg)
        perturb_norm_weights(model, generator)
        model.save_pretrained(out / name)
        inputs = make_inputs(generator, cfg["guidance_embeds"])
        result = forward_and_grads(model, inputs, generator)
        arrays.update({f"{name}.input.{k}": v for k, v in inputs.items()})
        arrays.update({f"{name}.{k}": v for k, v in result.items()})
        if name != "flux_dev":
            continue
        model.save_pretrained(out / "flux_dev_sharded", max_shard_size="200KB")
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bfl = diffusers_to_bfl(sd)
        check_with_diffusers_converter(bfl, sd, model.inner_dim)
        save_file(bfl, str(out / "flux_dev_bfl.safetensors"))
        # BF16 checkpoint: the reference is the bf16-rounded weights run in fp32.
        model.to(torch.bfloat16).save_pretrained(out / "flux_dev_bf16")
        model.to(torch.float32)
        with torch.no_grad():
            arrays["flux_dev_bf16.output"] = model(**inputs).sample
    save_arrays(out / "cases.safetensors", arrays)


def write_mindflux_copy(out: Path) -> None:
    """MindSpore stage: mindflux saves the dev model as BF16 shards for diffusers to read back."""
    import mindflux
    from mindflux import FluxTransformer2DModel

    mindflux.set_device("cpu", "pynative")
    model = FluxTransformer2DModel.from_pretrained(str(out / "flux_dev"))
    model.to("bf16").save_pretrained(str(out / "mindflux_saved_bf16"), max_shard_size="200KB")


def load_mindflux_copy(out: Path) -> None:
    """Torch stage: diffusers loads what mindflux saved; its output is the reference for that file."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.numpy import load_file

    from .torch_common import save_arrays

    model, info = FluxTransformer2DModel.from_pretrained(str(out / "mindflux_saved_bf16"), output_loading_info=True,
                                                         torch_dtype=torch.bfloat16)
    assert not any(info.values()), info
    cases = load_file(str(out / "cases.safetensors"))
    prefix = "flux_dev.input."
    inputs = {k[len(prefix):]: torch.from_numpy(v) for k, v in cases.items() if k.startswith(prefix)}
    with torch.no_grad():
        output = model.to(torch.float32)(**inputs).sample
    save_arrays(out / "mindflux_saved_bf16.safetensors", {"output": output})
