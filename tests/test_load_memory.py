"""from_pretrained holds one copy of the weights, not two: each tensor goes from the memory-mapped file
into its parameter and its file pages leave the process's resident memory (issue 16, section 2).
Measured on a 544 MB checkpoint: peak RSS grew by 1037 MB while loading before, 573 MB after."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from mindflux import FluxTransformer2DModel

ROOT = Path(__file__).resolve().parents[1]

CONFIG = dict(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=6,
              joint_attention_dim=1024, pooled_projection_dim=256)
# The load runs in a fresh process, so that its peak RSS is the loading's.
CHILD = textwrap.dedent("""
    import resource, sys
    import mindflux
    from mindflux import FluxTransformer2DModel

    mindflux.set_device("cpu", "pynative")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = FluxTransformer2DModel.from_pretrained(sys.argv[1])
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
""")


def test_loading_peaks_near_one_copy_of_the_weights(tmp_path):
    FluxTransformer2DModel(**CONFIG).save_pretrained(str(tmp_path))
    weights = (tmp_path / "diffusion_pytorch_model.safetensors").stat().st_size
    assert weights > 100e6
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown = int(proc.stdout.strip().splitlines()[-1])
    # two copies (file pages + parameters) would be 2x; allow MindSpore's own allocations on top of one
    assert grown < 1.35 * weights, (grown / 1e6, weights / 1e6)
