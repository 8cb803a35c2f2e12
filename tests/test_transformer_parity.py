"""FluxTransformer2DModel against diffusers 0.35.2 outputs and gradients (tests/parity/dump_transformer.py)."""

import mindspore as ms
import numpy as np
import pytest

from mindflux import FluxTransformer2DModel
from tests.conftest import FIXTURES, load_cases, max_abs_diff, tensors

DUMPS = FIXTURES / "transformer"
TOL = 1e-4


def case(name: str):
    arrays = load_cases(DUMPS / "cases.safetensors", f"{name}.")
    inputs = tensors({k[len("input."):]: v for k, v in arrays.items() if k.startswith("input.")})
    return inputs, arrays


@pytest.fixture(scope="module")
def dev_model():
    return FluxTransformer2DModel.from_pretrained(str(DUMPS / "flux_dev"))


@pytest.mark.parametrize("name", ["flux_dev", "flux_schnell"])
def test_forward_matches_diffusers(name):
    model = FluxTransformer2DModel.from_pretrained(str(DUMPS / name))
    inputs, ref = case(name)
    out = model(**inputs).sample
    assert np.abs(ref["output"]).mean() > 0.1  # outputs of order one, so the tolerance means something
    assert max_abs_diff(out, ref["output"]) <= TOL


def test_gradients_match_diffusers(dev_model):
    inputs, ref = case("flux_dev")
    params = dev_model.state_dict()
    names = sorted(k[len("grad."):] for k in ref if k.startswith("grad.") and k[len("grad."):] in params)
    assert len(names) >= 8
    loss_weights = ms.Tensor(ref["loss_weights"])

    def loss_fn(hidden_states, encoder_hidden_states, pooled_projections):
        out = dev_model(hidden_states, encoder_hidden_states, pooled_projections, inputs["timestep"],
                        inputs["img_ids"], inputs["txt_ids"], inputs["guidance"], return_dict=False)[0]
        return (out * loss_weights).sum()

    grad_fn = ms.value_and_grad(loss_fn, grad_position=(0, 1, 2), weights=[params[n] for n in names])
    _, (input_grads, weight_grads) = grad_fn(inputs["hidden_states"], inputs["encoder_hidden_states"],
                                             inputs["pooled_projections"])
    for key, grad in zip(("hidden_states", "encoder_hidden_states", "pooled_projections"), input_grads):
        expected = ref[f"grad.{key}"]
        assert max_abs_diff(grad, expected) <= TOL * max(1.0, np.abs(expected).max()), key
    for name, grad in zip(names, weight_grads):
        expected = ref[f"grad.{name}"]
        assert max_abs_diff(grad, expected) <= TOL * max(1.0, np.abs(expected).max()), name


def test_graph_mode_matches_diffusers(dev_model, graph_mode):
    inputs, ref = case("flux_dev")
    out = dev_model(**inputs).sample
    assert max_abs_diff(out, ref["output"]) <= TOL


def test_three_dimensional_ids_are_accepted(dev_model, caplog):
    inputs, ref = case("flux_dev")
    inputs["img_ids"] = inputs["img_ids"][None]
    inputs["txt_ids"] = inputs["txt_ids"][None]
    out = dev_model(**inputs).sample
    assert max_abs_diff(out, ref["output"]) <= TOL
    assert "deprecated" in caplog.text


def test_sharded_checkpoint_loads(dev_model):
    sharded = FluxTransformer2DModel.from_pretrained(str(DUMPS / "flux_dev_sharded"))
    for name, param in dev_model.state_dict().items():
        np.testing.assert_array_equal(sharded.state_dict()[name].asnumpy(), param.asnumpy(), err_msg=name)


def test_bf16_checkpoint_loads():
    inputs, _ = case("flux_dev")
    ref = load_cases(DUMPS / "cases.safetensors", "flux_dev_bf16.")
    as_fp32 = FluxTransformer2DModel.from_pretrained(str(DUMPS / "flux_dev_bf16"))
    assert as_fp32.dtype == ms.float32
    assert max_abs_diff(as_fp32(**inputs).sample, ref["output"]) <= TOL
    as_bf16 = FluxTransformer2DModel.from_pretrained(str(DUMPS / "flux_dev_bf16"), mindspore_dtype=ms.bfloat16)
    assert {p.dtype for p in as_bf16.state_dict().values()} == {ms.bfloat16}


def test_bfl_single_file_matches_diffusers_layout():
    model = FluxTransformer2DModel.from_single_file(str(DUMPS / "flux_dev_bfl.safetensors"), axes_dims_rope=[4, 6, 6])
    assert model.config.num_layers == 2 and model.config.guidance_embeds
    inputs, ref = case("flux_dev")
    assert max_abs_diff(model(**inputs).sample, ref["output"]) <= TOL


def test_mindflux_checkpoint_loads_in_diffusers(dev_model, tmp_path):
    # The fixture was written by mindflux (make_dumps' mindspore stage) and loaded by diffusers.
    # Writing it again must give the same bytes, so the diffusers result below is about today's writer.
    dev_model.to("bf16").save_pretrained(str(tmp_path), max_shard_size="200KB")
    dev_model.to("fp32")
    saved = DUMPS / "mindflux_saved_bf16"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in saved.iterdir())
    for path in saved.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    torch_output = load_cases(DUMPS / "mindflux_saved_bf16.safetensors")["output"]
    reloaded = FluxTransformer2DModel.from_pretrained(str(saved))
    inputs, _ = case("flux_dev")
    assert max_abs_diff(reloaded(**inputs).sample, torch_output) <= TOL


@pytest.mark.parametrize("argument, change, message", [
    ("hidden_states", lambda x: x[0], "hidden_states"),
    ("encoder_hidden_states", lambda x: x[:, :, :8], "encoder_hidden_states"),
    ("pooled_projections", lambda x: x[:1], "pooled_projections"),
    ("img_ids", lambda x: x[:4], "img_ids"),
    ("txt_ids", lambda x: x[:, :2], "txt_ids"),
    ("guidance", lambda x: None, "guidance"),
])
def test_bad_inputs_name_the_argument(dev_model, argument, change, message):
    inputs, _ = case("flux_dev")
    inputs[argument] = change(inputs[argument])
    with pytest.raises(ValueError, match=message):
        dev_model(**inputs)


def test_gradient_checkpointing_keeps_gradients(graph_mode):
    model = FluxTransformer2DModel.from_pretrained(str(DUMPS / "flux_dev"))
    model.enable_gradient_checkpointing()
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    assert all(block._recompute_cell is not None for block in blocks)
    inputs, ref = case("flux_dev")
    loss_weights = ms.Tensor(ref["loss_weights"])
    name = "transformer_blocks.0.attn.to_q.weight"

    def loss_fn(hidden_states):
        out = model(hidden_states, inputs["encoder_hidden_states"], inputs["pooled_projections"], inputs["timestep"],
                    inputs["img_ids"], inputs["txt_ids"], inputs["guidance"], return_dict=False)[0]
        return (out * loss_weights).sum()

    grad_fn = ms.jit(ms.value_and_grad(loss_fn, grad_position=0, weights=[model.state_dict()[name]]))
    _, (input_grad, (weight_grad,)) = grad_fn(inputs["hidden_states"])
    assert max_abs_diff(input_grad, ref["grad.hidden_states"]) <= TOL
    assert max_abs_diff(weight_grad, ref[f"grad.{name}"]) <= TOL * max(1.0, np.abs(ref[f"grad.{name}"]).max())
