"""CLIPTextModel and T5EncoderModel against transformers 4.57.1 (tests/parity/dump_text_encoders.py)."""

import json
import logging
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from mindflux import CLIPTextModel, FluxTransformer2DModel, T5EncoderModel
from mindflux.models.t5 import _clamp_fp16, relative_position_bucket
from mindflux.safetensors_io import SafetensorsFile, save_file
from tests.conftest import FIXTURES, load_cases, max_abs_diff

DUMPS = FIXTURES / "text_encoders"
TOL = 1e-4


@pytest.fixture(scope="module")
def cases():
    return load_cases(DUMPS / "cases.safetensors")


@pytest.fixture(scope="module")
def clip():
    return CLIPTextModel.from_pretrained(str(DUMPS / "clip"))


@pytest.fixture(scope="module")
def t5():
    return T5EncoderModel.from_pretrained(str(DUMPS / "t5"))


def ids(cases, name):
    return ms.Tensor(cases[name])


def assert_close(actual, expected):
    assert np.abs(expected).mean() > 0.1  # outputs of order one, so the tolerance means something
    assert max_abs_diff(actual, expected) <= TOL


# ---- CLIP ------------------------------------------------------------------------------------
def test_clip_matches_transformers(clip, cases):
    # FLUX's config: quick_gelu, eos_token_id 2 (pooling at the highest id), 77 positions, BF16 weights
    assert clip.config.eos_token_id == 2 and clip.config.hidden_act == "quick_gelu"
    assert clip.dtype == ms.float32  # BF16 file, loaded as fp32 by default
    out = clip(ids(cases, "clip.input_ids"), output_hidden_states=True)
    assert_close(out.last_hidden_state, cases["clip.last_hidden_state"])
    assert_close(out.pooler_output, cases["clip.pooler_output"])
    assert len(out.hidden_states) == 3
    for index, state in enumerate(out.hidden_states):
        assert_close(state, cases[f"clip.hidden_states.{index}"])
    assert clip(ids(cases, "clip.input_ids")).hidden_states is None


def test_clip_attention_mask_and_tuple_output(clip, cases):
    out = clip(ids(cases, "clip.input_ids"), attention_mask=ids(cases, "clip.attention_mask"), return_dict=False)
    assert len(out) == 2
    assert_close(out[0], cases["clip.masked.last_hidden_state"])
    assert_close(out[1], cases["clip.masked.pooler_output"])


def test_clip_pooling_first_eos_or_legacy_argmax(cases):
    # Token 63 stands for an added token above eos (62): argmax pooling and first-eos pooling differ.
    model = CLIPTextModel.from_pretrained(str(DUMPS / "clip_eos"))
    assert model.config.eos_token_id == 62 and model.config.hidden_act == "gelu"
    out = model(ids(cases, "clip_eos.input_ids"))
    assert_close(out.last_hidden_state, cases["clip_eos.last_hidden_state"])
    assert_close(out.pooler_output, cases["clip_eos.pooler_output"])
    legacy = CLIPTextModel.from_pretrained(str(DUMPS / "clip_eos"), eos_token_id=2)
    assert_close(legacy(ids(cases, "clip_eos.input_ids")).pooler_output, cases["clip_eos.legacy.pooler_output"])
    assert max_abs_diff(cases["clip_eos.pooler_output"], cases["clip_eos.legacy.pooler_output"]) > 0.1


def test_clip_rejects_more_tokens_than_positions():
    model = CLIPTextModel.from_pretrained(str(DUMPS / "clip_eos"))  # 16 positions
    with pytest.raises(ValueError, match="at most 16 tokens"):
        model(ms.Tensor(np.zeros((1, 17), np.int64)))


def test_clip_attention_projections_are_dense_and_wrappable(cases):
    # LoRA replaces nn.Dense cells; a wrapper that adds a zero update must leave the numbers alone.
    class Wrapped(nn.Cell):
        def __init__(self, base):
            super().__init__()
            self.base_layer = base
            self.delta = nn.Dense(base.in_channels, base.out_channels, has_bias=False, weight_init="zeros")

        def construct(self, x):
            return self.base_layer(x) + self.delta(x)

    model = CLIPTextModel.from_pretrained(str(DUMPS / "clip_eos"))
    for layer in model.text_model.encoder.layers:
        attn = layer.self_attn
        assert all(isinstance(getattr(attn, n), nn.Dense) for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(attn, name, Wrapped(getattr(attn, name)))
    assert_close(model(ids(cases, "clip_eos.input_ids")).pooler_output, cases["clip_eos.pooler_output"])


# ---- T5 --------------------------------------------------------------------------------------
def test_t5_matches_transformers(t5, cases):
    assert t5.config.feed_forward_proj == "gated-gelu" and t5.is_gated_act and t5.dense_act_fn == "gelu_new"
    out = t5(ids(cases, "t5.input_ids"), output_hidden_states=True)
    assert_close(out.last_hidden_state, cases["t5.last_hidden_state"])
    assert len(out.hidden_states) == 3
    for index, state in enumerate(out.hidden_states):
        assert_close(state, cases[f"t5.hidden_states.{index}"])
    masked = t5(ids(cases, "t5.input_ids"), attention_mask=ids(cases, "t5.attention_mask"), return_dict=False)
    assert len(masked) == 1
    assert_close(masked[0], cases["t5.masked.last_hidden_state"])


def test_t5_relative_position_buckets_match_transformers(cases):
    relative = cases["buckets.relative_position"]
    for buckets, distance in ((32, 128), (8, 16)):
        expected = cases[f"buckets.{buckets}_{distance}"]
        np.testing.assert_array_equal(relative_position_bucket(relative, True, buckets, distance), expected)


def test_t5_long_sequence_grows_the_bucket_table(cases):
    # 256 tokens (schnell's length) span distances past max_distance 128; a table built for 64
    # tokens must be rebuilt for them.
    model = T5EncoderModel.from_pretrained(str(DUMPS / "t5"))
    attention = model.encoder.block[0].layer[0].SelfAttention
    attention.set_bucket_length(64)
    assert_close(model(ids(cases, "t5_long.input_ids")).last_hidden_state, cases["t5_long.last_hidden_state"])
    assert attention.bucket_length >= 256


def test_t5_relu_feed_forward_matches_transformers(cases):
    model = T5EncoderModel.from_pretrained(str(DUMPS / "t5_relu"))
    assert not model.is_gated_act and model.dense_act_fn == "relu"
    assert "wi" in dict(model.encoder.block[0].layer[1].DenseReluDense.name_cells())
    assert_close(model(ids(cases, "t5_relu.input_ids")).last_hidden_state, cases["t5_relu.last_hidden_state"])


def test_t5_bf16_checkpoint_loads(cases):
    as_fp32 = T5EncoderModel.from_pretrained(str(DUMPS / "t5_bf16"))
    assert as_fp32.dtype == ms.float32
    assert_close(as_fp32(ids(cases, "t5.input_ids")).last_hidden_state, cases["t5_bf16.last_hidden_state"])
    as_bf16 = T5EncoderModel.from_pretrained(str(DUMPS / "t5_bf16"), mindspore_dtype="bf16")
    assert {p.dtype for p in as_bf16.state_dict().values()} == {ms.bfloat16}  # wo too: fp32 is kept for fp16 only


def test_t5_fp16_keeps_wo_in_fp32():
    model = T5EncoderModel.from_pretrained(str(DUMPS / "t5"), mindspore_dtype="fp16")
    dtypes = {name: p.dtype for name, p in model.state_dict().items()}
    assert {d for n, d in dtypes.items() if n.endswith("DenseReluDense.wo.weight")} == {ms.float32}
    assert {d for n, d in dtypes.items() if not n.endswith("DenseReluDense.wo.weight")} == {ms.float16}
    assert model.dtype == ms.float16


def test_fp16_clamp_follows_transformers():
    # transformers clamps fp16 residuals to finfo.max, or finfo.max - 1000 once one is inf
    top = float(np.finfo(np.float16).max)
    finite = ms.Tensor(np.array([1.0, top, -top], np.float16))
    np.testing.assert_array_equal(_clamp_fp16(finite).asnumpy(), finite.asnumpy())
    overflowed = _clamp_fp16(ms.Tensor(np.array([1.0, np.inf, -np.inf, top], np.float16))).asnumpy()
    margin = np.float16(top - 1000)
    np.testing.assert_array_equal(overflowed, np.array([1.0, margin, -margin, margin], np.float16))
    fp32 = ms.Tensor(np.array([np.inf], np.float32))
    assert np.isinf(_clamp_fp16(fp32).asnumpy()).all()


def test_t5_sharded_checkpoint_loads(t5):
    sharded = T5EncoderModel.from_pretrained(str(DUMPS / "t5_sharded"))
    assert len(json.loads((DUMPS / "t5_sharded" / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    for name, param in t5.state_dict().items():
        np.testing.assert_array_equal(sharded.state_dict()[name].asnumpy(), param.asnumpy(), err_msg=name)


@pytest.mark.parametrize("keys", [["encoder.embed_tokens.weight"], ["shared.weight", "encoder.embed_tokens.weight"]])
def test_t5_tied_embedding_loads_from_either_key(t5, tmp_path, keys):
    folder = tmp_path / "t5"
    shutil.copytree(DUMPS / "t5", folder)
    st = SafetensorsFile(str(folder / "model.safetensors"))
    tensors = {k: st.get(k) for k in st.keys()}  # name -> (array, dtype)
    table = tensors.pop("shared.weight")
    tensors.update({k: table for k in keys})
    save_file(tensors, str(folder / "model.safetensors"))
    model = T5EncoderModel.from_pretrained(str(folder))
    assert model.encoder.embed_tokens.weight is model.shared.weight
    np.testing.assert_array_equal(model.shared.weight.asnumpy(), t5.shared.weight.asnumpy())


def test_gradient_checkpointing_and_input_embeddings():
    model = T5EncoderModel.from_pretrained(str(DUMPS / "t5_relu"))
    model.enable_gradient_checkpointing()
    assert model.get_input_embeddings() is model.shared
    clip = CLIPTextModel.from_pretrained(str(DUMPS / "clip_eos"))
    clip.enable_gradient_checkpointing()
    assert clip.get_input_embeddings() is clip.text_model.embeddings.token_embedding


# ---- folders, configs, saving ---------------------------------------------------------------
def test_mindflux_saved_folders_load_in_transformers(cases, tmp_path):
    # The fixtures were written by mindflux and read by transformers (make_dumps' mindspore + torch
    # stages). Writing them again must give the same bytes, so the check is about today's writer.
    CLIPTextModel.from_pretrained(str(DUMPS / "clip_eos")).save_pretrained(str(tmp_path / "clip"))
    model = T5EncoderModel.from_pretrained(str(DUMPS / "t5"))
    model.to("bf16").save_pretrained(str(tmp_path / "t5"), max_shard_size="20KB")
    torch_outputs = load_cases(DUMPS / "mindflux_saved.safetensors")
    for ours, name in ((tmp_path / "clip", "mindflux_saved_clip"), (tmp_path / "t5", "mindflux_saved_t5_bf16")):
        saved = DUMPS / name
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in saved.iterdir())
        for path in saved.iterdir():
            assert (ours / path.name).read_bytes() == path.read_bytes(), path
    config = json.loads((DUMPS / "mindflux_saved_t5_bf16" / "config.json").read_text())
    assert config["architectures"] == ["T5EncoderModel"] and config["model_type"] == "t5"
    assert config["torch_dtype"] == "bfloat16" and config["dense_act_fn"] == "gelu_new"
    clip = CLIPTextModel.from_pretrained(str(DUMPS / "mindflux_saved_clip"))
    out = clip(ids(cases, "clip_eos.input_ids"))
    assert_close(out.last_hidden_state, torch_outputs["clip.last_hidden_state"])
    assert_close(out.pooler_output, torch_outputs["clip.pooler_output"])
    t5 = T5EncoderModel.from_pretrained(str(DUMPS / "mindflux_saved_t5_bf16"))
    assert_close(t5(ids(cases, "t5.input_ids")).last_hidden_state, torch_outputs["t5.last_hidden_state"])


def test_transformers_configs_load_quietly_but_unknown_keys_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        CLIPTextModel.from_pretrained(str(DUMPS / "clip"))
        T5EncoderModel.from_pretrained(str(DUMPS / "t5"))
    assert "ignores config keys" not in caplog.text  # architectures, dtype, bos/pad ids, projection_dim, ...
    folder = shutil.copytree(DUMPS / "t5_relu", tmp_path / "t5")
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = 10000.0
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        T5EncoderModel.from_pretrained(str(folder))
    assert "rope_theta" in caplog.text


@pytest.mark.parametrize("model_cls, source, edit, found", [
    (CLIPTextModel, "clip_eos", {"architectures": ["T5EncoderModel"]}, "T5EncoderModel"),
    (T5EncoderModel, "t5_relu", {"architectures": ["CLIPTextModel"]}, "CLIPTextModel"),
    (T5EncoderModel, "t5_relu", {"architectures": ["T5ForConditionalGeneration"]}, "T5ForConditionalGeneration"),
    (T5EncoderModel, "t5_relu", {"architectures": None, "model_type": "umt5"}, "umt5"),
])
def test_folder_of_another_architecture_is_refused(tmp_path, model_cls, source, edit, found):
    folder = shutil.copytree(DUMPS / source, tmp_path / "wrong_folder")
    config = json.loads((folder / "config.json").read_text())
    config.update(edit)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"wrong_folder.*{found}.*not a {model_cls.__name__}"):
        model_cls.from_pretrained(str(folder))


def test_diffusers_folder_is_refused():
    with pytest.raises(ValueError, match=r"flux_dev.*FluxTransformer2DModel.*not a CLIPTextModel"):
        CLIPTextModel.from_pretrained(str(FIXTURES / "transformer" / "flux_dev"))
    with pytest.raises(ValueError, match=r"clip_eos.*CLIPTextModel.*not a FluxTransformer2DModel"):
        FluxTransformer2DModel.from_pretrained(str(DUMPS / "clip_eos"))


def test_position_ids_buffer_of_old_checkpoints_is_ignored(tmp_path):
    folder = shutil.copytree(DUMPS / "clip_eos", tmp_path / "clip")
    st = SafetensorsFile(str(folder / "model.safetensors"))
    tensors = {k: st.get(k) for k in st.keys()}  # name -> (array, dtype)
    tensors["text_model.embeddings.position_ids"] = (np.arange(16, dtype=np.int64)[None], "I64")
    save_file(tensors, str(folder / "model.safetensors"))
    CLIPTextModel.from_pretrained(str(folder))


# ---- graph mode (one compile per encoder) ---------------------------------------------------
def test_clip_graph_mode_matches_transformers(clip, cases, graph_mode):
    out = clip(ids(cases, "clip.input_ids"))
    assert_close(out.last_hidden_state, cases["clip.last_hidden_state"])
    assert_close(out.pooler_output, cases["clip.pooler_output"])


def test_t5_graph_mode_matches_transformers(t5, cases, graph_mode):
    assert_close(t5(ids(cases, "t5.input_ids")).last_hidden_state, cases["t5.last_hidden_state"])
