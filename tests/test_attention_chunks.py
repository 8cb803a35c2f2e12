"""The math attention over query chunks (large sequences) equals the whole-scores path and diffusers' numbers.

The fixtures' 22 tokens are far below the chunking threshold, so the tests lower it: chunks of 8 queries
(8 + 8 + 6, an uneven last chunk) go through the same code as 512-query chunks at 1024^2.
"""

import mindspore as ms
import numpy as np

from mindflux import FluxTransformer2DModel
from mindflux.backend import attention
from tests.conftest import FIXTURES, load_cases, max_abs_diff, tensors

DUMPS = FIXTURES / "transformer"
TOL = 1e-4
# query (split, concatenated gradients) and key (gradients summed over chunks) sides of the attention
WEIGHTS = ("transformer_blocks.0.attn.to_q.weight", "transformer_blocks.1.attn.norm_added_k.weight",
           "single_transformer_blocks.0.attn.norm_k.weight")


def attention_and_grads(query, key, value, d_out):
    def loss(q, k, v):
        return (attention.scaled_dot_product_attention(q, k, v) * d_out).sum()

    return attention.scaled_dot_product_attention(query, key, value), ms.grad(loss, grad_position=(0, 1, 2))(
        query, key, value)


def test_chunks_equal_whole_scores(monkeypatch):
    rng = np.random.default_rng(0)
    query, key, value, d_out = (ms.Tensor(rng.standard_normal((2, 3, 22, 16), dtype=np.float32)) for _ in range(4))
    whole, whole_grads = attention_and_grads(query, key, value, d_out)
    calls = []
    math_attention = attention._math_attention
    monkeypatch.setattr(attention, "_math_attention", lambda q, k, v: calls.append(q.shape) or math_attention(q, k, v))
    chunk_by_eight(monkeypatch)
    out, grads = attention_and_grads(query, key, value, d_out)
    assert [shape[2] for shape in calls[:3]] == [8, 8, 6]  # the forward went through three chunks
    assert max_abs_diff(out, whole) <= 1e-6
    for name, grad, expected in zip("qkv", grads, whole_grads):
        assert max_abs_diff(grad, expected) <= 1e-5, name


def case():
    arrays = load_cases(DUMPS / "cases.safetensors", "flux_dev.")
    return tensors({k[len("input."):]: v for k, v in arrays.items() if k.startswith("input.")}), arrays


def forward_and_grads(model, jit: bool):
    inputs, ref = case()
    weights = [model.state_dict()[n] for n in WEIGHTS]
    loss_weights = ms.Tensor(ref["loss_weights"])

    def loss_fn(hidden_states, encoder_hidden_states):
        out = model(hidden_states, encoder_hidden_states, inputs["pooled_projections"], inputs["timestep"],
                    inputs["img_ids"], inputs["txt_ids"], inputs["guidance"], return_dict=False)[0]
        return (out * loss_weights).sum(), out

    grad_fn = ms.value_and_grad(loss_fn, grad_position=(0, 1), weights=weights, has_aux=True)
    (_, out), (input_grads, weight_grads) = (ms.jit(grad_fn) if jit else grad_fn)(
        inputs["hidden_states"], inputs["encoder_hidden_states"])
    names = ["hidden_states", "encoder_hidden_states", *WEIGHTS]
    return out.asnumpy(), dict(zip(names, [g.asnumpy() for g in (*input_grads, *weight_grads)])), ref


def chunk_by_eight(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)
    monkeypatch.setattr(attention, "MAX_WHOLE_SCORES", 0)


def test_chunked_transformer_matches_whole_and_diffusers(monkeypatch):
    path = str(DUMPS / "flux_dev")
    whole_out, whole_grads, ref = forward_and_grads(FluxTransformer2DModel.from_pretrained(path), jit=False)
    chunk_by_eight(monkeypatch)
    out, grads, _ = forward_and_grads(FluxTransformer2DModel.from_pretrained(path), jit=False)
    assert max_abs_diff(out, whole_out) <= 1e-6
    assert max_abs_diff(out, ref["output"]) <= TOL
    for name, grad in grads.items():
        scale = max(1.0, np.abs(ref[f"grad.{name}"]).max())
        assert max_abs_diff(grad, whole_grads[name]) <= 1e-6 * scale, name
        assert max_abs_diff(grad, ref[f"grad.{name}"]) <= TOL * scale, name


def test_chunked_transformer_graph_mode_matches_diffusers(monkeypatch):
    # the whole-scores graph is checked against the same fixtures in test_transformer_parity.py
    chunk_by_eight(monkeypatch)  # before compiling: the graph reads the thresholds when it is built
    out, grads, ref = forward_and_grads(FluxTransformer2DModel.from_pretrained(str(DUMPS / "flux_dev")), jit=True)
    assert max_abs_diff(out, ref["output"]) <= TOL
    for name, grad in grads.items():
        expected = ref[f"grad.{name}"]
        assert max_abs_diff(grad, expected) <= TOL * max(1.0, np.abs(expected).max()), name
