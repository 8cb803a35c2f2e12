"""Helpers of the LoRA tests: a stand-in pipeline and the dumps of tests/parity/dump_lora.py."""

from __future__ import annotations

import mindspore as ms
import numpy as np

from mindflux import FluxTransformer2DModel
from mindflux.lora import FluxLoraLoaderMixin
from mindflux.models.clip import CLIPTextModel
from tests.conftest import FIXTURES, load_cases, tensors
from tests.parity.dump_lora import mindspore_probes

LORA = FIXTURES / "lora"
BASE = FIXTURES / "transformer" / "flux_dev"
CLIP = FIXTURES / "text_encoders" / "clip"


class StandInPipeline(FluxLoraLoaderMixin):
    """What FluxPipeline is to the LoRA API: an object with .transformer and .text_encoder."""

    def __init__(self, transformer=None, text_encoder=None):
        self.transformer = transformer if transformer is not None else FluxTransformer2DModel.from_pretrained(str(BASE))
        self.text_encoder = text_encoder


def clip() -> CLIPTextModel:
    return CLIPTextModel.from_pretrained(str(CLIP))


def clip_outputs(text_encoder, refs: dict) -> dict[str, np.ndarray]:
    out = text_encoder(ms.Tensor(refs["clip_input_ids"]))
    return {"last_hidden_state": out.last_hidden_state.asnumpy(), "pooler_output": out.pooler_output.asnumpy()}


def references() -> dict[str, np.ndarray]:
    refs = load_cases(LORA / "cases.safetensors")
    refs.update(load_cases(LORA / "mindflux_files.safetensors"))
    return refs


def inputs(refs: dict) -> dict:
    return tensors({k[len("input."):]: v for k, v in refs.items() if k.startswith("input.")})


def probe_inputs(refs: dict) -> dict[int, np.ndarray]:
    return {int(k.rsplit(".", 1)[1]): v for k, v in refs.items() if k.startswith("probe_input.")}


def probe_error(model, refs: dict, case: str, kind: str = "probe") -> float:
    """Largest difference between mindflux's and diffusers' LoRA terms over every adapted layer.

    A layer diffusers adapted with zeros (a zero block of a fused file) may be absent in mindflux.
    """
    prefix = f"{case}.{kind}."
    expected = {k[len(prefix):]: v for k, v in refs.items() if k.startswith(prefix)}
    assert expected, case
    mine = mindspore_probes(model, probe_inputs(refs))
    extra = sorted(set(mine) - set(expected))
    assert not extra, f"mindflux adapts layers diffusers does not: {extra}"
    error = 0.0
    for module, value in expected.items():
        got = mine.get(module, np.zeros_like(value))
        error = max(error, float(np.abs(got.astype(np.float64) - value).max()))
    return error
