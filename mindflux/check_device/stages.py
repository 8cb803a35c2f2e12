"""The stages of `python -m mindflux.check_device`, run in the worker process the runner watches.

Every parity stage compares the device, in its dtype, with a float32 reference computed from the
same inputs and weights rounded to that dtype, so the error measured is the kernels' alone:
max |device - reference| / max |reference|. Op references are numpy; the transformer's is
mindflux on the CPU in fp32, in a separate process. On the CPU the shapes are smaller (said in
each detail), since the full sizes take minutes there.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# relative error bounds by device dtype: a few units of the format's rounding (bf16 8 bits, fp16 11 bits)
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
FLUX_WIDTH = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Context:
    device: str          # "CPU" | "GPU" | "Ascend"
    dtype: str           # the device's compute dtype: "float32" | "float16" | "bfloat16"
    flash: bool          # whether flash_attention_score exists here
    soc: str | None
    msrun: int
    workdir: str

    @property
    def full_size(self) -> bool:
        return self.device != "CPU"


def device_policy() -> tuple[str, bool, str | None]:
    """(compute dtype, flash attention available, SoC name) of the current device, from the backend's table."""
    from ..backend import policy

    current = policy()
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[current.default_dtype]
    return dtype, current.flash_attention, current.soc or None


def _ms_dtype(name: str):
    import mindspore as ms

    return {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[name]


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """fp32 values rounded to `dtype` (round to nearest even), returned as fp32."""
    values = np.asarray(values, np.float32)
    if dtype == "float16":
        return values.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        from ..safetensors_io import float32_to_bf16_bits

        return (float32_to_bf16_bits(values).astype(np.uint32) << 16).view(np.float32)
    return values


def rel_error(actual, reference: np.ndarray) -> float:
    actual = np.asarray(actual, np.float64)
    return float(np.abs(actual - reference).max() / max(float(np.abs(reference).max()), 1e-30))


def _to_numpy(tensor) -> np.ndarray:
    import mindspore as ms

    return tensor.astype(ms.float32).asnumpy()


def _verdict(errors: dict[str, float], tolerance: float, prefix: str) -> tuple[str, str]:
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    parts = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    return ("fail" if bad else "pass"), f"{prefix}: {parts} (bound {tolerance:.0e})"


# ---- versions ------------------------------------------------------------------------------------------------
def versions(ctx: Context) -> dict[str, str]:
    import mindspore as ms

    import mindflux

    info = {"python": platform.python_version(), "numpy": np.__version__, "mindspore": ms.__version__,
            "mindflux": mindflux.__version__, "platform": platform.platform(), "dtype": ctx.dtype,
            "attention": "flash" if ctx.flash else "math"}
    if ctx.soc:
        info["soc"] = ctx.soc
    if ctx.device == "GPU":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["gpu"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "?"
        except (OSError, subprocess.TimeoutExpired):
            info["gpu"] = "nvidia-smi not found"
    return info


def stage_versions(ctx: Context) -> tuple[str, str]:
    return "pass", ", ".join(f"{k} {v}" for k, v in versions(ctx).items() if k != "platform")


def stage_run_check(ctx: Context) -> tuple[str, str]:
    import contextlib
    import io

    import mindspore as ms

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        ms.run_check()
    text = " ".join(buffer.getvalue().split())
    return ("pass" if "successfully" in text else "fail"), text[-300:]


# ---- op parity -----------------------------------------------------------------------------------------------
def attention_reference(q, k, v, d_out, scale: float):
    """softmax(scale q k^T) v and its input gradients for d_out, head by head in fp32 numpy (B, H, S, D)."""
    out, dq, dk, dv = (np.empty_like(q) for _ in range(4))
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            qh, kh, vh, doh = q[b, h], k[b, h], v[b, h], d_out[b, h]
            s = (qh @ kh.T) * scale
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            o = p @ vh
            ds = p * (doh @ vh.T - (doh * o).sum(-1, keepdims=True))
            out[b, h], dv[b, h] = o, p.T @ doh
            dq[b, h], dk[b, h] = (ds @ kh) * scale, (ds.T @ qh) * scale
    return out, (dq, dk, dv)


def _attention_case(ctx: Context, shape: tuple, backward: bool, seed: int) -> dict[str, float]:
    import mindspore as ms
    from mindspore import Tensor

    from ..models.attention import scaled_dot_product_attention

    rng = np.random.default_rng(seed)
    q, k, v, d_out = (round_to(rng.standard_normal(shape, dtype=np.float32), ctx.dtype) for _ in range(4))
    scale = 1.0 / np.sqrt(shape[-1])
    ref_out, ref_grads = attention_reference(q, k, v, d_out, scale)
    dtype = _ms_dtype(ctx.dtype)
    inputs = [Tensor(a).astype(dtype) for a in (q, k, v)]
    d_out_t = Tensor(d_out).astype(dtype)
    errors = {}
    for backend in ["math"] + (["flash"] if ctx.flash else []):
        out = scaled_dot_product_attention(*inputs, backend=backend)
        errors[f"{backend} fwd"] = rel_error(_to_numpy(out), ref_out)
        if backward:
            def loss(a, b, c, backend=backend):
                return (scaled_dot_product_attention(a, b, c, backend=backend).astype(ms.float32)
                        * d_out_t.astype(ms.float32)).sum()

            grads = ms.grad(loss, grad_position=(0, 1, 2))(*inputs)
            errors[f"{backend} bwd"] = max(rel_error(_to_numpy(g), r) for g, r in zip(grads, ref_grads))
    return errors


def _size_note(ctx: Context, full: tuple, small: tuple) -> tuple[tuple, str]:
    if ctx.full_size:
        return full, f"{full} {ctx.dtype}"
    return small, f"{small} {ctx.dtype} (the CPU runs this instead of {full}: the full size takes minutes there)"


def _flash_note(ctx: Context) -> str:
    return "" if ctx.flash else "; flash: skip (flash_attention_score exists on Atlas A2/A3 only)"


def stage_attention(ctx: Context) -> tuple[str, str]:
    shape, label = _size_note(ctx, (1, 24, 4608, 128), (1, 2, 512, 128))
    status, detail = _verdict(_attention_case(ctx, shape, True, 0), TOLERANCE[ctx.dtype], label)
    return status, detail + _flash_note(ctx)


def stage_vae_attention(ctx: Context) -> tuple[str, str]:
    shape, label = _size_note(ctx, (1, 1, 4096, 512), (1, 1, 1024, 512))
    status, detail = _verdict(_attention_case(ctx, shape, False, 1), TOLERANCE[ctx.dtype], label)
    return status, detail + _flash_note(ctx)


def conv2d_reference(x, weight, bias, stride: int, padding: tuple[int, int, int, int]):
    """NCHW convolution with explicit (top, bottom, left, right) zero padding, in numpy."""
    top, bottom, left, right = padding
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    kh, kw = weight.shape[-2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("bchwij,ocij->bohw", windows, weight, optimize=True) + bias[None, :, None, None]


def _set_parameters(cell, rng, dtype: str) -> dict[str, np.ndarray]:
    """Random values (rounded to dtype) into every parameter of a small cell; returns them by name."""
    from mindspore import Tensor

    values = {}
    for name, param in cell.parameters_and_names():
        value = round_to(1.0 + 0.3 * rng.standard_normal(param.shape, dtype=np.float32) if param.ndim == 1
                         else rng.standard_normal(param.shape, dtype=np.float32) / np.sqrt(np.prod(param.shape[1:])),
                         dtype)
        param.set_data(Tensor(value).astype(_ms_dtype(dtype)))
        values[name.rsplit(".", 1)[-1]] = value
    return values


def stage_norms_conv(ctx: Context) -> tuple[str, str]:
    from mindspore import Tensor

    from ..models.normalization import GroupNorm, LayerNorm, RMSNorm
    from ..models.vae_blocks import conv2d

    rng = np.random.default_rng(2)
    dtype = _ms_dtype(ctx.dtype)

    def run(cell, x):
        return _to_numpy(cell(Tensor(x).astype(dtype)))

    def normalize(x, axes, eps):
        x = x.astype(np.float64)
        return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)

    errors = {}
    x = round_to(3.0 * rng.standard_normal((2, 64, 3072), dtype=np.float32) + 1.0, ctx.dtype)
    cell = RMSNorm(128, eps=1e-6)
    w = _set_parameters(cell, rng, ctx.dtype)["weight"]
    xr = x.reshape(2, 64 * 24, 128)
    errors["RMSNorm"] = rel_error(run(cell, xr), xr / np.sqrt((xr.astype(np.float64) ** 2).mean(-1, keepdims=True)
                                                            + 1e-6) * w)
    errors["LayerNorm"] = rel_error(run(LayerNorm(3072, eps=1e-6, elementwise_affine=False), x), normalize(x, -1, 1e-6))
    cell = LayerNorm(3072, eps=1e-5)
    p = _set_parameters(cell, rng, ctx.dtype)
    errors["LayerNorm affine"] = rel_error(run(cell, x), normalize(x, -1, 1e-5) * p["weight"] + p["bias"])
    img = round_to(rng.standard_normal((1, 128, 32, 32), dtype=np.float32) * 2.0, ctx.dtype)
    cell = GroupNorm(32, 128, eps=1e-6)
    p = _set_parameters(cell, rng, ctx.dtype)
    grouped = normalize(img.reshape(1, 32, -1), -1, 1e-6).reshape(img.shape)
    errors["GroupNorm"] = rel_error(run(cell, img), grouped * p["weight"][None, :, None, None]
                                    + p["bias"][None, :, None, None])
    cell = conv2d(128, 64, 3, stride=2, padding=(0, 1, 0, 1))  # the VAE's Downsample2D: pad right and bottom only
    p = _set_parameters(cell, rng, ctx.dtype)
    errors["Conv2d (0,1,0,1) stride 2"] = rel_error(run(cell, img), conv2d_reference(img.astype(np.float64),
                                                                                     p["weight"], p["bias"], 2,
                                                                                     (0, 1, 0, 1)))
    return _verdict(errors, TOLERANCE[ctx.dtype], ctx.dtype)


# ---- the transformer at FLUX width ----------------------------------------------------------------------------
def seeded_transformer(dtype: str, config: dict | None = None):
    """A FluxTransformer2DModel (FLUX width, 1 double + 1 single block unless `config`) with deterministic
    weights, rounded to `dtype`, the same in every process: a 4M-value normal pool read at per-parameter
    offsets (drawing 546M fresh normals would take longer than the forward pass)."""
    from mindspore import Tensor

    from .. import FluxTransformer2DModel

    model = FluxTransformer2DModel(**(config or FLUX_WIDTH))
    pool = np.random.default_rng(0).standard_normal(1 << 22, dtype=np.float32)
    for i, (name, param) in enumerate(model.parameters_and_names()):
        if name.endswith(("norm_q.weight", "norm_k.weight")):
            continue  # RMSNorm scales stay ones
        start = (i * 7919) % pool.size
        values = np.resize(np.concatenate([pool[start:], pool[:start]]), param.shape)
        values = values / np.sqrt(param.shape[-1]) if param.ndim == 2 else 0.02 * values
        param.set_data(Tensor(round_to(values, dtype)))
    return model


def transformer_inputs(image_tokens: int, text_tokens: int, dtype: str, config: dict | None = None):
    from mindspore import Tensor

    from ..latents import prepare_latent_image_ids, prepare_text_ids

    config = config or FLUX_WIDTH
    side = int(round(image_tokens ** 0.5))
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal((1, side * side, config["in_channels"]), dtype=np.float32),
              rng.standard_normal((1, text_tokens, config["joint_attention_dim"]), dtype=np.float32),
              rng.standard_normal((1, config["pooled_projection_dim"]), dtype=np.float32)]
    ms_dtype = _ms_dtype(dtype)
    hidden, text, pooled = (Tensor(round_to(a, dtype)).astype(ms_dtype) for a in arrays)
    return dict(hidden_states=hidden, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=Tensor(np.array([0.6], np.float32)).astype(ms_dtype),
                img_ids=prepare_latent_image_ids(side, side), txt_ids=prepare_text_ids(text_tokens),
                guidance=Tensor(np.array([3.5], np.float32)).astype(ms_dtype))


def transformer_output(dtype: str, image_tokens: int, text_tokens: int, compute: str | None = None) -> np.ndarray:
    """The seeded model's output for weights and inputs rounded to `dtype`, computed in `compute` (default
    `dtype`; the reference computes in float32)."""
    compute = compute or dtype
    model = seeded_transformer(dtype)
    model.to(_ms_dtype(compute))
    model.set_train(False)
    inputs = transformer_inputs(image_tokens, text_tokens, dtype)
    inputs = {k: (v.astype(_ms_dtype(compute)) if k in ("hidden_states", "encoder_hidden_states",
                                                        "pooled_projections", "timestep", "guidance") else v)
              for k, v in inputs.items()}
    return _to_numpy(model(**inputs, return_dict=False)[0])


def stage_transformer(ctx: Context) -> tuple[str, str]:
    import mindspore as ms

    tokens = (1024, 128) if ctx.full_size else (64, 16)
    start = time.perf_counter()
    with _graph_mode():
        out = transformer_output(ctx.dtype, *tokens)
    seconds = time.perf_counter() - start
    if ctx.device == "CPU":  # the reference is the CPU op by op (PyNative) in this same process
        ms.set_context(mode=ms.PYNATIVE_MODE)
        reference = transformer_output(ctx.dtype, *tokens)
        against = "PyNative"
    else:
        path = os.path.join(ctx.workdir, "transformer_reference.npy")
        cmd = [sys.executable, "-m", "mindflux.check_device.stages", "--reference", path, ctx.dtype,
               str(tokens[0]), str(tokens[1])]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
        if done.returncode != 0:
            return "fail", "the CPU reference run failed: " + " ".join(done.stderr[-500:].split())
        reference = np.load(path)
        against = "the CPU in fp32"
    label = (f"3072 wide, 24 heads, 1+1 blocks, {tokens[0]} image + {tokens[1]} text tokens, graph mode "
             f"{ctx.dtype} ({seconds:.1f} s with compile) vs {against}")
    if not np.isfinite(out).all():
        return "fail", label + ": non-finite output"
    return _verdict({"output": rel_error(out, reference)}, TOLERANCE[ctx.dtype], label)


class _graph_mode:
    def __enter__(self):
        import mindspore as ms

        ms.set_context(mode=ms.GRAPH_MODE)

    def __exit__(self, *exc):
        import mindspore as ms

        ms.set_context(mode=ms.PYNATIVE_MODE)


# ---- one LoRA train step ---------------------------------------------------------------------------------------
def stage_lora_step(ctx: Context) -> tuple[str, str]:
    import mindspore as ms
    from mindspore import Tensor

    from ..lora import LoraConfig
    from ..training import DynamicLossScale, FluxFlowMatchingLoss, LoRATrainStep, create_optimizer, freeze
    from ..training.lr_schedules import get_scheduler

    config = FLUX_WIDTH if ctx.full_size else dict(FLUX_WIDTH, num_attention_heads=2, joint_attention_dim=64,
                                                   pooled_projection_dim=32)
    side, text = (16, 64) if ctx.full_size else (4, 8)
    dtype = _ms_dtype(ctx.dtype)
    ms.set_seed(0)  # the LoRA A matrices' gaussian init: the same numbers on every run
    model = seeded_transformer(ctx.dtype, config)
    freeze(model, dtype=dtype)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                 "ff.net.0.proj", "proj_mlp"]))
    model.enable_gradient_checkpointing()
    params = model.lora_parameters()
    before = [p.asnumpy().copy() for p in params]
    optimizer = create_optimizer("AdamW", params, weight_decay=1e-4)
    # fp16 scales the loss; from 2**10 rather than GradScaler's 2**16, so the one step is not a skipped overflow
    scaler = DynamicLossScale(init_scale=2.0**10) if ctx.dtype == "float16" else None
    step = LoRATrainStep(FluxFlowMatchingLoss(model), optimizer, get_scheduler("constant", 1e-3), 1.0, 1, scaler)
    inputs = transformer_inputs(side * side, text, ctx.dtype, config)
    rng = np.random.default_rng(4)
    latents = Tensor(rng.standard_normal((1, 16, 2 * side, 2 * side), dtype=np.float32)).astype(dtype)
    noise = Tensor(rng.standard_normal(latents.shape, dtype=np.float32))
    start = time.perf_counter()
    with _graph_mode():
        out = step(latents, noise, Tensor(np.array([0.7], np.float32)), Tensor(np.array([700.0], np.float32)),
                   inputs["encoder_hidden_states"], inputs["pooled_projections"], inputs["img_ids"],
                   inputs["txt_ids"], inputs["guidance"])
    seconds = time.perf_counter() - start
    moved = max(float(np.abs(p.asnumpy() - b).max()) for p, b in zip(params, before))
    dtypes = sorted({str(p.dtype) for p in params})
    detail = (f"{config['num_attention_heads']} heads x 128, 1+1 blocks, {side * side}+{text} tokens, weights "
              f"{ctx.dtype}, recompute, AdamW: loss {out.loss:.4g}, grad norm {out.grad_norm:.4g}, {len(params)} LoRA "
              f"tensors {'/'.join(dtypes)}, largest change {moved:.2e} ({seconds:.1f} s with compile)")
    ok = (np.isfinite(out.loss) and np.isfinite(out.grad_norm) and out.grad_norm > 0 and dtypes == ["Float32"]
          and moved > 0)
    return ("pass" if ok else "fail"), detail


# ---- infer/generate.py on the demo model ------------------------------------------------------------------------
_TIMING = re.compile(r"denoising ([\d.]+) s/step.*?first step ([\d.]+) s")


def stage_generate(ctx: Context) -> tuple[str, str]:
    script = ROOT / "infer" / "generate.py"
    if not script.is_file():
        return "skip", f"{script} not found: this mindflux was installed without the repository's infer/ folder"
    out_dir = tempfile.mkdtemp(prefix="generate_", dir=ctx.workdir)
    cmd = [sys.executable, str(script), "--device", ctx.device.lower(), "--output_dir", out_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=570, cwd=str(ROOT))
    text = done.stdout + done.stderr
    pngs = sorted(p for p in os.listdir(out_dir) if p.endswith(".png"))
    if done.returncode != 0 or not pngs:
        return "fail", f"status {done.returncode}: " + " ".join(text[-500:].split())
    timing = _TIMING.search(text)
    if timing is None:
        return "pass", f"demo model -> {pngs[0]}; " + " ".join(text.strip().splitlines()[-1:])
    per_step, first = float(timing.group(1)), float(timing.group(2))
    return "pass", (f"demo model (mindflux/demo/flux-shapes) -> {pngs[0]}: first step {first:.2f} s (with compile), "
                    f"then {per_step:.3f} s/step")


# ---- msrun data parallel ------------------------------------------------------------------------------------------
def stage_msrun(ctx: Context) -> tuple[str, str]:
    import shutil
    import socket

    from .msrun_worker import train_tiny

    if ctx.msrun != 2:
        return "skip", "pass --msrun 2 to check two-worker data parallelism"
    msrun = shutil.which("msrun", path=os.path.dirname(sys.executable)) or shutil.which("msrun")
    if msrun is None:
        return "fail", "msrun (installed with MindSpore) was not found on PATH"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, logs = os.path.join(ctx.workdir, "msrun_two.npz"), os.path.join(ctx.workdir, "msrun_logs")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={port}", "--join=True",
           f"--log_dir={logs}", str(Path(__file__).with_name("msrun_worker.py")), ctx.device, out]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env)
    if done.returncode != 0 or not os.path.isfile(out):
        tails = {p.name: " ".join(p.read_text(errors="replace")[-300:].split()) for p in Path(logs).glob("*.log")}
        return "fail", f"msrun status {done.returncode}: {tails or done.stdout[-300:]}"
    two = dict(np.load(out))
    with _graph_mode():
        one = train_tiny(rank=0, world_size=1)
    error = max(float(np.abs(one[k] - two[k]).max()) for k in one)
    detail = (f"2 workers x batch 2 (ranks initialised differently, then rank 0's weights broadcast) vs 1 x batch 4, "
              f"3 AdamW updates: max weight difference {error:.1e} (bound 1e-5)")
    return ("pass" if error <= 1e-5 else "fail"), detail


STAGE_FUNCTIONS = {"versions": stage_versions, "run_check": stage_run_check, "attention": stage_attention,
                   "vae_attention": stage_vae_attention, "norms_conv": stage_norms_conv,
                   "transformer": stage_transformer, "lora_step": stage_lora_step, "generate": stage_generate,
                   "msrun": stage_msrun}


# ---- the worker --------------------------------------------------------------------------------------------------
def work(device: str, names: list[str], msrun: int, events_path: str, workdir: str) -> None:
    """Set the device, then run `names` in order, appending one JSON line per event to `events_path`."""
    def emit(event: dict) -> None:
        with open(events_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())

    from ..device import set_device

    try:
        target = set_device(device, "pynative")
        dtype, flash, soc = device_policy()
    except (RuntimeError, ValueError) as err:
        emit({"fatal": " ".join(str(err).split())})
        return
    ctx = Context(target, dtype, flash, soc, msrun, workdir)
    emit({"device": target, "versions": versions(ctx)})
    for name in names:
        emit({"start": name})
        start = time.perf_counter()
        try:
            status, detail = STAGE_FUNCTIONS[name](ctx)
        except Exception as err:  # a stage's failure is its report; the next stage still runs
            status, detail = "fail", f"{type(err).__name__}: " + " ".join(str(err).split())[:800]
        emit({"result": {"name": name, "status": status, "detail": detail,
                         "seconds": round(time.perf_counter() - start, 2)}})


if __name__ == "__main__":  # the CPU fp32 reference of stage_transformer: --reference OUT DTYPE IMAGE TEXT
    from ..device import set_device

    _, _, out_path, ref_dtype, image_tokens, text_tokens = sys.argv
    set_device("cpu", "pynative")
    np.save(out_path, transformer_output(ref_dtype, int(image_tokens), int(text_tokens), "float32"))
