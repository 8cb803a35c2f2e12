"""Time FluxTransformer2DModel forward and forward+backward: mindflux (graph, PyNative) vs diffusers.

    python bench/bench_transformer.py [--repeat 10]

Needs the torch extra (`pip install -e .[torch]`). Both frameworks get the same weights and
inputs, each runs in its own process, and the ratios printed are mindflux time / PyTorch time
(below 1.0: mindflux is faster).
"""

from __future__ import annotations

import sys
import tempfile

from common import BENCH_CONFIG, IMAGE_GRID, TEXT_LEN, WARMUP, bench_parser, emit, peak_rss_mb, run_child, time_calls


def make_weights(folder: str) -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    FluxTransformer2DModel(**BENCH_CONFIG).save_pretrained(folder)


def inputs_numpy():
    import numpy as np

    rng = np.random.default_rng(0)
    h, w = IMAGE_GRID
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(h)[:, None], np.arange(w)[None, :]
    return {
        "hidden_states": rng.standard_normal((1, h * w, BENCH_CONFIG["in_channels"]), np.float32),
        "encoder_hidden_states": rng.standard_normal((1, TEXT_LEN, BENCH_CONFIG["joint_attention_dim"]), np.float32),
        "pooled_projections": rng.standard_normal((1, BENCH_CONFIG["pooled_projection_dim"]), np.float32),
        "timestep": np.array([0.5], np.float32),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": np.zeros((TEXT_LEN, 3), np.float32),
        "guidance": np.array([3.5], np.float32),
    }


def child_torch(folder: str, repeat: int) -> dict:
    import torch
    from diffusers import FluxTransformer2DModel

    torch.set_num_threads(2)
    model = FluxTransformer2DModel.from_pretrained(folder)
    inputs = {k: torch.from_numpy(v) for k, v in inputs_numpy().items()}

    def forward():
        with torch.no_grad():
            return model(**inputs).sample

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(**inputs).sample.square().mean().backward()

    return {"forward": time_calls(forward, WARMUP, repeat),
            "forward_backward": time_calls(forward_backward, WARMUP, repeat), "peak_rss_mb": peak_rss_mb()}


def child_mindflux(folder: str, repeat: int, mode: str) -> dict:
    import mindspore as ms

    import mindflux
    from mindflux import FluxTransformer2DModel

    mindflux.set_device("cpu", mode)
    model = FluxTransformer2DModel.from_pretrained(folder)
    inputs = {k: ms.Tensor(v) for k, v in inputs_numpy().items()}
    params = [p for _, p in model.named_parameters()]

    class Loss(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.model = model

        def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                      guidance):
            out = self.model(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                             guidance, return_dict=False)[0]
            return out.square().mean()

    class LossAndGrads(ms.nn.Cell):
        # a Cell, not ms.jit around a function: in graph mode the Cell's graph measured 1.5x faster here
        def __init__(self):
            super().__init__()
            self.grad_fn = ms.value_and_grad(Loss(), None, ms.ParameterTuple(params))

        def construct(self, *args):
            return self.grad_fn(*args)

    grad_fn = LossAndGrads()
    args = [inputs[k] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids",
                                "txt_ids", "guidance")]
    return {"forward": time_calls(lambda: model(*args).sample.asnumpy(), WARMUP, repeat),
            "forward_backward": time_calls(lambda: grad_fn(*args)[0].asnumpy(), WARMUP, repeat),
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = bench_parser(__doc__)
    args = parser.parse_args()
    if args.child is not None:
        framework, folder, repeat = args.child[0], args.child[1], int(args.child[2])
        emit(child_torch(folder, repeat) if framework == "torch" else child_mindflux(folder, repeat, framework))
        return
    with tempfile.TemporaryDirectory() as folder:
        print(f"config: {BENCH_CONFIG}, {IMAGE_GRID[0] * IMAGE_GRID[1]} image + {TEXT_LEN} text tokens, batch 1")
        make_weights(folder)
        results = {name: run_child(__file__, [name, folder, str(args.repeat)])
                   for name in ("torch", "graph", "pynative")}
    # Medians, then minimums: on a shared machine torch's times swing more than MindSpore's.
    print(f"{'':24}{'torch s':>10}{'graph s':>10}{'pynative s':>12}{'graph/torch':>13}{'pynative/torch':>16}")
    for stat in ("median_s", "min_s"):
        for what in ("forward", "forward_backward"):
            t, g, p = (results[n][what][stat] for n in ("torch", "graph", "pynative"))
            label = f"{what} ({stat[:-2]})"
            print(f"{label:24}{t:10.3f}{g:10.3f}{p:12.3f}{g / t:13.2f}{p / t:16.2f}")
    print("graph first call (compile + run): "
          f"forward {results['graph']['forward']['first_s']:.1f} s, "
          f"forward_backward {results['graph']['forward_backward']['first_s']:.1f} s")
    print("peak RSS MB: " + ", ".join(f"{n} {results[n]['peak_rss_mb']:.0f}" for n in results))


if __name__ == "__main__":
    sys.exit(main())
