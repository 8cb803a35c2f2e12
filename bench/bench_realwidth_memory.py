"""Peak memory and time of one transformer forward at FLUX.1-dev's real width, mindflux against diffusers.

    python bench/bench_realwidth_memory.py [--size 1024] [--keep /tmp/realwidth] [--torch_python PYTHON]
                                           [--mode graph|pynative] [--skip_torch]

Config: FLUX.1-dev's width (24 heads of 128 = 3072, joint 4096, pooled 768, rope 16/56/56, guidance)
with 1 double + 1 single block: 0.54 B parameters, 2.2 GB in fp32. Input: a --size x --size image
((size/16)^2 image tokens) and 512 text tokens, batch 1, fp32 on the CPU.

Each framework runs in its own fresh process: diffusers builds the model with seeded weights and saves
it (save_pretrained) with the inputs; both then load that folder (from_pretrained), run one forward
untimed and one timed (mindflux in --mode; in graph mode the first call compiles), and report the peak
RSS of the process (loading included) and the seconds of the timed forward. The outputs must agree
within 1e-4 of their largest value. Goal (issue 16): mindflux <= 1.3x PyTorch in peak RSS and in time
at 1024. With --keep, the PyTorch figures and output are saved there and --skip_torch reuses them
(they do not change), so iterating on mindflux runs only its side.

Measured (docs/performance.md, one run each at 1024, idle machine): PyTorch 3.36 GB and 45.5 s; mindflux
graph mode 4.00 GB (1.19x) and 45.5 s (1.00x), PyNative 3.24 GB and 61.8 s. Check `free -g` before running
on a shared machine.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from common import bench_parser, emit, peak_rss_mb, run_child

CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
              axes_dims_rope=[16, 56, 56])
TEXT_LEN = 512


def make_inputs(size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    side = size // 16
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    img_ids = np.stack([np.zeros_like(rows), rows, cols], -1).reshape(-1, 3).astype(np.float32)
    return dict(hidden_states=rng.standard_normal((1, side * side, 64), dtype=np.float32),
                encoder_hidden_states=rng.standard_normal((1, TEXT_LEN, 4096), dtype=np.float32),
                pooled_projections=rng.standard_normal((1, 768), dtype=np.float32),
                timestep=np.array([0.7], np.float32), guidance=np.array([3.5], np.float32),
                img_ids=img_ids, txt_ids=np.zeros((TEXT_LEN, 3), np.float32))


def child_torch(folder: Path, size: int) -> dict:
    import time

    import numpy as np
    import torch
    from diffusers import FluxTransformer2DModel

    torch.set_num_threads(2)
    if not (folder / "transformer" / "config.json").is_file():  # first run: build, seed and save the model
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**CONFIG)
        with torch.no_grad():
            for param in model.parameters():
                fan_in = param.shape[-1] if param.ndim >= 2 else 1
                param.copy_(torch.randn(param.shape) * (fan_in ** -0.5 if param.ndim >= 2 else 0.02))
        model.save_pretrained(str(folder / "transformer"))
        del model
    model = FluxTransformer2DModel.from_pretrained(str(folder / "transformer"), torch_dtype=torch.float32).eval()
    inputs = {k: torch.from_numpy(v) for k, v in make_inputs(size).items()}
    with torch.no_grad():
        model(**inputs)
        start = time.perf_counter()
        out = model(**inputs).sample.numpy()
    seconds = time.perf_counter() - start
    np.save(folder / f"torch_{size}.npy", out)
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def child_mindflux(folder: Path, size: int, mode: str) -> dict:
    import time

    import numpy as np
    from mindspore import Tensor

    import mindflux
    from mindflux import FluxTransformer2DModel

    mindflux.set_device("cpu", mode)
    load_start = time.perf_counter()
    model = FluxTransformer2DModel.from_pretrained(str(folder / "transformer"))
    load_s, load_rss = time.perf_counter() - load_start, peak_rss_mb()
    inputs = {k: Tensor(v) for k, v in make_inputs(size).items()}
    start = time.perf_counter()
    model(**inputs, return_dict=False)[0].asnumpy()
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = model(**inputs, return_dict=False)[0].asnumpy()
    seconds = time.perf_counter() - start
    np.save(folder / f"mindflux_{size}.npy", out)
    return {"seconds": seconds, "first_s": first, "load_s": load_s, "load_peak_rss_mb": load_rss,
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = bench_parser(__doc__, repeat=1)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (a multiple of 16)")
    parser.add_argument("--torch_python", help="the Python that has torch and diffusers, if not this one "
                                               "(e.g. /work/tvenv/bin/python)")
    parser.add_argument("--keep", help="folder for the saved model and outputs, kept for later runs "
                                       "(default: a temporary folder, removed at the end)")
    parser.add_argument("--mode", choices=("graph", "pynative"), default="graph",
                        help="mindflux's execution mode (PyNative frees intermediates as it goes: less memory, "
                             "slower on the CPU; see docs/performance.md)")
    parser.add_argument("--skip_torch", action="store_true",
                        help="reuse the PyTorch figures and output that an earlier run saved in --keep's folder "
                             "(they do not change) and run mindflux only")
    args = parser.parse_args()
    if args.size % 16:
        parser.error(f"--size must be a multiple of 16; got {args.size}")
    saved = Path(args.keep or ".") / f"torch_{args.size}.json"
    if args.skip_torch and not (args.keep and saved.is_file()):
        parser.error(f"--skip_torch needs --keep with a folder where an earlier run saved {saved.name}")
    if args.child is not None:
        framework, folder = args.child
        emit(child_torch(Path(folder), args.size) if framework == "torch"
             else child_mindflux(Path(folder), args.size, args.mode))
        return
    import numpy as np

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="realwidth_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        sizes = ["--size", str(args.size)]
        if args.skip_torch:
            torch = json.loads(saved.read_text())
        else:
            torch = run_child(__file__, ["torch", str(folder), *sizes], python=args.torch_python)  # writes the model
            (folder / saved.name).write_text(json.dumps(torch))
        ms = run_child(__file__, ["mindflux", str(folder), *sizes, "--mode", args.mode])
        a, b = (np.load(folder / f"{name}_{args.size}.npy") for name in ("torch", "mindflux"))
        error = float(np.abs(a - b).max() / np.abs(a).max())
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    tokens = (args.size // 16) ** 2
    print(f"real width (3072, 24 heads), 1 double + 1 single block, fp32, {args.size}x{args.size}: {tokens} image + "
          f"{TEXT_LEN} text tokens, batch 1, CPU; mindflux in {args.mode} mode")
    print(f"{'':28}{'torch':>10}{'mindflux':>10}{'ratio':>8}   goal")
    print(f"{'peak RSS (GB)':28}{torch['peak_rss_mb'] / 1024:10.2f}{ms['peak_rss_mb'] / 1024:10.2f}"
          f"{ms['peak_rss_mb'] / torch['peak_rss_mb']:8.2f}   <= 1.3")
    print(f"{'forward (s, second call)':28}{torch['seconds']:10.2f}{ms['seconds']:10.2f}"
          f"{ms['seconds'] / torch['seconds']:8.2f}   <= 1.3")
    print(f"mindflux: from_pretrained {ms['load_s']:.1f} s, peak RSS after loading {ms['load_peak_rss_mb'] / 1024:.2f} "
          f"GB; first forward ({'graph compilation + run' if args.mode == 'graph' else 'PyNative'}) "
          f"{ms['first_s']:.1f} s")
    print(f"outputs: max |mindflux - torch| / max |torch| = {error:.1e} (bound 1e-4): "
          f"{'ok' if error <= 1e-4 else 'FAILED'}")
    return 0 if error <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
