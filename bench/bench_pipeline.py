"""Time FluxPipeline per denoising step and per image: mindflux (graph, PyNative) vs diffusers PyTorch.

    python bench/bench_pipeline.py [--height 256 --width 256 --steps 4 --repeat 3]

Needs the torch extra (`pip install -e .[torch]`). Every framework loads the same tiny pipeline
folder (tests/fixtures/pipeline/tiny_flux, saved by diffusers), gets the same prompt, size and
initial latents, and runs in its own process. Per image: one whole call (prompt encoding, every
step, VAE decode, to numpy). Per step: (time with N steps - time with 1 step) / (N - 1).
Ratios are mindflux time / PyTorch time (below 1.0: mindflux is faster).
"""

from __future__ import annotations

import sys

from common import ROOT, bench_parser, emit, peak_rss_mb, run_child, time_calls

FOLDER = ROOT / "tests" / "fixtures" / "pipeline" / "tiny_flux"
PROMPT = "a small red circle in the top left corner of a white background"
MAX_SEQUENCE_LENGTH = 64


def initial_latents(height: int, width: int):
    import numpy as np

    tokens = (height // 16) * (width // 16)
    return np.random.default_rng(0).standard_normal((1, tokens, 64), dtype=np.float32)


def child(framework: str, height: int, width: int, steps: int, repeat: int) -> dict:
    latents = initial_latents(height, width)
    if framework == "torch":
        import torch
        from diffusers import FluxPipeline

        torch.set_num_threads(2)
        pipe = FluxPipeline.from_pretrained(str(FOLDER), torch_dtype=torch.float32)
        latents = torch.from_numpy(latents)

        def call(n):
            with torch.no_grad():
                return pipe(PROMPT, height=height, width=width, num_inference_steps=n, latents=latents,
                            max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="np").images
    else:
        import mindflux
        from mindflux import FluxPipeline

        mindflux.set_device("cpu", framework)
        pipe = FluxPipeline.from_pretrained(str(FOLDER))

        def call(n):
            return pipe(PROMPT, height=height, width=width, num_inference_steps=n, latents=latents,
                        max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="np").images
    pipe.set_progress_bar_config(disable=True)
    image = time_calls(lambda: call(steps), 2, repeat)
    one_step = time_calls(lambda: call(1), 1, repeat)
    return {"image": image, "one_step": one_step,
            "step_s": (image["median_s"] - one_step["median_s"]) / (steps - 1), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = bench_parser(__doc__, repeat=3)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the per-step time is a difference)")
    if args.child is not None:
        emit(child(args.child[0], args.height, args.width, args.steps, args.repeat))
        return
    sizes = [str(v) for v in ("--height", args.height, "--width", args.width, "--steps", args.steps, "--repeat",
                              args.repeat)]
    print(f"tiny pipeline {FOLDER.relative_to(ROOT)}, {args.height}x{args.width} "
          f"({(args.height // 16) * (args.width // 16)} image tokens), {MAX_SEQUENCE_LENGTH} T5 tokens, "
          f"{args.steps} steps, batch 1, fp32 on the CPU")
    results = {name: run_child(__file__, [name, *sizes]) for name in ("torch", "graph", "pynative")}
    t, g, p = (results[n] for n in ("torch", "graph", "pynative"))
    print(f"{'':22}{'torch s':>10}{'graph s':>10}{'pynative s':>12}{'graph/torch':>13}{'pynative/torch':>16}")
    for what, get in (("per denoising step", lambda r: r["step_s"]), ("per image", lambda r: r["image"]["median_s"])):
        print(f"{what:22}{get(t):10.4f}{get(g):10.4f}{get(p):12.4f}{get(g) / get(t):13.2f}{get(p) / get(t):16.2f}")
    print(f"first call (graph compilation + run): graph {g['image']['first_s']:.1f} s, "
          f"pynative {p['image']['first_s']:.1f} s, torch {t['image']['first_s']:.1f} s")
    print("peak RSS MB: " + ", ".join(f"{n} {results[n]['peak_rss_mb']:.0f}" for n in results))


if __name__ == "__main__":
    sys.exit(main())
