"""LoRA files between mindone 0.5.0 (MindSpore's diffusers port) and mindflux, both ways.

mindone is in the `test` extra, so CI runs this; without it (`pip install mindone==0.5.0`) the tests skip.
mindone runs in one subprocess: its import takes seconds and pulls in most of transformers' model zoo.

What is covered: mindone 0.5.0's FluxTransformer2DModel cannot run a forward pass on the CPU (its
timestep embedding calls mint.arange, which has no CPU kernel in MindSpore 2.7.1), so the transformer is
compared layer by layer: every adapted layer's ΔW = scaling x B @ A as mindone's own LoraLayer computes
it (get_delta_weight) against mindflux's. mindone's CLIPTextModel does run on the CPU: with a mindflux
text-encoder LoRA loaded by mindone, its outputs are compared with mindflux's CLIP with the same file.
  mindone -> mindflux: mindone's add_adapter + FluxPipeline.save_lora_weights; mindflux loads the file with
                       identical tensors, config, and every layer's ΔW equal to mindone's
  mindflux -> mindone: mindflux's save_lora_weights (transformer + CLIP); mindone's FluxPipeline.
                       load_lora_weights reads it; ΔW of every layer and CLIP's outputs equal mindflux's
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import mindspore as ms
import numpy as np
import pytest

from mindflux.lora import FluxLoraLoaderMixin, get_peft_model_state_dict
from mindflux.safetensors_io import SafetensorsFile, load_file
from tests.lora_utils import BASE, CLIP, StandInPipeline, clip
from tests.parity.dump_lora import add_mindflux_adapter, add_mindflux_te_adapter

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mindone") is None, reason="mindone is not installed")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "proj_mlp", "norm_out.linear"]
INPUT_IDS = np.array([[49406, 320, 1125, 533, 2368, 49407, 49407, 49407]], np.int64)

SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    import transformers.utils.import_utils as import_utils
    if importlib.util.find_spec("torchvision") is None:
        import_utils._timm_available = False  # an installed timm cannot import without torchvision
    import mindspore as ms
    import numpy as np
    from mindone.diffusers import FluxPipeline, FluxTransformer2DModel
    from mindone.peft import LoraConfig
    from mindone.peft.tuners.lora import LoraLayer
    from mindone.peft.utils import get_peft_model_state_dict
    from mindone.transformers import CLIPTextModel
    from mindflux.safetensors_io import save_file

    base, clip_path, out, targets, mindflux_file, input_ids = sys.argv[1:7]

    def deltas(model, adapter):  # ΔW = scaling x B @ A of every adapted layer, as mindone's peft computes it
        return {name: (layer.get_delta_weight(adapter).asnumpy(), "F32") for name, layer in model.cells_and_names()
                if isinstance(layer, LoraLayer) and adapter in layer.lora_A}

    # mindone -> mindflux: an adapter made and saved by mindone
    ms.set_seed(0)
    model = FluxTransformer2DModel.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets.split(","), rank_pattern={"to_k": 2},
                        init_lora_weights=False)
    model.add_adapter(config, "default")
    state = get_peft_model_state_dict(model)
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    save_file({k: (v.asnumpy(), "F32") for k, v in state.items()}, out + "/in_memory.safetensors")
    save_file(deltas(model, "default"), out + "/mindone_deltas.safetensors")

    # mindflux -> mindone: mindflux's file loaded by mindone's pipeline loader
    transformer = FluxTransformer2DModel.from_pretrained(base)
    text_encoder = CLIPTextModel.from_pretrained(clip_path)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.load_lora_weights(mindflux_file, adapter_name="mf")
    save_file({**deltas(transformer, "mf"), **{"text_encoder." + k: v for k, v in deltas(text_encoder, "mf").items()}},
              out + "/mindflux_in_mindone_deltas.safetensors")
    ids = ms.Tensor(np.array(json.loads(input_ids), np.int64))
    outputs = text_encoder(ids)
    save_file({"last_hidden_state": (outputs[0].asnumpy(), "F32"), "pooler_output": (outputs[1].asnumpy(), "F32")},
              out + "/mindone_clip.safetensors")
""")


def mindflux_deltas(model, adapter: str) -> dict[str, np.ndarray]:
    return {name: layer.delta_weight(adapter) * layer.adapter_config[adapter].scaling
            for name, layer in model.lora_layers() if adapter in layer.adapter_config}


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    out = tmp_path_factory.mktemp("mindone")
    pipe = StandInPipeline(text_encoder=clip())
    add_mindflux_adapter(pipe.transformer)
    add_mindflux_te_adapter(pipe.text_encoder)
    FluxLoraLoaderMixin.save_lora_weights(
        str(out / "mindflux"), transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, "mf"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, "mf"),
        transformer_lora_adapter_metadata=pipe.transformer.peft_config["mf"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["mf"].to_dict())
    # USE_TORCH=0: transformers (imported by mindone) would otherwise import torch where it is installed
    env = dict(os.environ, USE_TORCH="0", GLOG_v="3", PYTHONPATH=os.getcwd())
    command = [sys.executable, "-c", SCRIPT, str(BASE), str(CLIP), str(out), ",".join(TARGETS),
               str(out / "mindflux" / "pytorch_lora_weights.safetensors"), json.dumps(INPUT_IDS.tolist())]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"mindone failed:\n{result.stderr[-3000:]}")
    return out, pipe


def test_mindone_lora_loads_in_mindflux(exchange):
    out, _ = exchange
    in_memory = load_file(str(out / "in_memory.safetensors"))
    assert any(np.any(v != 0) for k, v in in_memory.items() if ".lora_B." in k)  # init_lora_weights=False: B random
    pipe = StandInPipeline()
    pipe.load_lora_weights(str(out), adapter_name="mindone")
    loaded = pipe.transformer.get_adapter_state_dict("mindone")
    assert loaded.keys() == in_memory.keys()
    for key, value in in_memory.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    saved = json.loads(SafetensorsFile(str(out / "pytorch_lora_weights.safetensors")).metadata["lora_adapter_metadata"])
    config = pipe.transformer.peft_config["mindone"]
    assert (config.r, config.lora_alpha, config.rank_pattern) == \
        (saved["transformer.r"], saved["transformer.lora_alpha"], saved["transformer.rank_pattern"])
    theirs = load_file(str(out / "mindone_deltas.safetensors"))
    ours = mindflux_deltas(pipe.transformer, "mindone")
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name, value in theirs.items():  # scaling 2 (alpha 8 / r 4), 4 where to_k has r=2
        np.testing.assert_allclose(ours[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


def test_mindflux_lora_loads_in_mindone(exchange):
    out, pipe = exchange
    theirs = load_file(str(out / "mindflux_in_mindone_deltas.safetensors"))
    ours = mindflux_deltas(pipe.transformer, "mf")
    ours.update({"text_encoder." + k: v for k, v in mindflux_deltas(pipe.text_encoder, "mf").items()})
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
    mindone_clip = load_file(str(out / "mindone_clip.safetensors"))
    mine = pipe.text_encoder(ms.Tensor(INPUT_IDS))
    plain = clip()(ms.Tensor(INPUT_IDS)).last_hidden_state.asnumpy()
    assert np.abs(mindone_clip["last_hidden_state"] - plain).max() > 1e-2  # the LoRA is applied in mindone
    np.testing.assert_allclose(mine.last_hidden_state.asnumpy(), mindone_clip["last_hidden_state"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(mine.pooler_output.asnumpy(), mindone_clip["pooler_output"], rtol=0, atol=1e-4)
