"""fp8 safetensors and GGUF transformer files against PyTorch (tests/parity/dump_sources.py).

fp8: diffusers' model on torch's upcast of the same fp8 values; GGUF: diffusers' GGUFQuantizationConfig
loading of the same file (fp32 compute); K-quant and gguf-only types: the gguf package's dequantiser.
"""

import sys

import numpy as np
import pytest

from mindflux import FluxTransformer2DModel
from mindflux.checkpoints import GGUFCheckpoint, SafetensorsCheckpoint, open_checkpoint
from tests.conftest import FIXTURES, load_cases, max_abs_diff, tensors

DUMPS = FIXTURES / "sources"
CONFIG = FIXTURES / "transformer" / "flux_dev"  # the tiny model's config.json: sizes the BFL shapes do not give
TOL = 1e-4


@pytest.fixture(scope="module")
def inputs():
    cases = load_cases(FIXTURES / "transformer" / "cases.safetensors", "flux_dev.input.")
    return tensors(cases)


@pytest.fixture(scope="module")
def refs():
    return load_cases(DUMPS / "cases.safetensors")


@pytest.mark.parametrize("name, file", [
    ("fp8_e4m3_bfl", "flux_dev_fp8_e4m3_bfl.safetensors"),
    ("fp8_scaled_bfl", "flux_dev_fp8_scaled_bfl.safetensors"),
])
def test_fp8_single_files_match_pytorch(name, file, inputs, refs):
    model = FluxTransformer2DModel.from_single_file(str(DUMPS / file), config=str(CONFIG))
    reference = refs[f"{name}.output"]
    assert np.abs(reference).mean() > 0.1
    assert max_abs_diff(model(**inputs).sample, reference) <= TOL


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "bf16"])
def test_gguf_files_match_diffusers(qtype, inputs, refs):
    model = FluxTransformer2DModel.from_single_file(str(DUMPS / f"flux_dev_{qtype}.gguf"), config=str(CONFIG))
    out = model(**inputs).sample
    # exact: diffusers' model on the gguf package's fp32 dequantisation (ggml's reference arithmetic)
    assert max_abs_diff(out, refs[f"{qtype}.output_fp32"]) <= TOL
    # diffusers' GGUFQuantizationConfig path rounds the dequantised weights to fp16 (scales times
    # quants in fp16): the same model within that rounding
    assert max_abs_diff(out, refs[f"{qtype}.output"]) <= 1e-3


def test_fp8_diffusers_folder_matches_pytorch(inputs, refs):
    model = FluxTransformer2DModel.from_pretrained(str(DUMPS / "flux_dev_fp8_e5m2"))
    assert max_abs_diff(model(**inputs).sample, refs["fp8_e5m2.output"]) <= TOL


def test_quantised_files_differ_from_the_original(inputs, refs):
    # the fixtures must be the quantised models, or the tests above would pass on any fp32 loader
    original = load_cases(FIXTURES / "transformer" / "cases.safetensors", "flux_dev.")["output"]
    for name in ("fp8_e4m3_bfl", "fp8_e5m2", "q4_0"):
        assert np.abs(refs[f"{name}.output"] - original).max() > 1e-3, name


def test_scaled_fp8_keys_are_read_as_weights():
    checkpoint = open_checkpoint(str(DUMPS / "flux_dev_fp8_scaled_bfl.safetensors"))
    assert isinstance(checkpoint, SafetensorsCheckpoint)
    keys = checkpoint.keys()
    assert not any(k.endswith((".scale_weight", ".scale_input", "scaled_fp8")) for k in keys)
    weight, dtype = checkpoint.get("model.diffusion_model.double_blocks.0.img_attn.qkv.weight")
    raw = checkpoint.st.get_float32("model.diffusion_model.double_blocks.0.img_attn.qkv.weight")
    scale = checkpoint.st.get_float32("model.diffusion_model.double_blocks.0.img_attn.qkv.scale_weight")
    assert dtype == "F32" and np.array_equal(weight, raw * scale) and float(scale) != 1.0


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0", "MXFP4"])
def test_quant_types_dequantise_like_the_reference(qtype, refs):
    checkpoint = open_checkpoint(str(DUMPS / "quants.gguf"))
    assert isinstance(checkpoint, GGUFCheckpoint) and checkpoint.quant_type(f"{qtype.lower()}.weight") == qtype
    values, dtype = checkpoint.get(f"{qtype.lower()}.weight")
    assert dtype == "F32" and values.shape == checkpoint.shape(f"{qtype.lower()}.weight") == (3, 512)
    np.testing.assert_array_equal(values, refs[f"quants.{qtype}"])
    if f"quants.{qtype}.diffusers" in refs:  # diffusers multiplies the fp16 scales in fp16
        diffusers_values = refs[f"quants.{qtype}.diffusers"]
        assert np.abs(values - diffusers_values).max() <= 2e-3 * np.abs(diffusers_values).max()


def test_missing_packages_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(ImportError, match="pip install ml_dtypes"):
        FluxTransformer2DModel.from_single_file(str(DUMPS / "flux_dev_fp8_e4m3_bfl.safetensors"), config=str(CONFIG))
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="pip install gguf"):
        FluxTransformer2DModel.from_single_file(str(DUMPS / "flux_dev_q8_0.gguf"), config=str(CONFIG))
