"""A graph-mode forward on the CPU grows the process by its activations, not by kernel index tables.

MindSpore 2.7.1's CPU broadcasting and Transpose kernels keep per-element index tables for a compiled graph's
life, and a graph runs independent chunks in any order (backend.layout). On this model (1 double + 1 single
block, 6 heads of 128, 4096 image + 64 text tokens, 12.8 MB per (tokens, dim) tensor) the forward's peak RSS
grew by 2.05 GB with implicit broadcasts, transposes and unordered chunks, by 0.53 GB without them.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A fresh process, so that the peak is this forward's (VmHWM reset after the weights are in memory).
CHILD = textwrap.dedent("""
    import numpy as np
    import mindspore as ms
    import mindflux
    from mindflux import FluxTransformer2DModel

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    mindflux.set_device("cpu", "graph")
    side, text = 64, 64
    model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=128,
                                   num_attention_heads=6, joint_attention_dim=64, pooled_projection_dim=64)
    for p in model.get_parameters():
        p.asnumpy()
    rng = np.random.default_rng(0)
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    img_ids = np.stack([np.zeros_like(rows), rows, cols], -1).reshape(-1, 3).astype(np.float32)
    inputs = dict(hidden_states=rng.standard_normal((1, side * side, 64), dtype=np.float32),
                  encoder_hidden_states=rng.standard_normal((1, text, 64), dtype=np.float32),
                  pooled_projections=rng.standard_normal((1, 64), dtype=np.float32),
                  timestep=np.array([0.5], np.float32), img_ids=img_ids,
                  txt_ids=np.zeros((text, 3), np.float32))
    inputs = {k: ms.Tensor(v) for k, v in inputs.items()}
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    model(**inputs, return_dict=False)[0].asnumpy()
    print(status("VmHWM:") - before)
""")


def test_graph_forward_grows_by_its_activations():
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown = int(proc.stdout.strip().splitlines()[-1])
    assert grown < 1.0e9, grown / 1e9
