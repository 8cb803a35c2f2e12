"""LoRA formats: detection, key mapping, bad input, kohya export, and the pipeline-level API (no forward passes).

kohya semantics are checked the way ComfyUI applies a kohya LoRA: W_bfl + up @ down * alpha / rank on
the BFL checkpoint (the transformer fixture's flux_dev_bfl.safetensors), then converted to diffusers
names, must equal mindflux's fused diffusers weights.
"""

import logging

import mindspore as ms
import numpy as np
import pytest

from mindflux import FluxTransformer2DModel
from mindflux.key_conversion import SWAPPED_HALVES, bfl_module_of, bfl_module_targets
from mindflux.lora import (
    FluxLoraLoaderMixin,
    LoraConfig,
    LoraFormatError,
    LoraKeyError,
    LoraLinear,
    LoraShapeError,
    convert_to_kohya,
    detect_format,
    get_peft_model_state_dict,
    save_kohya_lora,
)
from mindflux.lora.loader import adapter_lora_weights, layouts_of, read_lora
from mindflux.safetensors_io import SafetensorsFile, load_file, save_file
from tests.lora_utils import BASE, LORA, StandInPipeline

BFL_CHECKPOINT = BASE.parent / "flux_dev_bfl.safetensors"


def randomize(model, name, seed, scale=0.2):
    rng = np.random.default_rng(seed)
    for param in model.lora_parameters(name):
        param.set_data(ms.Tensor((rng.standard_normal(param.shape) * scale).astype(np.float32)))


def comfyui_apply(kohya: dict[str, np.ndarray], tmp_path) -> dict[str, np.ndarray]:
    """ComfyUI's application of a kohya LoRA to the BFL checkpoint, then the checkpoint in diffusers names."""
    weights = load_file(str(BFL_CHECKPOINT))
    for key in kohya:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        down, up = kohya[key].astype(np.float64), kohya[f"{name}.lora_up.weight"].astype(np.float64)
        alpha = float(kohya[f"{name}.alpha"]) if f"{name}.alpha" in kohya else down.shape[0]
        target = next(k for k in weights if k.endswith(".weight")
                      and "lora_unet_" + k[: -len(".weight")].replace(".", "_") == name)
        weights[target] = (weights[target] + up @ down * (alpha / down.shape[0])).astype(np.float32)
    path = tmp_path / "patched_bfl.safetensors"
    save_file({k: (v, "F32") for k, v in weights.items()}, str(path))
    model = FluxTransformer2DModel.from_single_file(str(path), axes_dims_rope=[4, 6, 6])
    return {k: v.asnumpy() for k, v in model.state_dict().items()}


def assert_fused_equals(model, expected: dict[str, np.ndarray], tol=1e-5):
    before = {n: p.asnumpy().copy() for n, p in model.state_dict().items()}
    model.fuse_lora()
    params = model.state_dict()
    changed = 0
    for name, value in expected.items():
        assert np.abs(params[name].asnumpy() - value).max() <= tol, name
        changed += np.abs(value - before[name]).max() > 1e-2
    assert changed >= 10  # the LoRA moves many weights well beyond the tolerance
    model.unfuse_lora()


def random_kohya(model, seed: int) -> dict[str, np.ndarray]:
    """A kohya LoRA on every BFL module of the model: ranks 2 and 4, alphas (some absent), dense ups."""
    rng = np.random.default_rng(seed)
    layout = layouts_of({"transformer": model})["transformer"]
    modules = dict.fromkeys(bfl_module_of(m)[0] for m in layout)
    out = {}
    for i, bfl in enumerate(modules):
        targets = bfl_module_targets(bfl)
        rank = 2 if i % 2 else 4
        name = "lora_unet_" + bfl.replace(".", "_")
        out[f"{name}.lora_down.weight"] = (rng.standard_normal((rank, layout[targets[0]][0])) * 0.2).astype(np.float32)
        rows = sum(layout[t][1] for t in targets)
        out[f"{name}.lora_up.weight"] = (rng.standard_normal((rows, rank)) * 0.2).astype(np.float32)
        if i % 3:
            out[f"{name}.alpha"] = np.asarray(rank * (0.75 if i % 3 == 1 else 1.5), np.float32)
    return out


# ---- detection and bad input -----------------------------------------------------------------------
@pytest.mark.parametrize("path, expected", [
    ("peft_a/pytorch_lora_weights.safetensors", "diffusers"), ("kohya.safetensors", "kohya"),
    ("comfyui.safetensors", "comfyui"), ("xlabs.safetensors", "xlabs"), ("bfl.safetensors", "bfl"),
])
def test_detect_format(path, expected):
    assert detect_format(load_file(str(LORA / path))) == expected


def test_unknown_format_names_the_accepted_ones():
    state = {"model.layers.0.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(LoraFormatError, match="accepted formats: diffusers, kohya, comfyui, bfl, xlabs, mixture, fal, "
                                              "lycoris"):
        detect_format(state)
    with pytest.raises(LoraFormatError, match="accepted formats"):
        StandInPipeline().load_lora_weights(state)


def test_unmappable_keys_are_listed_by_name_or_warned(caplog):
    state = load_file(str(LORA / "kohya.safetensors"))
    junk = {
        "lora_unet_double_blocks_0_bogus.lora_down.weight": np.zeros((4, 32), np.float32),
        "lora_unet_double_blocks_0_bogus.lora_up.weight": np.zeros((32, 4), np.float32),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": np.zeros((4, 8), np.float32),
        "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": np.zeros((4, 8), np.float32),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((4, 8), np.float32),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.zeros((8, 4), np.float32),
        # lora_A spelling of a down matrix the file already has
        "lora_unet_double_blocks_0_img_attn_proj.lora_A.weight": np.ones((4, 32), np.float32),
    }
    pipe = StandInPipeline()
    with pytest.raises(LoraKeyError) as err:
        pipe.load_lora_weights({**state, **junk}, adapter_name="x")
    for key in junk:
        assert key in str(err.value)
    for reason in ("text_encoder, which this pipeline does not have", "a T5 LoRA", "no FLUX module",
                   "a second down"):
        assert reason in str(err.value)
    assert not getattr(pipe.transformer, "peft_config", None)  # nothing was loaded
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights({**state, **junk}, adapter_name="x", strict=False)
    assert all(key in caplog.text for key in junk)
    reference = StandInPipeline()
    reference.load_lora_weights(str(LORA / "kohya.safetensors"), adapter_name="x")
    ours, theirs = pipe.transformer.get_adapter_state_dict("x"), reference.transformer.get_adapter_state_dict("x")
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_shape_mismatch_names_the_first_key_and_both_shapes():
    state = load_file(str(LORA / "kohya.safetensors"))
    first = next(k for k in state if k.endswith("lora_up.weight"))
    later = [k for k in state if k.endswith("lora_up.weight")][-1]
    bad = dict(state)
    bad[first] = state[first][:-1]
    bad[later] = state[later][:-2]
    pipe = StandInPipeline()
    rows = state[first].shape[0]
    expected = rf"{first} has shape \({rows - 1}, 4\), the model expects \({rows}, 4\)"
    with pytest.raises(LoraShapeError, match=expected):
        pipe.load_lora_weights(bad)
    assert not getattr(pipe.transformer, "peft_config", None)

    diffusers = load_file(str(LORA / "peft_a" / "pytorch_lora_weights.safetensors"))
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    diffusers[key] = np.zeros((4, 31), np.float32)
    with pytest.raises(LoraShapeError, match=rf"{key} has shape \(4, 31\), the model expects \(4, 32\)"):
        pipe.load_lora_weights(diffusers)


def test_metadata_rank_must_match_the_tensors(tmp_path):
    model = FluxTransformer2DModel.from_pretrained(str(BASE))
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]), "a")
    wrong = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"]).to_dict()
    FluxLoraLoaderMixin.save_lora_weights(str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(model),
                                          transformer_lora_adapter_metadata=wrong)
    with pytest.raises(LoraShapeError, match=r"lora_B\.weight has rank 4, but .* gives .* r=2"):
        StandInPipeline().load_lora_weights(str(tmp_path))


def test_metadata_with_unsupported_peft_features_is_refused():
    config = LoraConfig(r=4, target_modules=["to_q"]).to_dict()
    with pytest.raises(ValueError, match="use_dora"):
        LoraConfig.from_dict({**config, "use_dora": True})
    with pytest.raises(ValueError, match="use_bdlora"):
        LoraConfig.from_dict({**config, "use_bdlora": True})  # a field of a later PEFT, switched on
    with pytest.raises(ValueError, match="pissa"):
        LoraConfig.from_dict({**config, "init_lora_weights": "pissa_niter_4"})  # needs PiSSA's changed base model
    loaded = LoraConfig.from_dict({**config, "peft_type": "LORA", "use_bdlora": False, "bias": "none",
                                   "init_lora_weights": "orthogonal", "base_model_name_or_path": "x"})
    assert loaded.r == 4 and loaded.target_modules == ["to_q"] and loaded.init_lora_weights is True


# ---- kohya semantics --------------------------------------------------------------------------------
def test_kohya_import_follows_comfyui(tmp_path):
    pipe = StandInPipeline()
    kohya = random_kohya(pipe.transformer, 0)
    pipe.load_lora_weights(kohya, adapter_name="k")
    assert_fused_equals(pipe.transformer, comfyui_apply(kohya, tmp_path))


@pytest.mark.parametrize("shared", [False, True])
def test_kohya_export_follows_comfyui(tmp_path, shared):
    model = FluxTransformer2DModel.from_pretrained(str(BASE))
    if shared:  # a LoRA that came from a kohya file: q/k/v share the down matrix
        StandInPipeline(model).load_lora_weights(load_file(str(LORA / "kohya.safetensors")), adapter_name="a")
    else:
        # every linear layer but add_v_proj and proj_mlp: fused modules also have targets without LoRA
        model.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=r".*(?<!add_v_proj)(?<!proj_mlp)",
                                     rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 2, "norm_out.linear": 3}), "a")
        randomize(model, "a", 1)
    path = tmp_path / "kohya.safetensors"
    save_kohya_lora(str(path), transformer=model, adapter_name="a")
    kohya = load_file(str(path))
    qkv = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert qkv.shape[0] == (4 if shared else 12)  # shared down, or block-diagonal at the largest rank
    assert_fused_equals(model, comfyui_apply(kohya, tmp_path))


def test_kohya_roundtrip_recovers_the_adapter(tmp_path):
    model = FluxTransformer2DModel.from_pretrained(str(BASE))
    model.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "proj_mlp", "proj_out"],
                                 rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 2}), "a")
    randomize(model, "a", 2)
    save_kohya_lora(str(tmp_path / "a.safetensors"), transformer=model, adapter_name="a")
    pipe = StandInPipeline()
    pipe.load_lora_weights(str(tmp_path / "a.safetensors"), adapter_name="a")
    original, loaded = adapter_lora_weights(model, "a"), adapter_lora_weights(pipe.transformer, "a")
    assert original.keys() == loaded.keys()
    for module, w in original.items():  # the block-diagonal export splits back into the separate LoRAs
        np.testing.assert_array_equal(loaded[module].down, w.down, err_msg=module)
        scale = w.lora_alpha / w.rank
        np.testing.assert_allclose(loaded[module].up * (loaded[module].lora_alpha / loaded[module].rank),
                                   w.up * scale, rtol=1e-6, err_msg=module)
    save_kohya_lora(str(tmp_path / "b.safetensors"), transformer=pipe.transformer, adapter_name="a")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_kohya_export_dtypes(tmp_path):
    pipe = StandInPipeline()
    pipe.load_lora_weights(str(LORA / "kohya.safetensors"))
    pipe.save_lora_weights_kohya(str(tmp_path / "bf16.safetensors"), dtype="bf16")
    file = SafetensorsFile(str(tmp_path / "bf16.safetensors"))
    assert {file.dtype(k) for k in file.keys() if not k.endswith(".alpha")} == {"BF16"}
    assert {file.dtype(k) for k in file.keys() if k.endswith(".alpha")} == {"F32"}
    # the fixture is bf16 already: exporting it as bf16 gives its values back
    source = load_file(str(LORA / "kohya.safetensors"))
    exported = load_file(str(tmp_path / "bf16.safetensors"))
    for key in source:
        np.testing.assert_array_equal(exported[key], source[key], err_msg=key)
    for key in set(exported) - set(source):  # modules the file gave no alpha (alpha = rank) get it written
        assert key.endswith(".alpha") and exported[key] == source[key.replace(".alpha", ".lora_down.weight")].shape[0]


def test_convert_to_kohya_needs_bfl_names():
    layers = {"transformer": {}, "unet": {}}
    with pytest.raises(ValueError, match="not \\['unet'\\]"):
        convert_to_kohya(layers, {})
    assert SWAPPED_HALVES  # the final layer's halves are swapped on the way (checked via comfyui_apply)


# ---- the pipeline-level API ---------------------------------------------------------------------------
def test_lora_state_dict_is_a_loadable_diffusers_dict(tmp_path):
    pipe = StandInPipeline()
    state = pipe.lora_state_dict(str(LORA / "kohya.safetensors"))
    assert all(k.startswith("transformer.") for k in state)
    assert detect_format(state) == "diffusers"
    from_class = FluxLoraLoaderMixin.lora_state_dict(str(LORA / "kohya.safetensors"))  # no models: FLUX's structure
    assert from_class.keys() == state.keys() and all(np.array_equal(from_class[k], state[k]) for k in state)
    layers = {k[len("transformer."):]: v for k, v in state.items()}
    FluxLoraLoaderMixin.save_lora_weights(str(tmp_path), transformer_lora_layers=layers)
    pipe.load_lora_weights(str(tmp_path), adapter_name="resaved")
    pipe.load_lora_weights(str(LORA / "kohya.safetensors"), adapter_name="direct")
    for module, layer in pipe.transformer.lora_layers():
        np.testing.assert_allclose(layer.delta_weight("resaved") * layer.adapter_config["resaved"].scaling,
                                   layer.delta_weight("direct") * layer.adapter_config["direct"].scaling,
                                   rtol=1e-6, atol=1e-7, err_msg=module)


def test_pipeline_switching_fusing_and_unloading():
    pipe = StandInPipeline()
    model = pipe.transformer
    original = {n: p.asnumpy().copy() for n, p in model.state_dict().items()}
    pipe.load_lora_weights(str(LORA / "xlabs.safetensors"))
    pipe.load_lora_weights(str(LORA / "peft_b"))
    assert pipe.get_list_adapters() == {"transformer": ["default_0", "default_1"]}
    with pytest.raises(ValueError, match="already in use"):
        pipe.load_lora_weights(str(LORA / "peft_b"), adapter_name="default_1")
    pipe.set_adapters(["default_0", "default_1"], [{"transformer": 0.5}, 2.0])
    assert pipe.get_active_adapters() == ["default_0", "default_1"]
    layer = dict(model.lora_layers())["transformer_blocks.0.attn.to_k"]
    scalings = layer.lora_scaling.asnumpy()
    assert scalings[layer.adapter_index["default_0"]] == 0.5 and scalings[layer.adapter_index["default_1"]] == 2.0
    # the fused weight, from the files: XLabs' qkv_lora1 gives to_k the middle third of its up matrix with
    # the whole down matrix; both files have no alpha (scale 1)
    xlabs = load_file(str(LORA / "xlabs.safetensors"))
    peft_b = load_file(str(LORA / "peft_b" / "pytorch_lora_weights.safetensors"))
    xlabs_delta = (xlabs["double_blocks.0.processor.qkv_lora1.up.weight"][32:64]
                   @ xlabs["double_blocks.0.processor.qkv_lora1.down.weight"])
    peft_delta = (peft_b["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"]
                  @ peft_b["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"])
    expected = original["transformer_blocks.0.attn.to_k.weight"] + 0.5 * xlabs_delta + 2.0 * peft_delta
    pipe.fuse_lora()
    np.testing.assert_allclose(layer.weight.asnumpy(), expected, rtol=0, atol=1e-6)
    pipe.unfuse_lora()
    np.testing.assert_array_equal(layer.weight.asnumpy(), original["transformer_blocks.0.attn.to_k.weight"])
    pipe.disable_lora()
    assert pipe.get_active_adapters() == []
    pipe.enable_lora()
    pipe.delete_adapters("default_0")
    assert pipe.get_list_adapters() == {"transformer": ["default_1"]}
    with pytest.raises(ValueError, match="not loaded"):
        pipe.set_adapters("default_0")
    pipe.unload_lora_weights()
    assert not any(isinstance(c, LoraLinear) for _, c in model.cells_and_names())
    params = model.state_dict()
    assert params.keys() == original.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(params[name].asnumpy(), value, err_msg=name)


def test_read_lora_keeps_fp32_and_reads_metadata():
    state, metadata = read_lora(str(LORA / "peft_a"))
    assert metadata["transformer.r"] == 4 and {v.dtype for v in state.values()} == {np.dtype(np.float32)}
    state, metadata = read_lora(str(LORA / "kohya.safetensors"))
    assert metadata is None and {v.dtype for v in state.values()} == {np.dtype(np.float32)}


def test_lora_loaded_into_a_bf16_model_stays_fp32():
    model = FluxTransformer2DModel.from_pretrained(str(BASE), mindspore_dtype="bf16")
    StandInPipeline(model).load_lora_weights(str(LORA / "kohya.safetensors"))
    assert {p.dtype for p in model.lora_parameters()} == {ms.float32}
    layer = dict(model.lora_layers())["transformer_blocks.0.attn.to_q"]
    assert layer.weight.dtype == ms.bfloat16
    assert layer.lora_A["default_0"].get_mixed_precision_type() is not None  # computes in bf16 via to_float
