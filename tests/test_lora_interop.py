"""LoRA files between PyTorch diffusers + peft and mindflux, against tests/parity/dump_lora.py.

Each file is loaded into mindflux and compared with what diffusers computed after loading the same
file: every adapted layer's LoRA term (probe) and the transformer's output, fp32, <= 1e-4.
"""

import json

import mindspore as ms
import numpy as np
import pytest

from mindflux import FluxTransformer2DModel
from mindflux.lora import FluxLoraLoaderMixin, LoraConfig, get_peft_model_state_dict, save_kohya_lora
from mindflux.safetensors_io import SafetensorsFile, load_file
from tests.conftest import max_abs_diff
from tests.lora_utils import BASE, LORA, StandInPipeline, clip, clip_outputs, inputs, probe_error, references
from tests.parity.dump_lora import AB_WEIGHTS, add_mindflux_adapter, add_mindflux_te_adapter

TOL = 1e-4
PROBE_TOL = 1e-5


@pytest.fixture(scope="module")
def refs():
    return references()


def check_output(model, refs, case, **call):
    expected = refs[f"{case}.output"]
    assert max_abs_diff(expected, refs["base.output"]) > 0.1  # the LoRA changes the output well beyond TOL
    error = max_abs_diff(model(**inputs(refs), **call).sample, expected)
    assert error <= TOL, (case, error)


def test_peft_file_loads_with_its_metadata(refs):
    pipe = StandInPipeline()
    pipe.load_lora_weights(str(LORA / "peft_a"), adapter_name="a")
    header = SafetensorsFile(str(LORA / "peft_a" / "pytorch_lora_weights.safetensors")).metadata
    saved = {k[len("transformer."):]: v for k, v in json.loads(header["lora_adapter_metadata"]).items()}
    config = pipe.transformer.peft_config["a"]
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"):
        assert getattr(config, field) == saved[field], field
    assert sorted(config.target_modules) == sorted(saved["target_modules"])
    assert {p.dtype for p in pipe.transformer.lora_parameters()} == {ms.float32}
    assert probe_error(pipe.transformer, refs, "peft_a") <= PROBE_TOL
    check_output(pipe.transformer, refs, "peft_a")
    check_output(pipe.transformer, refs, "peft_a_half", joint_attention_kwargs={"scale": 0.5})


def test_bf16_file_without_metadata_and_weighted_adapters(refs):
    pipe = StandInPipeline()
    pipe.load_lora_weights(str(LORA / "peft_a"), adapter_name="a")
    pipe.load_lora_weights(str(LORA / "peft_b"), adapter_name="b")
    assert pipe.get_active_adapters() == ["b"]  # the newest adapter is the active one, as in diffusers
    file = SafetensorsFile(str(LORA / "peft_b" / "pytorch_lora_weights.safetensors"))
    assert {file.dtype(k) for k in file.keys()} == {"BF16"}
    state = pipe.transformer.get_adapter_state_dict("b")
    for key in file.keys():  # kept fp32, with the file's values exactly
        np.testing.assert_array_equal(state[key[len("transformer."):]], file.get_float32(key))
    for _, layer in pipe.transformer.lora_layers():
        if "b" in layer.adapter_config:  # no metadata: alpha = r
            assert layer.adapter_config["b"].scaling == 1.0
    pipe.set_adapters(["a", "b"], AB_WEIGHTS)
    assert probe_error(pipe.transformer, refs, "peft_ab") <= PROBE_TOL
    check_output(pipe.transformer, refs, "peft_ab")


def test_kohya_and_comfyui_files_match_diffusers(refs):
    pipe = StandInPipeline()
    pipe.load_lora_weights(str(LORA / "kohya.safetensors"), adapter_name="kohya")
    assert probe_error(pipe.transformer, refs, "kohya") <= PROBE_TOL
    check_output(pipe.transformer, refs, "kohya")
    # ComfyUI's keys for the same LoRA (diffusers gave the same output, checked in the dump)
    pipe.load_lora_weights(str(LORA / "comfyui.safetensors"), adapter_name="comfyui")
    kohya, comfy = (pipe.transformer.get_adapter_state_dict(n) for n in ("kohya", "comfyui"))
    assert kohya.keys() == comfy.keys()
    for key in kohya:
        np.testing.assert_array_equal(kohya[key], comfy[key], err_msg=key)
    assert probe_error(pipe.transformer, refs, "kohya") <= PROBE_TOL


def test_xlabs_file_matches_diffusers(refs):
    pipe = StandInPipeline()
    pipe.load_lora_weights(str(LORA / "xlabs.safetensors"))
    assert probe_error(pipe.transformer, refs, "xlabs") <= PROBE_TOL
    check_output(pipe.transformer, refs, "xlabs")


def test_bfl_control_lora_matches_diffusers_and_restores_norms(refs):
    pipe = StandInPipeline()
    before = {n: p.asnumpy().copy() for n, p in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(LORA / "bfl.safetensors"), adapter_name="control")
    file = load_file(str(LORA / "bfl.safetensors"))
    params = pipe.transformer.state_dict()
    np.testing.assert_array_equal(params["transformer_blocks.1.attn.norm_added_k.weight"].asnumpy(),
                                  file["double_blocks.1.txt_attn.norm.key_norm.scale"])
    assert probe_error(pipe.transformer, refs, "bfl") <= PROBE_TOL
    check_output(pipe.transformer, refs, "bfl")
    pipe.delete_adapters("control")
    params = pipe.transformer.state_dict()
    for name, value in before.items():
        np.testing.assert_array_equal(params[name].asnumpy(), value, err_msg=name)


def check_clip(text_encoder, refs, case):
    outputs = clip_outputs(text_encoder, refs)
    assert max_abs_diff(refs[f"{case}.clip.last_hidden_state"], refs["base.clip.last_hidden_state"]) > 0.1
    for name, value in outputs.items():
        assert max_abs_diff(value, refs[f"{case}.clip.{name}"]) <= TOL, (case, name)


def test_clip_lora_files_match_transformers(refs):
    pipe = StandInPipeline(text_encoder=clip())
    pipe.load_lora_weights(str(LORA / "peft_te"), adapter_name="te")  # transformer and CLIP LoRAs in one file
    assert pipe.get_list_adapters() == {"transformer": ["te"], "text_encoder": ["te"]}
    assert probe_error(pipe.transformer, refs, "peft_a") <= PROBE_TOL
    assert probe_error(pipe.text_encoder, refs, "peft_te", "clip_probe") <= PROBE_TOL
    check_clip(pipe.text_encoder, refs, "peft_te")
    kohya = StandInPipeline(text_encoder=clip())
    kohya.load_lora_weights(str(LORA / "kohya_te.safetensors"), adapter_name="k")
    assert probe_error(kohya.text_encoder, refs, "kohya_te", "clip_probe") <= PROBE_TOL
    check_clip(kohya.text_encoder, refs, "kohya_te")
    # the same LoRA under ComfyUI's and sd-scripts' FLUX keys
    state = load_file(str(LORA / "kohya_te.safetensors"))
    comfy = {}
    for key, value in state.items():
        module, _, suffix = key[len("lora_te_"):].partition(".")
        dotted = next(m for m, _ in kohya.text_encoder.lora_layers() if m.replace(".", "_") == module)
        comfy[f"text_encoders.clip_l.transformer.{dotted}.{suffix}"] = value
    kohya.load_lora_weights(comfy, adapter_name="comfy")
    kohya.load_lora_weights({k.replace("lora_te_", "lora_te1_"): v for k, v in state.items()}, adapter_name="te1")
    loaded = {n: kohya.text_encoder.get_adapter_state_dict(n) for n in ("k", "comfy", "te1")}
    for name in ("comfy", "te1"):
        assert loaded[name].keys() == loaded["k"].keys()
        assert all(np.array_equal(loaded[name][key], loaded["k"][key]) for key in loaded["k"]), name


def test_mindflux_files_load_in_diffusers(refs, tmp_path):
    # The fixtures were written by mindflux (make_dumps' mindspore stage) and loaded by diffusers.
    # Writing them again must give the same bytes, so diffusers' results are about today's writers.
    model, text_encoder = FluxTransformer2DModel.from_pretrained(str(BASE)), clip()
    add_mindflux_adapter(model)
    add_mindflux_te_adapter(text_encoder)
    FluxLoraLoaderMixin.save_lora_weights(str(tmp_path / "diffusers"),
                                          transformer_lora_layers=get_peft_model_state_dict(model, "mf"),
                                          text_encoder_lora_layers=get_peft_model_state_dict(text_encoder, "mf"),
                                          transformer_lora_adapter_metadata=model.peft_config["mf"].to_dict(),
                                          text_encoder_lora_adapter_metadata=text_encoder.peft_config["mf"].to_dict())
    save_kohya_lora(str(tmp_path / "kohya.safetensors"), transformer=model, text_encoder=text_encoder,
                    adapter_name="mf")
    save_kohya_lora(str(tmp_path / "kohya_te.safetensors"), text_encoder=text_encoder, adapter_name="mf",
                    text_encoder_prefix="lora_te_")
    name = "pytorch_lora_weights.safetensors"
    assert (tmp_path / "diffusers" / name).read_bytes() == (LORA / "mindflux_diffusers" / name).read_bytes()
    for file in ("kohya", "kohya_te"):
        assert (tmp_path / f"{file}.safetensors").read_bytes() == \
            (LORA / f"mindflux_{file}.safetensors").read_bytes(), file
    for case in ("mindflux_diffusers", "mindflux_kohya"):
        assert probe_error(model, refs, case) <= PROBE_TOL, case
    for case in ("mindflux_diffusers", "mindflux_kohya_te"):
        assert probe_error(text_encoder, refs, case, "clip_probe") <= PROBE_TOL, case
        check_clip(text_encoder, refs, case)
    output = model(**inputs(refs)).sample
    for case in ("mindflux_diffusers", "mindflux_kohya"):
        assert max_abs_diff(refs[f"{case}.output"], refs["base.output"]) > 0.1
        assert max_abs_diff(output, refs[f"{case}.output"]) <= TOL, case


@pytest.mark.parametrize("mode, label", [(True, "kaiming"), ("gaussian", "gaussian"), (False, "false")])
def test_init_matches_peft_distributions(refs, mode, label):
    model = FluxTransformer2DModel.from_pretrained(str(BASE))
    targets = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_out.0"]
    model.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=targets, init_lora_weights=mode), "x")
    state = model.get_adapter_state_dict("x")
    for ab in "AB":
        ref = refs[f"init.{label}.{ab}"]  # 101 quantiles of peft's initial values
        values = np.concatenate([v.ravel() for k, v in state.items() if f".lora_{ab}." in k])
        if np.all(ref == 0):
            assert np.all(values == 0), (label, ab)
            continue
        spread = ref[-1] - ref[0]
        ours = np.quantile(values, np.linspace(0, 1, 101))
        # same distribution: quantiles within sampling noise of ~5600 draws, extremes within 10 %
        assert np.abs(ours[5:-5] - ref[5:-5]).max() <= 0.04 * spread, (label, ab)
        assert abs(ours[0] - ref[0]) <= 0.1 * spread and abs(ours[-1] - ref[-1]) <= 0.1 * spread, (label, ab)
