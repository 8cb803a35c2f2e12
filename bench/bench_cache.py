"""Step caches (FirstBlockCacheConfig, TeaCacheConfig): steps skipped, seconds per image, and the image
difference to the uncached image, at three thresholds each, in mindflux graph mode on the CPU.

    python bench/bench_cache.py [--model demo|bench] [--steps 28] [--repeat 3] [--kinds fbcache teacache]

demo:  the demo model mindflux/demo/flux-shapes (trained by mindflux), 64x64, its prompts, 28 steps.
bench: the bench config of bench/common.py (4 heads of 128, 2 double + 4 single blocks, 1024 image and
       128 text tokens = 512x512), random order-one weights, random prompt embeddings, decoded by the
       demo VAE. Random blocks change more from step to step than trained ones: its thresholds are higher.
Seconds per call: the median of --repeat whole calls (prompt embeddings given, every step, VAE decode),
after one untimed call per configuration (graph compilation), as wall time and as this process's CPU
time (user + system over all threads; steadier than wall time on a shared machine). Difference: max
and mean |cached - uncached| over the images' pixels, in 1/255 units.
"""

from __future__ import annotations

import sys

from common import BENCH_CONFIG, IMAGE_GRID, ROOT, TEXT_LEN, bench_parser, emit, run_child

THRESHOLDS = {
    "demo": {"fbcache": (0.05, 0.12, 0.2), "teacache": (0.25, 0.4, 0.6)},
    # bench: consecutive first-block changes measured 0.49-0.67 over 20 steps (random blocks), so FBCache
    # needs thresholds above them; 0.1-0.3 skipped nothing.
    "bench": {"fbcache": (0.6, 0.7, 0.8), "teacache": (0.25, 0.4, 0.6)},
}
DEMO_PROMPTS = ["a red circle on a white background", "a blue triangle on a black background"]


def _demo(steps: int):
    from mindflux import FluxPipeline
    from mindflux.demo.model import DEMO_MODEL_DIR

    pipe = FluxPipeline.from_pretrained(str(DEMO_MODEL_DIR))
    embeds, pooled, _ = pipe.encode_prompt(DEMO_PROMPTS)

    def call():  # one batch of the two prompts, seeds 0 and 1
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=steps,
                    generator=list(range(len(DEMO_PROMPTS))), output_type="np").images
    return pipe, call


def _bench(steps: int):
    import numpy as np
    from mindspore import Tensor

    from mindflux import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from mindflux.demo.model import DEMO_MODEL_DIR

    demo = FluxPipeline.from_pretrained(str(DEMO_MODEL_DIR))
    transformer = FluxTransformer2DModel(**BENCH_CONFIG)
    rng = np.random.default_rng(0)
    for name, param in transformer.parameters_and_names():  # order-one weights, as the parity fixtures
        fan_in = param.shape[-1] if param.ndim >= 2 else 1
        value = rng.standard_normal(param.shape) / np.sqrt(fan_in) if param.ndim >= 2 else 0.1 * rng.standard_normal(
            param.shape)
        if name.startswith("proj_out"):
            value = 0.2 * value
        param.set_data(Tensor(value.astype(np.float32)))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(demo.scheduler.config), vae=demo.vae,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)
    embeds = rng.standard_normal((1, TEXT_LEN, BENCH_CONFIG["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((1, BENCH_CONFIG["pooled_projection_dim"])).astype(np.float32)
    height, width = (16 * n for n in IMAGE_GRID)

    def call():
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=height, width=width,
                    num_inference_steps=steps, generator=0, output_type="np").images
    return pipe, call


def child(model: str, steps: int, repeat: int, kinds: tuple[str, ...]) -> dict:
    import time

    import numpy as np

    import mindflux
    from mindflux.models.cache_utils import parse_cache_config

    mindflux.set_device("cpu", "graph")
    pipe, call = (_demo if model == "demo" else _bench)(steps)
    pipe.set_progress_bar_config(disable=True)

    def measure(spec: str | None) -> dict:
        if spec:
            pipe.transformer.enable_cache(parse_cache_config(spec))
        images = call()  # compiles
        skipped = len(pipe.transformer.cache_skipped_steps.get("cond", [])) if spec else 0
        times, cpu = [], []
        for _ in range(repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        if spec:
            pipe.transformer.disable_cache()
        return {"images": images, "skipped": skipped, "seconds": sorted(times)[len(times) // 2],
                "cpu_seconds": sorted(cpu)[len(cpu) // 2]}

    base = measure(None)
    rows = [{"cache": "none", "skipped": 0, "seconds": base["seconds"], "cpu_seconds": base["cpu_seconds"],
             "max_diff": 0.0, "mean_diff": 0.0}]
    for kind, thresholds in THRESHOLDS[model].items():
        if kind not in kinds:
            continue
        for threshold in thresholds:
            spec = f"{kind}:{threshold:g}"
            result = measure(spec)
            diff = np.abs(result["images"] - base["images"]) * 255
            rows.append({"cache": spec, "skipped": result["skipped"], "seconds": result["seconds"],
                         "cpu_seconds": result["cpu_seconds"], "max_diff": float(diff.max()),
                         "mean_diff": float(diff.mean())})
    return {"rows": rows, "images": int(base["images"].shape[0])}


def main() -> None:
    parser = bench_parser(__doc__, repeat=3)
    parser.add_argument("--model", choices=["demo", "bench"], default="demo")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--kinds", nargs="+", choices=["fbcache", "teacache"], default=["fbcache", "teacache"],
                        help="which caches to measure (default both)")
    args = parser.parse_args()
    if args.child is not None:
        emit(child(args.model, args.steps, args.repeat, tuple(args.kinds)))
        return
    result = run_child(__file__, ["--model", args.model, "--steps", str(args.steps), "--repeat", str(args.repeat),
                                  "--kinds", *args.kinds])
    what = ("demo model mindflux/demo/flux-shapes, 64x64, 2 prompts" if args.model == "demo" else
            f"bench config ({(ROOT / 'bench' / 'common.py').relative_to(ROOT)}), 512x512, random weights")
    print(f"{what}, {args.steps} steps, graph mode, fp32 on the CPU; seconds per call of {result['images']} "
          f"image(s)")
    print(f"| {'cache':15} | steps skipped | wall s | CPU s | speed-up (CPU s) | max diff /255 | mean diff /255 |")
    print(f"| {'-' * 15} | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = result["rows"][0]["cpu_seconds"]
    for row in result["rows"]:
        print(f"| {row['cache']:15} | {row['skipped']}/{args.steps} | {row['seconds']:.2f} | "
              f"{row['cpu_seconds']:.2f} | {base / row['cpu_seconds']:.2f}x | {row['max_diff']:.1f} | "
              f"{row['mean_diff']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
