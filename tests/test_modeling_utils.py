"""ModelMixin / ConfigMixin: config.json rules, safetensors loading errors, saving, casting."""

import json
import logging
import shutil

import mindspore as ms
import numpy as np
import pytest

from mindflux import FluxTransformer2DModel, WeightsLoadingError
from mindflux.modeling_utils import parse_size
from mindflux.safetensors_io import SafetensorsError, SafetensorsFile, bf16_bits_to_float32, float32_to_bf16_bits
from tests.conftest import FIXTURES

TINY = dict(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=[2, 2, 4])
DEV = FIXTURES / "transformer" / "flux_dev"


def copy_dev(tmp_path):
    return shutil.copytree(DEV, tmp_path / "model")


def test_config_roundtrip_and_bookkeeping_keys(tmp_path):
    model = FluxTransformer2DModel(**TINY)
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "FluxTransformer2DModel" and "_diffusers_version" in saved
    assert saved["axes_dims_rope"] == [2, 2, 4]
    again = FluxTransformer2DModel.from_pretrained(str(tmp_path))
    assert dict(again.config) == dict(model.config)
    for name, param in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name].asnumpy(), param.asnumpy())


def test_unknown_config_keys_warn(tmp_path, caplog):
    folder = copy_dev(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["made_up_option"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        FluxTransformer2DModel.from_pretrained(str(folder))
    assert "made_up_option" in caplog.text


def test_config_of_another_architecture_is_refused(tmp_path):
    folder = copy_dev(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = "AutoencoderKL"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.*AutoencoderKL"):
        FluxTransformer2DModel.from_pretrained(str(folder))


def test_missing_unexpected_and_misshapen_keys_are_listed_together(tmp_path):
    folder = copy_dev(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(num_single_layers=3, pooled_projection_dim=20)  # one block more, one shape off
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsLoadingError) as err:
        FluxTransformer2DModel.from_pretrained(str(folder))
    text = str(err.value)
    assert "missing" in text and "single_transformer_blocks.2.proj_out.weight" in text
    assert "shape mismatch" in text and "time_text_embed.text_embedder.linear_1.weight" in text
    config.update(num_single_layers=1, pooled_projection_dim=24)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsLoadingError, match=r"unexpected \(\d+\):.*single_transformer_blocks\.1\."):
        FluxTransformer2DModel.from_pretrained(str(folder))


def test_truncated_and_foreign_weight_files_name_the_file(tmp_path):
    folder = copy_dev(tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match=r"diffusion_pytorch_model\.safetensors.*truncated"):
        FluxTransformer2DModel.from_pretrained(str(folder))
    weights.write_bytes(b"PK\x03\x04 this is a pickle zip, not safetensors")
    with pytest.raises(SafetensorsError, match=r"diffusion_pytorch_model\.safetensors is not a readable"):
        FluxTransformer2DModel.from_pretrained(str(folder))
    weights.unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.bin"):
        FluxTransformer2DModel.from_pretrained(str(folder))


def test_sharded_save_roundtrip(tmp_path):
    model = FluxTransformer2DModel(**TINY).to("bf16")
    model.save_pretrained(str(tmp_path), max_shard_size="10KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    first = SafetensorsFile(str(tmp_path / shards[0]))
    assert {first.dtype(k) for k in first.keys()} == {"BF16"}
    again = FluxTransformer2DModel.from_pretrained(str(tmp_path), mindspore_dtype="bf16")
    for name, param in model.state_dict().items():
        other = again.state_dict()[name]
        assert other.dtype == ms.bfloat16
        np.testing.assert_array_equal(other.astype(ms.float32).asnumpy(), param.astype(ms.float32).asnumpy())


def test_to_casts_in_place():
    model = FluxTransformer2DModel(**TINY)
    before = model.x_embedder.weight.asnumpy()
    same = model.to(ms.float16)
    assert same is model and model.dtype == ms.float16
    assert {p.dtype for p in model.state_dict().values()} == {ms.float16}
    np.testing.assert_allclose(model.x_embedder.weight.astype(ms.float32).asnumpy(), before, rtol=1e-3, atol=1e-4)


def test_bf16_bits_round_to_nearest_even():
    values = np.array([1.0, 1.00390625, 1.01171875, -2.5e-3, 3.0e38, np.inf], np.float32)
    bits = float32_to_bf16_bits(values)
    # 1 + 2^-8 is halfway between bf16 neighbours and rounds to the even one (1.0)
    np.testing.assert_array_equal(bf16_bits_to_float32(bits)[:3], np.array([1.0, 1.0, 1.015625], np.float32))
    assert np.isinf(bf16_bits_to_float32(bits)[-1])
    via_mindspore = ms.Tensor(values).astype(ms.bfloat16).astype(ms.float32).asnumpy()
    np.testing.assert_array_equal(bf16_bits_to_float32(bits), via_mindspore)


def test_parse_size():
    assert parse_size("10GB") == 10 * 1000**3 and parse_size("5GiB") == 5 * 1024**3 and parse_size(12) == 12
    with pytest.raises(ValueError):
        parse_size("ten gigs")
