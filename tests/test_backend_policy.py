"""The device policy table, its messages, and models following it (mindflux.backend)."""

from __future__ import annotations

import logging

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor

from mindflux import FluxTransformer2DModel, device
from mindflux.backend import force_device, policy, policy_for
from mindflux.backend.memory import check_fits, estimate_transformer_gib, transformer_parameters
from mindflux.modeling_utils import cast_parameter
from mindflux.training.precision import resolve_mixed_precision
from tests.tiny_flux import TRANSFORMER_CONFIG


@pytest.mark.parametrize("device_name, soc, dtypes, default, flash, rope_fp64", [
    ("CPU", "", ("fp32",), "fp32", False, True),
    ("GPU", "", ("fp32", "fp16"), "fp16", False, True),
    ("Ascend", "Ascend910B1", ("fp32", "bf16", "fp16"), "bf16", True, False),
    ("Ascend", "Ascend910_9391", ("fp32", "bf16", "fp16"), "bf16", True, False),
    ("Ascend", "Ascend910A", ("fp32", "fp16"), "fp16", False, False),
    ("Ascend", "Ascend310P3", ("fp32", "fp16"), "fp16", False, False),
])
def test_policy_table(device_name, soc, dtypes, default, flash, rope_fp64):
    p = policy_for(device_name, soc)
    assert (p.dtypes, p.default_dtype, p.flash_attention, p.rope_fp64) == (dtypes, default, flash, rope_fp64)
    assert p.attention_backend(ms.bfloat16) == ("flash" if flash else "math")
    assert p.attention_backend(ms.float32) == "math"  # the fused kernel takes fp16/bf16 only
    assert p.plain_layer_norm == (device_name == "CPU")


@pytest.mark.parametrize("device_name, soc, dtype, why", [
    ("GPU", "", "bf16", "GPU BiasAdd and LayerNorm have no bf16 kernels"),
    ("Ascend", "Ascend910A", "bf16", "910A's matmul has no bf16"),
    ("CPU", "", "fp16", "needs a GPU or Ascend device"),
])
def test_unsupported_dtypes_are_refused_with_the_reason(device_name, soc, dtype, why):
    with pytest.raises(ValueError, match=why) as info:
        policy_for(device_name, soc).check_dtype(dtype, "--dtype")
    assert str(info.value).startswith(f"--dtype {dtype} cannot run on ")


@pytest.mark.parametrize("device_name, soc, default", [("CPU", "", "no"), ("GPU", "", "fp16"),
                                                       ("Ascend", "Ascend910B2", "bf16"),
                                                       ("Ascend", "Ascend910A", "fp16")])
def test_mixed_precision_defaults_to_the_device_dtype(device_name, soc, default):
    with force_device(device_name, soc):
        assert resolve_mixed_precision(None) == default
        assert resolve_mixed_precision("no") == "no"


def test_a_missing_device_names_what_to_install(monkeypatch, caplog):
    monkeypatch.setattr(device, "_plugin_available", lambda name: False)
    monkeypatch.setattr(device, "_hardware_present", lambda name: None)
    with pytest.raises(device.DeviceNotAvailableError, match="install the Ascend driver and CANN"):
        device.resolve_device("ascend")
    with pytest.raises(OSError, match="CUDA 11.1 or 11.6"):  # the scripts print OSErrors in one line
        device.set_device("gpu")
    # auto with an NVIDIA driver whose CUDA MindSpore cannot use: the CPU, but not without a word
    monkeypatch.setattr(device, "_hardware_present", lambda name: "/proc/driver/nvidia/version" if name == "GPU"
                        else None)
    with caplog.at_level(logging.WARNING, logger="mindflux.device"):
        assert device.resolve_device("auto") == "CPU"
    assert "GPU driver is present (/proc/driver/nvidia/version) but MindSpore" in caplog.text


def test_gpus_newer_than_the_wheels_cuda_are_named():
    assert device.gpu_support_warning((8, 0), "A100") is None and device.gpu_support_warning((8, 6)) is None
    assert "H200 is sm_90" in device.gpu_support_warning((9, 0), "H200")
    assert "CUDA >= 11.8" in device.gpu_support_warning((8, 9), "L4")


def test_models_follow_the_policy_and_set_attention_backend():
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    attn = transformer.transformer_blocks[0].attn
    with pytest.raises(ValueError, match="exists on Atlas A2"):
        transformer.set_attention_backend("flash")  # never where the kernel does not exist
    with force_device("Ascend", "Ascend910A"):
        assert attn.backend == "math" and transformer.pos_embed.freqs.dtype == ms.float32
    with force_device("Ascend", "Ascend910B3"):
        assert attn.backend == "flash"
        transformer.set_attention_backend("native")  # diffusers' name for the math path
        assert attn.backend == "math"
        transformer.reset_attention_backend()
        assert attn.backend == "flash"
        transformer.set_attention_backend("_native_npu")
    assert attn.backend == "math" and policy().device == "CPU"  # back on the CPU: the pinned flash cannot run


def test_to_casts_values_and_uninitialised_parameters():
    param = Parameter(Tensor(np.array([1.0, 1.0051, 3.3], np.float32)), name="w")
    cast_parameter(param, ms.bfloat16)
    assert param.dtype == ms.bfloat16
    np.testing.assert_array_equal(param.astype(ms.float32).asnumpy(), [1.0, 1.0078125, 3.296875])
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():
        model = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    model.to(ms.float16)  # no data yet: only the dtype changes, nothing is initialised randomly
    assert {p.dtype for p in model.get_parameters()} == {ms.float16}
    assert all(p.has_init for p in model.get_parameters())


def test_fp32_that_cannot_fit_is_refused_with_the_estimate():
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():
        tiny = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    assert transformer_parameters(TRANSFORMER_CONFIG) == tiny.num_parameters()
    dev = {"guidance_embeds": True}  # FLUX.1-dev: 11.9 B parameters, 44.3 GiB of fp32 weights
    assert transformer_parameters(dev) == 11_901_408_320
    seq = 64 * 64 + 512  # 1024 x 1024 pixels and 512 T5 tokens
    with pytest.raises(ValueError, match=r"needs at least 48\.1 GiB .* the card has 40\.0 GiB\. Use bf16 or fp16"):
        check_fits(dev, "fp32", seq, "--dtype", available_gib=40.0)
    check_fits(dev, "bf16", seq, "--dtype", available_gib=40.0)
    assert estimate_transformer_gib(dev, "bf16", seq, flash_attention=True) == pytest.approx(22.17, abs=0.01)


def test_set_device_reapplies_the_policy_to_models_built_before(monkeypatch):
    """A model built before set_device("ascend") takes Ascend's choices (MindSpore's device faked: no card here)."""
    import importlib

    import mindflux

    policy_module = importlib.import_module("mindflux.backend.policy")  # the package's `policy` is the function

    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    attn = transformer.single_transformer_blocks[0].attn
    assert attn.backend == "math" and transformer.pos_embed.freqs.dtype == ms.float64
    monkeypatch.setattr(policy_module, "get_device", lambda: "Ascend")
    monkeypatch.setattr(policy_module, "read_soc_version", lambda: "Ascend910B4")
    mindflux.set_device("cpu", "pynative")  # what MindSpore runs on is faked above; set_device tells the models
    assert attn.backend == "flash" and transformer.pos_embed.freqs.dtype == ms.float32
    assert not transformer.transformer_blocks[0].norm2.use_plain
    monkeypatch.undo()
    mindflux.set_device("cpu", "pynative")
    assert attn.backend == "math" and transformer.transformer_blocks[0].norm2.use_plain
