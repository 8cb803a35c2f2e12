"""First-call (graph compile + run) times of the transformer forward on the CPU, and what changes them.

    python bench/bench_compile.py                 # the bench config and FLUX width 1+1 blocks at 512²
    python bench/bench_compile.py --configs bench

Each variant runs in a fresh process:
- plain: graph mode as the library runs it on the CPU;
- lazy_inline: the two block classes' __init__ wrapped in mindspore.lazy_inline (what the library does
  on Ascend only: MindSpore documents it for Ascend);
- cache cold / cache warm: MindSpore's compile cache (MS_COMPILER_CACHE_ENABLE=1 with a fresh
  MS_COMPILER_CACHE_PATH), first a process that writes it, then one that reads it.
The second call's time is printed too: compile-time changes must not slow the step down.
`--vae` times a tiled decode whose edge tiles are smaller (four tile shapes): per-shape graphs against
the library's one dynamic-shape graph for all tiles.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BENCH_CONFIG, IMAGE_GRID, TEXT_LEN, bench_parser, emit, peak_rss_mb, run_child  # noqa: E402

FLUX_1_1 = dict(BENCH_CONFIG, num_layers=1, num_single_layers=1, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768)
CONFIGS = {"bench": (BENCH_CONFIG, IMAGE_GRID, TEXT_LEN),  # 4 heads, 2+4 blocks, 1024 + 128 tokens
           "flux_1_1_512": (FLUX_1_1, (32, 32), 512)}     # FLUX width, 1+1 blocks, a 512² image + 512 text tokens


def child(name: str, variant: str) -> dict:
    import mindspore as ms
    import numpy as np

    import mindflux
    from mindflux.latents import prepare_latent_image_ids, prepare_text_ids
    from mindflux.models import transformer_flux

    config, (h, w), text_len = CONFIGS[name]
    mindflux.set_device("cpu", "graph")
    ms.set_seed(0)  # the same weights in every process, so the outputs can be compared
    if variant == "lazy_inline":
        for cls in (transformer_flux.FluxTransformerBlock, transformer_flux.FluxSingleTransformerBlock):
            cls.__init__ = ms.lazy_inline(cls.__init__)
    model = transformer_flux.FluxTransformer2DModel(**config)
    model.set_train(False)
    rng = np.random.default_rng(0)
    args = [ms.Tensor(rng.standard_normal((1, h * w, config["in_channels"]), np.float32)),
            ms.Tensor(rng.standard_normal((1, text_len, config["joint_attention_dim"]), np.float32)),
            ms.Tensor(rng.standard_normal((1, config["pooled_projection_dim"]), np.float32)),
            ms.Tensor(np.array([0.5], np.float32)), prepare_latent_image_ids(h, w), prepare_text_ids(text_len),
            ms.Tensor(np.array([3.5], np.float32))]
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = model(*args, return_dict=False)[0].asnumpy()
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "second_s": times[1], "checksum": float(np.abs(out).sum()),
            "peak_rss_mb": peak_rss_mb()}


def child_vae(variant: str) -> dict:
    """A tiled decode of 40x40 latents in 16-latent tiles (stride 12: tiles of 16 and 4) with a small VAE."""
    import mindspore as ms
    import numpy as np

    import mindflux
    from mindflux import AutoencoderKL
    from mindflux.models import autoencoder_kl

    mindflux.set_device("cpu", "graph")
    ms.set_seed(0)
    if variant == "per_shape":  # what the library did before: each tile shape compiles its own graph
        autoencoder_kl._AnyTileShape.__enter__ = lambda self: None
        autoencoder_kl._AnyTileShape.__exit__ = lambda self, *exc: None
    vae = AutoencoderKL(block_out_channels=[32, 64], layers_per_block=1, latent_channels=16, norm_num_groups=32,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    vae.enable_tiling(tile_sample_min_size=32)
    z = ms.Tensor(np.random.default_rng(0).standard_normal((1, 16, 40, 40)).astype(np.float32))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = vae.decode(z).sample.asnumpy()
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "second_s": times[1], "checksum": float(np.abs(out).sum()),
            "peak_rss_mb": peak_rss_mb()}


def report(results: dict) -> None:
    base = next(iter(results.values()))
    for variant, r in results.items():
        same = "same output" if abs(r["checksum"] - base["checksum"]) <= 1e-4 * base["checksum"] else \
            f"OUTPUT DIFFERS ({r['checksum']:.6g} vs {base['checksum']:.6g})"
        print(f"  {variant:<12} first call {r['first_s']:6.1f} s (x{r['first_s'] / base['first_s']:.2f}), "
              f"second {r['second_s']:6.2f} s, peak RSS {r['peak_rss_mb'] / 1024:.1f} GB, {same}", flush=True)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--vae", action="store_true", help="time tiled VAE decoding instead")
    args = parser.parse_args()
    if args.child:
        emit(child_vae(args.child[1]) if args.child[0] == "vae" else child(*args.child))
        return
    script = os.path.abspath(__file__)
    if args.vae:
        print("tiled VAE decode, 40x40 latents in tiles of 16 (edge tiles 4): four tile shapes", flush=True)
        report({variant: run_child(script, ["vae", variant]) for variant in ("per_shape", "one_graph")})
        return
    for name in args.configs.split(","):
        config, (h, w), text_len = CONFIGS[name]
        print(f"{name}: {config['num_attention_heads']} heads x 128, {config['num_layers']}+"
              f"{config['num_single_layers']} blocks, {h * w} image + {text_len} text tokens", flush=True)
        results = {}
        for variant in ("plain", "lazy_inline"):
            try:
                results[variant] = run_child(script, [name, variant])
            except RuntimeError as err:  # lazy_inline: MindSpore 2.7.1's CPU backend rejects the reused graphs
                error = [line for line in str(err).splitlines() if "Error" in line][-1:]
                print(f"  {variant:<12} fails: {' '.join(error)}", flush=True)
        with tempfile.TemporaryDirectory() as cache:
            os.environ.update(MS_COMPILER_CACHE_ENABLE="1", MS_COMPILER_CACHE_PATH=cache)
            try:
                results["cache cold"] = run_child(script, [name, "plain"])
                results["cache warm"] = run_child(script, [name, "plain"])
            finally:
                del os.environ["MS_COMPILER_CACHE_ENABLE"], os.environ["MS_COMPILER_CACHE_PATH"]
        report(results)


if __name__ == "__main__":
    main()
