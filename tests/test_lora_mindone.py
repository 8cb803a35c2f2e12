"""Optional: a LoRA file written by mindone 0.5.0 (MindSpore's diffusers port) loads in mindflux with identical tensors.

Skipped when mindone is not installed (`pip install -e .[mindone]`). mindone runs in a subprocess: its
import takes seconds and pulls in most of transformers' model zoo.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mindflux.safetensors_io import SafetensorsFile, load_file
from tests.lora_utils import BASE, StandInPipeline

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mindone") is None, reason="mindone is not installed")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "proj_mlp", "norm_out.linear"]

# Runs under mindone: FluxTransformer2DModel + add_adapter (mindone.peft) + FluxPipeline.save_lora_weights,
# and the adapter's parameters as mindone holds them in memory, for comparison.
SCRIPT = textwrap.dedent("""
    import importlib.util, sys
    import transformers.utils.import_utils as import_utils
    if importlib.util.find_spec("torchvision") is None:
        import_utils._timm_available = False  # an installed timm cannot import without torchvision
    import mindspore as ms
    import numpy as np
    from mindone.diffusers import FluxPipeline, FluxTransformer2DModel
    from mindone.peft import LoraConfig
    from mindone.peft.utils import get_peft_model_state_dict
    from mindflux.safetensors_io import save_file

    base, out, targets = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    ms.set_seed(0)
    model = FluxTransformer2DModel.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={"to_k": 2}, init_lora_weights=False)
    model.add_adapter(config, "default")
    state = get_peft_model_state_dict(model)
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    save_file({k: (v.asnumpy(), "F32") for k, v in state.items()}, out + "/in_memory.safetensors")
""")


@pytest.fixture(scope="module")
def mindone_lora(tmp_path_factory):
    out = tmp_path_factory.mktemp("mindone")
    # USE_TORCH=0: transformers (imported by mindone) would otherwise import torch where it is installed
    env = dict(os.environ, USE_TORCH="0", GLOG_v="3", PYTHONPATH=os.getcwd())
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(BASE), str(out), ",".join(TARGETS)],
                            capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
        if "ModuleNotFoundError" in result.stderr or "ImportError" in result.stderr:
            pytest.skip(f"mindone is installed but cannot be imported: {tail[0]}")
        pytest.fail(f"mindone failed to write a LoRA:\n{result.stderr[-3000:]}")
    return out


def test_mindone_lora_loads_with_identical_tensors(mindone_lora):
    path = mindone_lora / "pytorch_lora_weights.safetensors"
    in_memory = load_file(str(mindone_lora / "in_memory.safetensors"))
    assert any(np.any(v != 0) for k, v in in_memory.items() if ".lora_B." in k)  # init_lora_weights=False: B random
    pipe = StandInPipeline()
    pipe.load_lora_weights(str(mindone_lora), adapter_name="mindone")
    loaded = pipe.transformer.get_adapter_state_dict("mindone")
    assert loaded.keys() == in_memory.keys()
    for key, value in in_memory.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    saved = json.loads(SafetensorsFile(str(path)).metadata["lora_adapter_metadata"])
    config = pipe.transformer.peft_config["mindone"]
    assert (config.r, config.lora_alpha, config.rank_pattern) == \
        (saved["transformer.r"], saved["transformer.lora_alpha"], saved["transformer.rank_pattern"])
    layers = dict(pipe.transformer.lora_layers())
    assert layers["transformer_blocks.0.attn.to_k"].adapter_config["mindone"].r == 2
    assert layers["transformer_blocks.0.attn.to_q"].adapter_config["mindone"].scaling == 2.0
