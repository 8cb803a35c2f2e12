"""LoRA adapter mechanics on the transformer: injection, scaling, switching, fusing (PEFT semantics)."""

import mindspore as ms
import numpy as np
import pytest

from mindflux import FluxTransformer2DModel
from mindflux.lora import LoraConfig, LoraLinear
from tests.conftest import FIXTURES, load_cases, max_abs_diff, tensors

DUMPS = FIXTURES / "transformer"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]


def inputs():
    arrays = load_cases(DUMPS / "cases.safetensors", "flux_dev.input.")
    return tensors(arrays)


def randomize(model, name, seed):
    rng = np.random.default_rng(seed)
    for param in model.lora_parameters(name):
        param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.1))


@pytest.fixture
def model():
    return FluxTransformer2DModel.from_pretrained(str(DUMPS / "flux_dev"))


def test_targets_match_like_peft_and_names_stay(model):
    base_names = set(model.state_dict())
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), "a")
    wrapped = dict(model.lora_layers())
    assert "transformer_blocks.0.attn.to_out.0" in wrapped and "single_transformer_blocks.1.proj_mlp" in wrapped
    assert "transformer_blocks.0.attn.add_q_proj" not in wrapped  # "to_q" is a suffix match, not a substring
    assert len(wrapped) == 2 * 4 + 2 * 4  # 4 per double block, 3 + proj_mlp per single block
    names = set(model.state_dict())
    assert base_names <= names  # base parameters keep their diffusers names
    assert "transformer_blocks.0.attn.to_q.lora_A.a.weight" in names
    assert all(p.name == n for n, p in model.parameters_and_names())  # unique full names for graph mode
    assert {p.dtype for p in model.lora_parameters()} == {ms.float32}
    with pytest.raises(ValueError, match="match no linear layer"):
        model.add_adapter(LoraConfig(target_modules=["nonexistent"]), "b")
    regex = FluxTransformer2DModel.from_pretrained(str(DUMPS / "flux_dev"))
    regex.add_adapter(LoraConfig(target_modules=r"transformer_blocks\.1\.attn\.to_(q|k)"), "r")
    assert sorted(dict(regex.lora_layers())) == ["transformer_blocks.1.attn.to_k", "transformer_blocks.1.attn.to_q"]


def test_default_init_is_a_no_op_and_scaling_is_alpha_over_r(model):
    x = inputs()
    base = model(**x).sample.asnumpy()
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"]), "a")
    layer = dict(model.lora_layers())["transformer_blocks.0.attn.to_q"]
    assert np.all(layer.lora_B["a"].weight.asnumpy() == 0) and np.any(layer.lora_A["a"].weight.asnumpy() != 0)
    assert max_abs_diff(model(**x).sample, base) == 0
    randomize(model, "a", 0)
    h = ms.Tensor(np.random.default_rng(1).standard_normal((3, layer.in_channels)).astype(np.float32))
    expected = h.asnumpy() @ (layer.weight.asnumpy() + 2.0 * layer.delta_weight("a")).T + layer.bias.asnumpy()
    assert max_abs_diff(layer(h), expected) < 1e-5


def test_switching_weights_scale_and_fusing(model):
    x = inputs()
    base = model(**x).sample.asnumpy()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), "a")
    model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"]), "b")
    randomize(model, "a", 0)
    randomize(model, "b", 1)
    assert model.active_adapters == ["b"]  # the newest adapter becomes active, as in diffusers
    model.set_adapters(["a", "b"], [1.0, 0.5])
    both = model(**x).sample.asnumpy()
    model.set_adapters(["a"])
    only_a = model(**x).sample.asnumpy()
    assert max_abs_diff(only_a, base) > 1e-3 and max_abs_diff(both, only_a) > 1e-4
    model.set_adapters(["a"], [0.0])
    assert max_abs_diff(model(**x).sample, base) < 1e-6
    model.set_adapters(["a"], [0.5])
    half = model(**x).sample.asnumpy()
    assert max_abs_diff(model(**x, joint_attention_kwargs={"scale": 2.0}).sample, only_a) < 1e-5
    assert max_abs_diff(model(**x).sample, half) == 0  # the call-time scale does not stick
    model.disable_adapters()
    assert max_abs_diff(model(**x).sample, base) < 1e-6
    model.enable_adapters()

    model.set_adapters(["a", "b"], [1.0, 0.5])
    weights_before = {n: p.asnumpy().copy() for n, p in model.state_dict().items()}
    model.fuse_lora()
    assert all(not layer.active_adapters for _, layer in model.lora_layers())
    assert max_abs_diff(model(**x).sample, both) < 1e-4
    model.unfuse_lora()
    for name, param in model.state_dict().items():
        np.testing.assert_array_equal(param.asnumpy(), weights_before[name], err_msg=name)  # exactly restored
    assert max_abs_diff(model(**x).sample, both) < 1e-5

    model.delete_adapters("a")
    assert "a" not in model.peft_config and model.active_adapters == ["b"]
    assert not any(".lora_A.a." in n for n in model.state_dict())
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapters("a")


def test_graph_mode_follows_scale_and_structure_changes(model, graph_mode):
    x = inputs()
    base = model(**x).sample.asnumpy()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"]), "a")
    randomize(model, "a", 0)
    full = model(**x).sample.asnumpy()  # recompiled with the adapter
    assert max_abs_diff(full, base) > 1e-3
    model.set_adapters("a", 0.0)  # data only
    assert max_abs_diff(model(**x).sample, base) < 1e-6
    model.set_adapters("a", 1.0)
    model.disable_adapters()  # structure: recompiles without the branches
    assert max_abs_diff(model(**x).sample, base) < 1e-6


def test_adapter_state_dict_roundtrip_and_bad_shapes(model):
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]), "a")
    randomize(model, "a", 3)
    state = model.get_adapter_state_dict("a")
    assert set(state) == {f"{m}.lora_{ab}.weight" for m, _ in model.lora_layers() for ab in "AB"}
    other = FluxTransformer2DModel.from_pretrained(str(DUMPS / "flux_dev"))
    other.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]), "a")
    other.set_adapter_state_dict(state, "a")
    for key, value in other.get_adapter_state_dict("a").items():
        np.testing.assert_array_equal(value, state[key])
    key = "transformer_blocks.0.attn.to_q.lora_A.weight"
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.to_q\.lora_A\.weight.*\(2, 32\).*\(4, 32\)"):
        other.set_adapter_state_dict({**state, key: state[key][:2]}, "a")


def test_lora_stays_fp32_when_the_model_is_cast(model):
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]), "a")
    model.to("bf16")
    layer = dict(model.lora_layers())["transformer_blocks.0.attn.to_q"]
    assert isinstance(layer, LoraLinear) and layer.weight.dtype == ms.bfloat16
    assert {p.dtype for p in model.lora_parameters()} == {ms.float32}
    assert layer.lora_A["a"].get_mixed_precision_type() is not None  # computes in the base dtype via to_float
