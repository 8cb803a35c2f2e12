"""The mixture, fal/ostris Kontext and LyCORIS (LoKr, LoHa) formats against PyTorch
(tests/parity/dump_lora_formats.py), DoRA refused, unknown keys listed in full."""

import sys
from pathlib import Path

import numpy as np
import pytest

from mindflux.lora import FluxLoraLoaderMixin, LoraFormatError, LoraKeyError, detect_format
from mindflux.safetensors_io import load_file, save_file
from tests.conftest import FIXTURES, load_cases, max_abs_diff, tensors
from tests.lora_utils import StandInPipeline

DUMPS = FIXTURES / "lora_formats"
TOL = 1e-4


@pytest.fixture(scope="module")
def inputs():
    return tensors(load_cases(FIXTURES / "transformer" / "cases.safetensors", "flux_dev.input."))


@pytest.fixture(scope="module")
def refs():
    return load_cases(DUMPS / "cases.safetensors")


@pytest.mark.parametrize("name, expected_format", [
    ("mixture", "mixture"), ("fal", "fal"), ("lokr", "lycoris"), ("loha", "lycoris"),
])
def test_formats_match_pytorch(name, expected_format, inputs, refs):
    path = DUMPS / f"{name}.safetensors"
    assert detect_format(load_file(str(path))) == expected_format
    pipe = StandInPipeline()
    plain = pipe.transformer(**inputs).sample.asnumpy()
    pipe.load_lora_weights(str(path), adapter_name=name)
    out = pipe.transformer(**inputs).sample
    reference = refs[f"{name}.output"]
    assert np.abs(reference - plain).max() > 1e-2  # the LoRA changes the output
    assert max_abs_diff(out, reference) <= TOL


def test_lycoris_is_merged_and_restored():
    pipe = StandInPipeline()
    params = pipe.transformer.state_dict()
    original = {k: p.asnumpy().copy() for k, p in params.items()}
    pipe.load_lora_weights(str(DUMPS / "lokr.safetensors"), adapter_name="kr")
    assert pipe.get_list_adapters() == {"transformer": ["kr"]}
    state = load_file(str(DUMPS / "lokr.safetensors"))
    # to_q's LoKr: full w1 and w2, so alpha is ignored (scale 1): ΔW = kron(w1, w2)
    key = "lycoris_transformer_blocks_0_attn_to_q"
    w1, w2 = state[f"{key}.lokr_w1"], state[f"{key}.lokr_w2"]
    np.testing.assert_allclose(params["transformer_blocks.0.attn.to_q.weight"].asnumpy(),
                               original["transformer_blocks.0.attn.to_q.weight"] + np.kron(w1, w2), rtol=0, atol=1e-6)
    with pytest.raises(LoraFormatError, match="load_lora_weights"):
        pipe.lora_state_dict(str(DUMPS / "lokr.safetensors"))
    pipe.delete_adapters("kr")
    for key, value in original.items():
        np.testing.assert_array_equal(params[key].asnumpy(), value, err_msg=key)


def test_dora_is_refused_even_when_not_strict():
    state = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((2, 32), np.float32),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((32, 2), np.float32),
             "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": np.ones(32, np.float32)}
    pipe = StandInPipeline()
    for strict in (True, False):
        with pytest.raises(LoraKeyError, match="DoRA .* is not supported.*nothing is loaded"):
            pipe.load_lora_weights(state, strict=strict)
    assert not getattr(pipe.transformer, "peft_config", None)


def test_lycoris_shape_errors_name_the_module():
    state = {"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": np.ones((4, 4), np.float32),
             "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": np.ones((8, 4), np.float32)}
    with pytest.raises(ValueError, match="lycoris_transformer_blocks_0_attn_to_q .*shape \\(32, 16\\).*\\(32, 32\\)"):
        StandInPipeline().load_lora_weights(state)
    assert FluxLoraLoaderMixin  # the class the stand-in pipeline mixes in


def test_generate_lists_every_unloadable_key(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))
    import generate

    bad = {f"lora_unet_double_blocks_0_bogus_{i}.lora_down.weight": np.zeros((2, 32), np.float32) for i in range(3)}
    path = tmp_path / "bad.safetensors"
    save_file({k: (v, "F32") for k, v in bad.items()}, str(path))
    model = FIXTURES / "pipeline" / "tiny_flux"
    rc = generate.main(["--model", str(model), "--device", "cpu", "--mode", "pynative", "--prompt", "x",
                        "--lora", str(path), "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and all(key in err for key in bad), err
    assert len(err.strip().splitlines()) == 1  # the whole list, folded into generate.py's one error line
