"""More LoRA formats on the tiny FLUX.1-dev transformer, with PyTorch's outputs (issue 19; topic lora_formats).

  mixture.safetensors  lora_transformer_<diffusers module, dots as _>.lora_down/.lora_up/.alpha: loaded by
                       diffusers' own loader (its "mixture" branch)
  fal.safetensors      base_model.model.<BFL module>.lora_A/.lora_B (fal / ostris Kontext): loaded by diffusers'
                       _convert_fal_kontext_lora_to_diffusers, given the tiny sizes instead of FLUX.1's
  lokr.safetensors     LyCORIS LoKr, lycoris_<diffusers module> names (SimpleTuner), every w1/w2 form
  loha.safetensors     LyCORIS LoHa under kohya names (lora_unet_<BFL module>) incl. a fused qkv and the final
                       layer (halves swapped), plus a LoKr module in ComfyUI's dotted spelling
diffusers does not read LyCORIS files for FLUX: their references add the ΔW computed here with torch from
the tensors written (kron / products, scale alpha / r as LyCORIS and ComfyUI define it) to the weights.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from .dump_lora import INNER_DIM, NUM_LAYERS, NUM_SINGLE_LAYERS
from .dump_sources import TRANSFORMER, _bfl_converter
from .dump_transformer import diffusers_to_bfl

BASE_MODEL = TRANSFORMER / "flux_dev"
MIXTURE_MODULES = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.1.attn.to_v",
                   "transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.attn.add_q_proj",
                   "transformer_blocks.0.attn.to_add_out", "single_transformer_blocks.1.attn.to_k",
                   "context_embedder", "x_embedder", "proj_out", "norm_out.linear",
                   "time_text_embed.timestep_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2"]
FAL_MODULES = ["img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_mlp.0", "img_mlp.2", "txt_mlp.0",
               "txt_mlp.2", "img_attn.proj", "txt_attn.proj"]


def _fal_converter():
    from diffusers.loaders import lora_conversion_utils as conv

    source = inspect.getsource(conv._convert_fal_kontext_lora_to_diffusers)
    for old, new in (("num_layers = 19", f"num_layers = {NUM_LAYERS}"),
                     ("num_single_layers = 38", f"num_single_layers = {NUM_SINGLE_LAYERS}"),
                     ("inner_dim = 3072", f"inner_dim = {INNER_DIM}")):
        assert old in source, old
        source = source.replace(old, new)
    namespace = dict(vars(conv))
    exec(source, namespace)
    return namespace["_convert_fal_kontext_lora_to_diffusers"]


def _lokr(w1, w2, alpha, dim):
    import torch

    return torch.kron(w1, w2) * (alpha / dim if alpha is not None and dim is not None else 1.0)


def make_reference(out: Path) -> None:
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffusers.loaders import lora_pipeline
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import save_file

    from .torch_common import save_arrays, seed

    generator = seed(1919)
    cases = load_numpy(str(TRANSFORMER / "cases.safetensors"))
    prefix = "flux_dev.input."
    inputs = {k[len(prefix):]: torch.from_numpy(v) for k, v in cases.items() if k.startswith(prefix)}
    base = FluxTransformer2DModel.from_pretrained(str(BASE_MODEL))
    linear = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    arrays = {}

    def randn(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=generator)

    def through_diffusers(name: str, state: dict) -> None:
        model = FluxTransformer2DModel.from_pretrained(str(BASE_MODEL))
        pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=model)
        pipe.load_lora_weights(state, adapter_name="x")
        assert model.peft_config, name
        with torch.no_grad():
            arrays[f"{name}.output"] = model(**inputs).sample

    def with_weights(name: str, diffusers_sd: dict) -> None:
        model = FluxTransformer2DModel.from_config(base.config)
        model.load_state_dict(diffusers_sd, strict=True)
        with torch.no_grad():
            arrays[f"{name}.output"] = model(**inputs).sample

    # mixture: alphas on every module (diffusers' branch requires them); one rank, as diffusers gives the
    # modules of a file without metadata the first module's rank and would mis-scale the others
    mixture = {}
    for index, module in enumerate(MIXTURE_MODULES):
        layer, rank = linear[module], 4
        key = "lora_transformer_" + module.replace(".", "_")
        mixture[f"{key}.lora_down.weight"] = randn(rank, layer.in_features)
        mixture[f"{key}.lora_up.weight"] = randn(layer.out_features, rank)
        mixture[f"{key}.alpha"] = torch.tensor(float(rank) * (0.5, 1.0, 2.0)[index % 3])
    save_file(mixture, str(out / "mixture.safetensors"))
    through_diffusers("mixture", {k: v.clone() for k, v in mixture.items()})

    # fal / ostris Kontext: PEFT keys on every BFL module of the blocks and the final linear
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    bfl = diffusers_to_bfl(dict(sd))
    fal = {}
    modules = [f"double_blocks.{i}.{m}" for i in range(NUM_LAYERS) for m in FAL_MODULES]
    modules += [f"single_blocks.{i}.{m}" for i in range(NUM_SINGLE_LAYERS) for m in ("modulation.lin", "linear1",
                                                                                    "linear2")]
    for module in modules + ["final_layer.linear"]:
        rows, cols = bfl[f"{module}.weight"].shape
        fal[f"base_model.model.{module}.lora_A.weight"] = randn(4, cols)
        fal[f"base_model.model.{module}.lora_B.weight"] = randn(rows, 4)
    save_file(fal, str(out / "fal.safetensors"))
    lora_pipeline._convert_fal_kontext_lora_to_diffusers = _fal_converter()
    through_diffusers("fal", {k: v.clone() for k, v in fal.items()})

    # LoKr, SimpleTuner's names: (module, tensors, alpha, inner size of the decomposed factor)
    lokr, deltas = {}, {}
    specs = [
        ("transformer_blocks.0.attn.to_q", {"lokr_w1": randn(4, 4), "lokr_w2": randn(8, 8)}, 5.0, None),
        ("transformer_blocks.1.ff.net.0.proj", {"lokr_w1": randn(4, 4), "lokr_w2_a": randn(32, 2),
                                                "lokr_w2_b": randn(2, 8)}, 4.0, 2),
        ("single_transformer_blocks.0.proj_out", {"lokr_w1_a": randn(4, 1), "lokr_w1_b": randn(1, 8),
                                                  "lokr_w2": randn(8, 20)}, 0.5, 1),
        ("transformer_blocks.0.attn.add_k_proj", {"lokr_w1_a": randn(2, 1), "lokr_w1_b": randn(1, 2),
                                                  "lokr_w2_a": randn(16, 2), "lokr_w2_b": randn(2, 16)}, 3.0, 2),
    ]
    for module, tensors, alpha, dim in specs:
        key = "lycoris_" + module.replace(".", "_")
        lokr.update({f"{key}.{k}": v for k, v in tensors.items()})
        lokr[f"{key}.alpha"] = torch.tensor(alpha)
        w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
        w2 = tensors["lokr_w2"] if "lokr_w2" in tensors else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
        deltas[module] = _lokr(w1, w2, alpha, dim)
    save_file(lokr, str(out / "lokr.safetensors"))
    with_weights("lokr", {k: v + deltas[k[: -len(".weight")]] if k[: -len(".weight")] in deltas else v
                          for k, v in sd.items()})

    # LoHa under kohya's BFL names (+ one ComfyUI-dotted LoKr module), applied in the BFL layout
    loha, bfl_deltas = {}, {}
    for module, rank, alpha in (("double_blocks.0.img_attn.qkv", 4, 2.0), ("single_blocks.1.linear1", 2, None),
                                ("final_layer.adaLN_modulation.1", 4, 8.0)):
        rows, cols = bfl[f"{module}.weight"].shape
        parts = {"hada_w1_a": randn(rows, rank), "hada_w1_b": randn(rank, cols), "hada_w2_a": randn(rows, rank),
                 "hada_w2_b": randn(rank, cols)}
        key = "lora_unet_" + module.replace(".", "_")
        loha.update({f"{key}.{k}": v for k, v in parts.items()})
        if alpha is not None:
            loha[f"{key}.alpha"] = torch.tensor(alpha)
        scale = alpha / rank if alpha is not None else 1.0
        product = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
        bfl_deltas[module] = product * scale
    w1, w2 = randn(2, 4), randn(16, 32)  # double_blocks.1.img_mlp.2: (32, 128) = kron((2, 4), (16, 32))
    loha["diffusion_model.double_blocks.1.img_mlp.2.lokr_w1"] = w1
    loha["diffusion_model.double_blocks.1.img_mlp.2.lokr_w2"] = w2
    bfl_deltas["double_blocks.1.img_mlp.2"] = _lokr(w1, w2, None, None)
    save_file(loha, str(out / "loha.safetensors"))
    merged = {k: v + bfl_deltas[k[: -len(".weight")]] if k[: -len(".weight")] in bfl_deltas else v
              for k, v in bfl.items()}
    with_weights("loha", _bfl_converter()(merged))
    save_arrays(out / "cases.safetensors", arrays)
