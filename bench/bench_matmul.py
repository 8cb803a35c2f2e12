"""The kernel floor: one linear layer, MindSpore's CPU MatMul vs torch's, on the bench config's shapes.

    python bench/bench_matmul.py [--repeat 10]

Needs the torch extra. The transformer's forward is about 70% matmuls on the CPU, so the ratio
printed here bounds what graph-level work in mindflux can reach in bench_transformer.py and
bench_train_step.py. Each framework runs in its own process. MindSpore computes x W^T as
nn.Dense does (MatMul with transpose_b, the diffusers weight layout); the "plain" column is the
same product with W stored transposed, which a diffusers-named parameter cannot be; "w.T" transposes
W inside the graph, once per CALLS products.
"""

from __future__ import annotations

import sys

from common import WARMUP, bench_parser, emit, run_child, time_calls

TOKENS = 1152  # 1024 image + 128 text
# (in, out) of the transformer's linear layers at dim 512: q/k/v/out, MLP up, MLP down, single-block proj_out
SHAPES = [(512, 512), (512, 2048), (2048, 512), (2560, 512)]
CALLS = 10  # products per timed call, on distinct inputs (a compiler would merge identical ones)


def child_torch(repeat: int) -> dict:
    import torch

    torch.manual_seed(0)
    out = {}
    with torch.no_grad():
        for k, n in SHAPES:
            xs, w = [torch.randn(TOKENS, k) for _ in range(CALLS)], torch.randn(n, k) * k**-0.5

            def call(xs=xs, w=w):
                for x in xs:
                    torch.nn.functional.linear(x, w)

            out[f"{k}x{n}"] = time_calls(call, WARMUP, repeat)["median_s"] / CALLS
    return out


def child_mindspore(repeat: int) -> dict:
    import mindspore as ms
    import numpy as np
    from mindspore import nn, ops

    import mindflux

    mindflux.set_device("cpu", "graph")

    class Chain(nn.Cell):
        def __init__(self, transpose_b: bool, transpose_in_graph: bool = False):
            super().__init__()
            self.matmul = ops.MatMul(transpose_b=transpose_b)
            self.transpose_in_graph = transpose_in_graph

        def construct(self, xs, w):
            if self.transpose_in_graph:
                w = w.T
            return [self.matmul(x, w) for x in xs]

    rng = np.random.default_rng(0)
    out = {}
    for k, n in SHAPES:
        xs = tuple(ms.Tensor(rng.standard_normal((TOKENS, k), np.float32)) for _ in range(CALLS))
        w = rng.standard_normal((n, k), np.float32) * k**-0.5
        variants = (("", Chain(True), w), ("plain ", Chain(False), np.ascontiguousarray(w.T)),
                    ("w.T ", Chain(False, True), w))
        for name, chain, weight in variants:
            call = lambda c=chain, xs=xs, w=ms.Tensor(weight): c(xs, w)[-1].asnumpy()  # noqa: E731
            out[f"{name}{k}x{n}"] = time_calls(call, WARMUP, repeat)["median_s"] / CALLS
    return out


def main() -> None:
    parser = bench_parser(__doc__)
    args = parser.parse_args()
    if args.child is not None:
        framework, repeat = args.child[0], int(args.child[1])
        emit(child_torch(repeat) if framework == "torch" else child_mindspore(repeat))
        return
    torch_ms = run_child(__file__, ["torch", str(args.repeat)])
    mind = run_child(__file__, ["mindspore", str(args.repeat)])
    print(f"x ({TOKENS}, in) @ W^T, fp32, ms per product")
    print(f"{'in x out':12}{'torch':>8}{'mindspore':>11}{'plain':>8}{'w.T':>8}{'ms/torch':>10}{'plain/torch':>13}"
          f"{'w.T/torch':>11}")
    for k, n in SHAPES:
        key = f"{k}x{n}"
        t, m, p, g = torch_ms[key], mind[key], mind[f"plain {key}"], mind[f"w.T {key}"]
        print(f"{key:12}{t * 1e3:8.2f}{m * 1e3:11.2f}{p * 1e3:8.2f}{g * 1e3:8.2f}"
              f"{m / t:10.2f}{p / t:13.2f}{g / t:11.2f}")


if __name__ == "__main__":
    sys.exit(main())
