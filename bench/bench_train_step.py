"""Time one LoRA train step: mindflux (graph, PyNative, graph + recompute) vs diffusers + peft on PyTorch.

    python bench/bench_train_step.py [--repeat 10]

Needs the torch extra (`pip install -e .[torch]`). The step is diffusers' DreamBooth LoRA step:
noisy input, transformer forward, flow-matching loss, backward for the LoRA parameters, clip by
global norm, AdamW. LoRA rank 16 on diffusers' default Flux targets (attention q/k/v/out and
added projections, both feed-forwards) plus the single blocks' proj_mlp and proj_out; the bench
config of common.py (1024 image + 128 text tokens, batch 1), fp32, each framework in its own
process. Ratios are mindflux time / PyTorch time (below 1.0: mindflux is faster); the memory
column is the process's peak RSS and its growth over the model loading.
"""

from __future__ import annotations

import sys
import tempfile

from common import BENCH_CONFIG, IMAGE_GRID, TEXT_LEN, WARMUP, bench_parser, emit, peak_rss_mb, run_child, time_calls

RANK = 16
TARGETS = (r".*(attn\.(to_k|to_q|to_v|to_out\.0|add_k_proj|add_q_proj|add_v_proj|to_add_out)|ff\.net\.0\.proj|"
           r"ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|single_transformer_blocks\.\d+\.(proj_mlp|proj_out))")
OPTIMIZER = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)


def make_weights(folder: str) -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    FluxTransformer2DModel(**BENCH_CONFIG).save_pretrained(folder)


def inputs_numpy() -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    h, w = IMAGE_GRID
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(h)[:, None], np.arange(w)[None, :]
    channels = BENCH_CONFIG["in_channels"] // 4
    return {
        "model_input": rng.standard_normal((1, channels, 2 * h, 2 * w), np.float32),
        "noise": rng.standard_normal((1, channels, 2 * h, 2 * w), np.float32),
        "sigmas": np.array([0.6], np.float32),
        "timesteps": np.array([0.6], np.float32),
        "encoder_hidden_states": rng.standard_normal((1, TEXT_LEN, BENCH_CONFIG["joint_attention_dim"]), np.float32),
        "pooled_projections": rng.standard_normal((1, BENCH_CONFIG["pooled_projection_dim"]), np.float32),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": np.zeros((TEXT_LEN, 3), np.float32),
        "guidance": np.array([3.5], np.float32),
    }


def child_torch(folder: str, repeat: int, checkpointing: bool) -> dict:
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig

    torch.set_num_threads(2)
    model = FluxTransformer2DModel.from_pretrained(folder)
    model.requires_grad_(False)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params, "lr": OPTIMIZER["lr"]}], betas=OPTIMIZER["betas"],
                                  weight_decay=OPTIMIZER["weight_decay"], eps=OPTIMIZER["eps"])
    x = {k: torch.from_numpy(v) for k, v in inputs_numpy().items()}
    loaded_rss = peak_rss_mb()

    def step():
        z, noise = x["model_input"], x["noise"]
        s = x["sigmas"].view(-1, 1, 1, 1)
        noisy = (1 - s) * z + s * noise
        b, c, h, w = z.shape
        pred = model(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=x["timesteps"],
                     guidance=x["guidance"], pooled_projections=x["pooled_projections"],
                     encoder_hidden_states=x["encoder_hidden_states"], txt_ids=x["txt_ids"], img_ids=x["img_ids"],
                     return_dict=False)[0]
        target = FluxPipeline._pack_latents(noise - z, b, c, h, w)
        loss = ((pred.float() - target.float()) ** 2).reshape(b, -1).mean(1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return {"step": time_calls(step, WARMUP, repeat), "peak_rss_mb": peak_rss_mb(), "loaded_rss_mb": loaded_rss,
            "lora_params": sum(p.numel() for p in params)}


def child_mindflux(folder: str, repeat: int, mode: str, recompute: bool) -> dict:
    import mindspore as ms

    import mindflux
    from mindflux import FluxTransformer2DModel
    from mindflux.lora import LoraConfig
    from mindflux.training import FluxFlowMatchingLoss, LoRATrainStep, create_optimizer, freeze, get_scheduler

    mindflux.set_device("cpu", mode)
    model = FluxTransformer2DModel.from_pretrained(folder)
    freeze(model)
    if recompute:
        model.enable_gradient_checkpointing()
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
    optimizer = create_optimizer("AdamW", model.lora_parameters(), betas=OPTIMIZER["betas"], eps=OPTIMIZER["eps"],
                                 weight_decay=OPTIMIZER["weight_decay"])
    step = LoRATrainStep(FluxFlowMatchingLoss(model), optimizer, get_scheduler("constant", OPTIMIZER["lr"]), 1.0)
    x = inputs_numpy()
    order = ("model_input", "noise", "sigmas", "timesteps", "encoder_hidden_states", "pooled_projections", "img_ids",
             "txt_ids", "guidance")
    args = [ms.Tensor(x[k]) for k in order]
    loaded_rss = peak_rss_mb()
    return {"step": time_calls(lambda: step(*args).loss, WARMUP, repeat), "peak_rss_mb": peak_rss_mb(),
            "loaded_rss_mb": loaded_rss, "lora_params": sum(int(p.size) for p in model.lora_parameters())}


VARIANTS = {
    "torch": ("torch", False), "torch+ckpt": ("torch", True),
    "graph": ("graph", False), "pynative": ("pynative", False), "graph+recompute": ("graph", True),
}


def main() -> None:
    parser = bench_parser(__doc__)
    args = parser.parse_args()
    if args.child is not None:
        name, folder, repeat = args.child[0], args.child[1], int(args.child[2])
        kind, recompute = VARIANTS[name]
        emit(child_torch(folder, repeat, recompute) if kind == "torch" else
             child_mindflux(folder, repeat, kind, recompute))
        return
    with tempfile.TemporaryDirectory() as folder:
        print(f"config: {BENCH_CONFIG}, {IMAGE_GRID[0] * IMAGE_GRID[1]} image + {TEXT_LEN} text tokens, batch 1, "
              f"fp32, LoRA rank {RANK}")
        make_weights(folder)
        results = {name: run_child(__file__, [name, folder, str(args.repeat)]) for name in VARIANTS}
    print(f"LoRA parameters: torch {results['torch']['lora_params']}, mindflux {results['graph']['lora_params']}")
    torch_s = results["torch"]["step"]["median_s"]
    print(f"{'':18}{'median s':>10}{'min s':>8}{'vs torch':>10}{'first s':>9}{'peak RSS MB':>13}{'step +MB':>10}")
    for name, r in results.items():
        t = r["step"]
        print(f"{name:18}{t['median_s']:10.3f}{t['min_s']:8.3f}{t['median_s'] / torch_s:10.2f}{t['first_s']:9.1f}"
              f"{r['peak_rss_mb']:13.0f}{r['peak_rss_mb'] - r['loaded_rss_mb']:10.0f}")
    print("vs torch: step time / diffusers+peft step time; torch+ckpt is diffusers with gradient checkpointing; "
          "first s includes graph compilation")


if __name__ == "__main__":
    sys.exit(main())
