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
from tests.lora_utils import BASE, LORA, StandInPipeline, inputs, probe_error, references
from tests.parity.dump_lora import AB_WEIGHTS, add_mindflux_adapter

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


def test_mindflux_files_load_in_diffusers(refs, tmp_path):
    # The fixtures were written by mindflux (make_dumps' mindspore stage) and loaded by diffusers.
    # Writing them again must give the same bytes, so diffusers' results are about today's writers.
    model = FluxTransformer2DModel.from_pretrained(str(BASE))
    add_mindflux_adapter(model)
    FluxLoraLoaderMixin.save_lora_weights(str(tmp_path / "diffusers"),
                                          transformer_lora_layers=get_peft_model_state_dict(model, "mf"),
                                          transformer_lora_adapter_metadata=model.peft_config["mf"].to_dict())
    save_kohya_lora(str(tmp_path / "kohya.safetensors"), transformer=model, adapter_name="mf")
    name = "pytorch_lora_weights.safetensors"
    assert (tmp_path / "diffusers" / name).read_bytes() == (LORA / "mindflux_diffusers" / name).read_bytes()
    assert (tmp_path / "kohya.safetensors").read_bytes() == (LORA / "mindflux_kohya.safetensors").read_bytes()
    for case in ("mindflux_diffusers", "mindflux_kohya"):
        assert probe_error(model, refs, case) <= PROBE_TOL, case
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
