"""LoRA files across PyTorch diffusers + peft and mindflux (issue: LoRA files, formats and interop).

Stages (make_dumps.py topic "lora"), on the tiny transformer of the transformer fixtures:
  torch      peft adapters saved by diffusers (with and without lora_adapter_metadata, fp32 and bf16);
             kohya, ComfyUI, XLabs and BFL-control files written here and loaded by diffusers' own
             converters; outputs and per-layer LoRA probes recorded; PEFT's init statistics
  mindspore  mindflux creates an adapter and writes it as a diffusers file and as a kohya file
  torch      diffusers loads both mindflux files and records outputs and probes

A probe of an adapted layer is (sum of the active adapters' scaled B @ A) @ P for a fixed random P
(`probe_input.<in_features>`): the layer's LoRA term, without the rest of the model.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from .dump_transformer import make_inputs

ROOT = Path(__file__).resolve().parents[2]
BASE_MODEL = ROOT / "tests" / "fixtures" / "transformer" / "flux_dev"
CLIP_MODEL = ROOT / "tests" / "fixtures" / "text_encoders" / "clip"
CLIP_CASES = ROOT / "tests" / "fixtures" / "text_encoders" / "cases.safetensors"
PROBE_COLUMNS = 3
PROBE_SIZES = (16, 24, 32, 37, 128, 160, 256)  # the in_features of the tiny transformer's and CLIP's linear layers
# Tiny-model sizes for diffusers' converters, which hard-code FLUX.1's (see _patched_converters).
NUM_LAYERS, NUM_SINGLE_LAYERS, INNER_DIM, MLP_DIM = 2, 2, 32, 128

PEFT_A = dict(r=4, lora_alpha=8, rank_pattern={"to_k": 2}, alpha_pattern={"to_out.0": 3},
              target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                              "to_add_out", "proj_mlp", "proj_out", "ff.net.0.proj", "ff_context.net.2",
                              "norm1.linear", "norm_out.linear", "x_embedder"])
PEFT_B = dict(r=2, lora_alpha=2, target_modules=["to_k", "to_v", "add_k_proj"])
AB_WEIGHTS = [0.7, 1.3]
# mindflux's own adapter (written by the mindspore stage): q/k/v of different ranks and alphas, so its
# kohya export needs block-diagonal fused LoRAs. Block modules only (a regex target), as diffusers
# 0.35 drops the top-level modules of kohya files (see docs/lora.md).
MINDFLUX = dict(r=4, lora_alpha=6, rank_pattern={"to_k": 2}, alpha_pattern={"proj_mlp": 2, "ff.net.2": 3},
                target_modules=r".*(to_q|to_k|to_v|to_out\.0|add_k_proj|proj_mlp|ff\.net\.2|blocks\.\d+\.proj_out)")
MINDFLUX_SEED = 2024
# CLIP: diffusers' text-encoder targets; mindflux's adapter adds the MLP input and its own rank and alpha.
PEFT_TE = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
MINDFLUX_TE = dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])


# ---- shared with the tests (no torch) -----------------------------------------------------------
def add_mindflux_adapter(model, name: str = "mf", config: dict = MINDFLUX, seed: int = MINDFLUX_SEED) -> None:
    """The mindflux-made adapter of the interop files, with deterministic non-zero weights."""
    import mindspore as ms

    from mindflux.lora import LoraConfig

    model.add_adapter(LoraConfig(**config), name)
    rng = np.random.default_rng(seed)
    for param in model.lora_parameters(name):
        param.set_data(ms.Tensor((rng.standard_normal(param.shape) * 0.15).astype(np.float32)))


def add_mindflux_te_adapter(text_encoder, name: str = "mf") -> None:
    add_mindflux_adapter(text_encoder, name, MINDFLUX_TE, MINDFLUX_SEED + 1)


def mindspore_probes(model, probe_inputs: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Probes of mindflux's active adapters, with the scalings the forward pass uses."""
    out = {}
    for module, layer in model.lora_layers():
        if not layer.active_adapters:
            continue
        scalings = layer.lora_scaling.asnumpy()
        delta = sum(scalings[layer.adapter_index[n]] * layer.delta_weight(n) for n in layer.active_adapters)
        out[module] = delta @ probe_inputs[layer.in_channels]
    return out


# ---- torch helpers -----------------------------------------------------------------------------
def _patched_converters():
    """diffusers' kohya and BFL-control converters with the tiny model's sizes instead of FLUX.1's."""
    from diffusers.loaders import lora_conversion_utils as conv
    from diffusers.loaders import lora_pipeline

    def patch(func, replacements):
        source = inspect.getsource(func)
        for old, new in replacements:
            assert old in source, (func.__name__, old)
            source = source.replace(old, new)
        namespace = dict(vars(conv))
        exec(source, namespace)
        return namespace[func.__name__]

    kohya_sizes = [("dims=[3072, 3072, 3072, 12288]", f"dims=[{INNER_DIM}] * 3 + [{MLP_DIM}]")]
    bfl_sizes = [("num_layers = 19", f"num_layers = {NUM_LAYERS}"),
                 ("num_single_layers = 38", f"num_single_layers = {NUM_SINGLE_LAYERS}"),
                 ("inner_dim = 3072", f"inner_dim = {INNER_DIM}")]
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = patch(conv._convert_kohya_flux_lora_to_diffusers,
                                                                kohya_sizes)
    lora_pipeline._convert_bfl_flux_control_lora_to_diffusers = patch(
        conv._convert_bfl_flux_control_lora_to_diffusers, bfl_sizes)


def _pipeline(clip: bool = False):
    """A FluxPipeline around fresh copies of the fixture transformer (and CLIP); no other components needed."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    model = FluxTransformer2DModel.from_pretrained(str(BASE_MODEL))
    text_encoder = CLIPTextModel.from_pretrained(str(CLIP_MODEL)) if clip else None
    return FluxPipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)


def _probes(model, probe_inputs) -> dict:
    import torch
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters and not module.disable_adapters:
            active = [a for a in module.active_adapters if a in module.lora_A]
            if not active:
                continue
            with torch.no_grad():
                delta = sum(module.get_delta_weight(a) for a in active)
            out[name] = delta.numpy() @ probe_inputs[module.in_features]
    return out


def _record(arrays: dict, case: str, model, inputs: dict, probe_inputs: dict, **call) -> None:
    import torch

    with torch.no_grad():
        arrays[f"{case}.output"] = model(**inputs, **call).sample
    if not call:
        arrays.update({f"{case}.probe.{k}": v for k, v in _probes(model, probe_inputs).items()})


def _metadata(config) -> dict:
    """A peft config as lora_adapter_metadata, target_modules sorted: peft keeps them as a set, whose
    order (which diffusers writes as it comes) changes between runs."""
    meta = config.to_dict()
    meta["base_model_name_or_path"] = None  # peft records the checkout's absolute path
    if isinstance(meta["target_modules"], (set, list)):
        meta["target_modules"] = sorted(meta["target_modules"])
    return meta


def _record_clip(arrays: dict, case: str, text_encoder, input_ids, probe_inputs: dict) -> None:
    import torch

    with torch.no_grad():
        out = text_encoder(input_ids)
    arrays[f"{case}.clip.last_hidden_state"] = out.last_hidden_state
    arrays[f"{case}.clip.pooler_output"] = out.pooler_output
    arrays.update({f"{case}.clip_probe.{k}": v for k, v in _probes(text_encoder, probe_inputs).items()})


def _kohya_te(text_encoder, generator) -> dict:
    """CLIP LoRA keys in kohya's SD1 spelling lora_te_ (diffusers 0.35 drops sd-scripts' FLUX spelling
    lora_te1_ silently), bf16, power-of-two scales."""
    import torch

    sd = {}
    linear = [(n, m) for n, m in text_encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    for index, (name, module) in enumerate(linear):
        key = "lora_te_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = (0.2 * torch.randn(4, module.in_features, generator=generator)).bfloat16()
        sd[f"{key}.lora_up.weight"] = (0.2 * torch.randn(module.out_features, 4, generator=generator)).bfloat16()
        if index % 3:
            sd[f"{key}.alpha"] = torch.tensor(2.0 if index % 3 == 1 else 8.0, dtype=torch.bfloat16)
    return sd


def _randomize(model, adapter: str, generator, to_bf16: bool = False) -> None:
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name:
                value = 0.15 * torch.randn(param.shape, generator=generator)
                param.copy_(value.to(torch.bfloat16).float() if to_bf16 else value)


def _bfl_modules(model) -> dict[str, list[str]]:
    """BFL module -> diffusers modules (stacking order) of the tiny model, written independently of mindflux."""
    table = {}
    for name in ("img_in", "txt_in"):
        table[name] = ["x_embedder" if name == "img_in" else "context_embedder"]
    for src, dst in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in",
                                                                                          "guidance_embedder")):
        table[f"{src}.in_layer"] = [f"time_text_embed.{dst}.linear_1"]
        table[f"{src}.out_layer"] = [f"time_text_embed.{dst}.linear_2"]
    for i in range(NUM_LAYERS):
        b, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        table.update({o + "img_attn.qkv": [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"],
                      o + "txt_attn.qkv": [b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"],
                      o + "img_attn.proj": [b + "attn.to_out.0"], o + "txt_attn.proj": [b + "attn.to_add_out"],
                      o + "img_mlp.0": [b + "ff.net.0.proj"], o + "img_mlp.2": [b + "ff.net.2"],
                      o + "txt_mlp.0": [b + "ff_context.net.0.proj"], o + "txt_mlp.2": [b + "ff_context.net.2"],
                      o + "img_mod.lin": [b + "norm1.linear"], o + "txt_mod.lin": [b + "norm1_context.linear"]})
    for i in range(NUM_SINGLE_LAYERS):
        b, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        table.update({o + "linear1": [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"],
                      o + "linear2": [b + "proj_out"], o + "modulation.lin": [b + "norm.linear"]})
    table["final_layer.linear"] = ["proj_out"]
    table["final_layer.adaLN_modulation.1"] = ["norm_out.linear"]
    modules = dict(model.named_modules())
    return {k: [(t, modules[t].in_features, modules[t].out_features) for t in v] for k, v in table.items()}


def _random_bfl_lora(model, generator, rank: int, dtype) -> dict[str, tuple]:
    """BFL module -> (down, up) random tensors of the right sizes."""
    import torch

    out = {}
    for bfl, targets in _bfl_modules(model).items():
        in_features = targets[0][1]
        rows = sum(t[2] for t in targets)
        down = (0.2 * torch.randn(rank, in_features, generator=generator)).to(dtype)
        up = (0.2 * torch.randn(rows, rank, generator=generator)).to(dtype)
        out[bfl] = (down, up)
    return out


def _kohya_native(model, generator) -> list[tuple]:
    """A kohya LoRA as sd-scripts writes one, as (BFL module, down, up, alpha or None): bf16, one rank,
    the blocks' modules (diffusers 0.35 drops top-level ones), alphas on most of them (power-of-two
    scales, so diffusers' bf16 folding of alpha into the weights is exact)."""
    import torch

    entries = []
    for index, (bfl, (down, up)) in enumerate(_random_bfl_lora(model, generator, 4, torch.bfloat16).items()):
        if not bfl.startswith(("double_blocks", "single_blocks")):
            continue
        alpha = None
        if index % 3:
            alpha = torch.tensor(2.0 if index % 3 == 1 else 8.0, dtype=torch.bfloat16)
        entries.append((bfl, down, up, alpha))
    return entries


def _lora_keys(entries: list[tuple], comfyui: bool) -> dict:
    """kohya keys (lora_unet_<module with underscores>) or ComfyUI's (diffusion_model.<module>)."""
    sd = {}
    for bfl, down, up, alpha in entries:
        name = f"diffusion_model.{bfl}" if comfyui else "lora_unet_" + bfl.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        if alpha is not None:
            sd[f"{name}.alpha"] = alpha
    return sd


def _xlabs_native(model, generator) -> dict:
    import torch

    sd = {}
    dim = INNER_DIM
    for i in range(NUM_LAYERS):
        for lora, rows in (("qkv_lora1", 3 * dim), ("qkv_lora2", 3 * dim), ("proj_lora1", dim), ("proj_lora2", dim)):
            sd[f"double_blocks.{i}.processor.{lora}.down.weight"] = 0.3 * torch.randn(4, dim, generator=generator)
            sd[f"double_blocks.{i}.processor.{lora}.up.weight"] = 0.3 * torch.randn(rows, 4, generator=generator)
    sd["single_blocks.0.processor.qkv_lora.down.weight"] = 0.3 * torch.randn(4, dim, generator=generator)
    sd["single_blocks.0.processor.qkv_lora.up.weight"] = 0.3 * torch.randn(3 * dim, 4, generator=generator)
    return sd


def _bfl_control(model, generator) -> dict:
    """A BFL control LoRA: lora_A / lora_B for every module, and replaced q/k norm scales."""
    import torch

    sd = {}
    for bfl, (down, up) in _random_bfl_lora(model, generator, 4, torch.float32).items():
        if bfl == "final_layer.adaLN_modulation.1":
            # diffusers 0.35 swaps the halves of lora_A's rows too (only lora_B's should be): with
            # equal halves that extra swap changes nothing, so its output is the right reference.
            down = torch.cat([down[:2], down[:2]])
        sd[f"{bfl}.lora_A.weight"] = down
        sd[f"{bfl}.lora_B.weight"] = up
    head_dim = INNER_DIM // 2
    norms = [f"double_blocks.{i}.{s}_attn.norm.{q}_norm.scale" for i in range(NUM_LAYERS) for s in ("img", "txt")
             for q in ("query", "key")]
    norms += [f"single_blocks.{i}.norm.{q}_norm.scale" for i in range(NUM_SINGLE_LAYERS) for q in ("query", "key")]
    for key in norms:
        sd[key] = 1 + 0.2 * torch.randn(head_dim, generator=generator)
    return sd


def _init_statistics(generator) -> dict:
    """Quantiles of PEFT's initial A and B (r=8, in_features 32) for each init_lora_weights."""
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(7)
    stats = {}
    targets = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_out.0"]
    quantiles = torch.linspace(0, 1, 101, dtype=torch.float64)
    for mode, label in ((True, "kaiming"), ("gaussian", "gaussian"), (False, "false")):
        model = FluxTransformer2DModel.from_pretrained(str(BASE_MODEL))
        model.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=targets, init_lora_weights=mode), "x")
        params = dict(model.named_parameters())
        for ab in "AB":
            values = torch.cat([p.detach().flatten() for n, p in params.items() if f".lora_{ab}.x." in n])
            stats[f"init.{label}.{ab}"] = torch.quantile(values.double(), quantiles)
    return stats


# ---- stages -------------------------------------------------------------------------------------
def make_reference(out: Path) -> None:
    import torch
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from .torch_common import save_arrays, seed

    generator = seed(300)
    _patched_converters()
    arrays = {}
    inputs = make_inputs(generator, guidance=True)
    arrays.update({f"input.{k}": v for k, v in inputs.items()})
    probe_inputs = {n: torch.randn(n, PROBE_COLUMNS, generator=generator).numpy() for n in PROBE_SIZES}
    arrays.update({f"probe_input.{n}": v for n, v in probe_inputs.items()})

    # diffusers + peft adapters, saved by diffusers
    pipe = _pipeline()
    model = pipe.transformer
    with torch.no_grad():
        arrays["base.output"] = model(**inputs).sample
    model.add_adapter(LoraConfig(**PEFT_A), "a")
    _randomize(model, "a", generator)
    FluxPipeline.save_lora_weights(out / "peft_a",
                                   transformer_lora_layers=get_peft_model_state_dict(model, adapter_name="a"),
                                   transformer_lora_adapter_metadata=_metadata(model.peft_config["a"]))
    model.add_adapter(LoraConfig(**PEFT_B), "b")
    _randomize(model, "b", generator, to_bf16=True)  # saved as bf16 below, so the reference uses those values
    b_state = {k: v.to(torch.bfloat16) for k, v in get_peft_model_state_dict(model, adapter_name="b").items()}
    FluxPipeline.save_lora_weights(out / "peft_b", transformer_lora_layers=b_state)  # no metadata: alpha = r
    model.set_adapters("a")
    _record(arrays, "peft_a", model, inputs, probe_inputs)
    _record(arrays, "peft_a_half", model, inputs, probe_inputs, joint_attention_kwargs={"scale": 0.5})
    model.set_adapters(["a", "b"], AB_WEIGHTS)
    _record(arrays, "peft_ab", model, inputs, probe_inputs)

    # community formats, written here and loaded by diffusers' converters
    kohya = _kohya_native(model, generator)
    files = {"kohya": _lora_keys(kohya, comfyui=False), "comfyui": _lora_keys(kohya, comfyui=True),
             "xlabs": _xlabs_native(model, generator), "bfl": _bfl_control(model, generator)}
    for case, state in files.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{case}.safetensors"))
        pipe = _pipeline()
        pipe.load_lora_weights(str(out / f"{case}.safetensors"), adapter_name=case)
        if case == "comfyui":  # the same LoRA as the kohya file under other names
            with torch.no_grad():
                assert torch.equal(pipe.transformer(**inputs).sample, arrays["kohya.output"])
            continue
        _record(arrays, case, pipe.transformer, inputs, probe_inputs)

    # CLIP: a diffusers file with transformer and text-encoder LoRAs, and a kohya file with lora_te1_ keys
    from safetensors.numpy import load_file as load_numpy

    input_ids = torch.from_numpy(load_numpy(str(CLIP_CASES))["clip.input_ids"][:2])
    arrays["clip_input_ids"] = input_ids
    pipe = _pipeline(clip=True)
    clip = pipe.text_encoder
    with torch.no_grad():
        arrays["base.clip.last_hidden_state"] = clip(input_ids).last_hidden_state
    clip.add_adapter(LoraConfig(**PEFT_TE), adapter_name="te")
    _randomize(clip, "te", generator)
    FluxPipeline.save_lora_weights(out / "peft_te",
                                   transformer_lora_layers=get_peft_model_state_dict(model, adapter_name="a"),
                                   text_encoder_lora_layers=get_peft_model_state_dict(clip, adapter_name="te"),
                                   transformer_lora_adapter_metadata=_metadata(model.peft_config["a"]),
                                   text_encoder_lora_adapter_metadata=_metadata(clip.peft_config["te"]))
    _record_clip(arrays, "peft_te", clip, input_ids, probe_inputs)
    pipe = _pipeline(clip=True)
    save_file(_kohya_te(pipe.text_encoder, generator), str(out / "kohya_te.safetensors"))
    pipe.load_lora_weights(str(out / "kohya_te.safetensors"), adapter_name="kohya_te")
    _record_clip(arrays, "kohya_te", pipe.text_encoder, input_ids, probe_inputs)

    arrays.update(_init_statistics(generator))
    save_arrays(out / "cases.safetensors", arrays)


def write_mindflux_files(out: Path) -> None:
    """MindSpore stage: mindflux's own adapters (transformer and CLIP) as a diffusers file and as a kohya file."""
    import mindflux
    from mindflux import FluxTransformer2DModel
    from mindflux.lora import FluxLoraLoaderMixin, get_peft_model_state_dict, save_kohya_lora
    from mindflux.models.clip import CLIPTextModel

    mindflux.set_device("cpu", "pynative")
    model = FluxTransformer2DModel.from_pretrained(str(BASE_MODEL))
    add_mindflux_adapter(model)
    clip = CLIPTextModel.from_pretrained(str(CLIP_MODEL))
    add_mindflux_te_adapter(clip)
    FluxLoraLoaderMixin.save_lora_weights(str(out / "mindflux_diffusers"),
                                          transformer_lora_layers=get_peft_model_state_dict(model, "mf"),
                                          text_encoder_lora_layers=get_peft_model_state_dict(clip, "mf"),
                                          transformer_lora_adapter_metadata=model.peft_config["mf"].to_dict(),
                                          text_encoder_lora_adapter_metadata=clip.peft_config["mf"].to_dict())
    save_kohya_lora(str(out / "mindflux_kohya.safetensors"), transformer=model, text_encoder=clip, adapter_name="mf")
    # diffusers 0.35 reads CLIP keys only as lora_te_, not as sd-scripts' lora_te1_ (the default)
    save_kohya_lora(str(out / "mindflux_kohya_te.safetensors"), text_encoder=clip, adapter_name="mf",
                    text_encoder_prefix="lora_te_")


def load_mindflux_files(out: Path) -> None:
    """Torch stage: diffusers loads mindflux's files; its outputs are the references for them."""
    import torch
    from safetensors.numpy import load_file

    from .torch_common import save_arrays

    _patched_converters()
    cases = load_file(str(out / "cases.safetensors"))
    inputs = {k[len("input."):]: torch.from_numpy(v) for k, v in cases.items() if k.startswith("input.")}
    probe_inputs = {int(k.rsplit(".", 1)[1]): v for k, v in cases.items() if k.startswith("probe_input.")}
    input_ids = torch.from_numpy(cases["clip_input_ids"])
    arrays = {}
    for case, path in (("mindflux_diffusers", out / "mindflux_diffusers"),
                       ("mindflux_kohya", out / "mindflux_kohya.safetensors"),
                       ("mindflux_kohya_te", out / "mindflux_kohya_te.safetensors")):
        pipe = _pipeline(clip=True)
        pipe.load_lora_weights(str(path), adapter_name=case)
        if case != "mindflux_kohya_te":
            _record(arrays, case, pipe.transformer, inputs, probe_inputs)
        if case != "mindflux_kohya":  # whose lora_te1_ keys diffusers drops
            _record_clip(arrays, case, pipe.text_encoder, input_ids, probe_inputs)
    save_arrays(out / "mindflux_files.safetensors", arrays)
