"""fp8 safetensors and GGUF files of the tiny FLUX.1-dev transformer, with PyTorch's outputs (issue 19).

Reads the `transformer` topic's flux_dev model and inputs. Writes:
  flux_dev_fp8_e4m3_bfl.safetensors    BFL layout, matrices F8_E4M3 (torch.float8_e4m3fn), vectors BF16
  flux_dev_fp8_scaled_bfl.safetensors  ComfyUI's "scaled fp8": model.diffusion_model.* keys, matrices as
                                       fp8(w / s) with `.scale_weight` s, a `scaled_fp8` marker, a scale_input
  flux_dev_fp8_e5m2/                   diffusers layout folder, matrices F8_E5M2
  flux_dev_<type>.gguf                 BFL layout GGUF written by the gguf package, matrices in <type>
  quants.gguf                          single tensors: K-quants (valid random blocks) and the types diffusers
                                       does not read (TQ1_0, TQ2_0, MXFP4), with the gguf package's
                                       dequantised values (and diffusers' for the K-quants)
The fp8 references run diffusers' FluxTransformer2DModel on torch's upcast of the same fp8 values (times
the scale); the GGUF references are diffusers' own GGUF loading (GGUFQuantizationConfig, fp32 compute),
and diffusers' model on the weights the gguf package dequantises (fp32, as ggml's C reference).
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import numpy as np

from .dump_transformer import diffusers_to_bfl

TRANSFORMER = Path(__file__).resolve().parents[1] / "fixtures" / "transformer"
PREFIX = "model.diffusion_model."
# Types the gguf package can write that diffusers 0.35 also reads: whole-model parity against diffusers.
GGUF_MODEL_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Writable by the gguf package but not read by diffusers: checked against the package's dequantiser.
GGUF_ONLY_TYPES = ("TQ1_0", "TQ2_0", "MXFP4")
# Byte offsets of the fp16 scales (d, dmin) in one block of each K-quant (ggml's block_qN_K structs).
_K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _bfl_converter():
    """diffusers' BFL -> diffusers converter with its inner size (fixed at FLUX's 3072) set to the tiny 32."""
    import torch
    from diffusers.loaders import single_file_utils

    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in source
    namespace = {"torch": torch}
    exec(source.replace("inner_dim = 3072", "inner_dim = 32"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def _write_gguf(path: Path, tensors: dict) -> None:
    """{name: (array, None) for F32/F16 as they are, or (quantised bytes, GGMLQuantizationType)} -> a GGUF file."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "flux")
    for name, (array, kind) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _k_quant_blocks(qtype: str, rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant bytes whose fp16 scales are small finite numbers (random bits may be NaN/inf)."""
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, type_size), dtype=np.uint8)
    for offset in _K_SCALE_OFFSETS[qtype]:
        scales = rng.uniform(0.001, 0.02, size=(rows, blocks_per_row)).astype(np.float16)
        raw[:, :, offset:offset + 2] = scales[..., None].view(np.uint8).reshape(rows, blocks_per_row, 2)
    return raw.reshape(rows, blocks_per_row * type_size)


def make_reference(out: Path) -> None:
    import gguf
    import torch
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
    from diffusers.loaders import single_file_model
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import save_file

    from .torch_common import save_arrays, seed

    seed(0)
    rng = np.random.default_rng(19)
    folder = TRANSFORMER / "flux_dev"
    base = FluxTransformer2DModel.from_pretrained(str(folder))
    cases = load_numpy(str(TRANSFORMER / "cases.safetensors"))
    prefix = "flux_dev.input."
    inputs = {k[len(prefix):]: torch.from_numpy(v) for k, v in cases.items() if k.startswith(prefix)}
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    bfl = diffusers_to_bfl(dict(sd))
    convert = _bfl_converter()

    def run(diffusers_sd: dict) -> torch.Tensor:
        model = FluxTransformer2DModel.from_config(base.config)
        model.load_state_dict(diffusers_sd, strict=True)
        with torch.no_grad():
            return model(**inputs).sample

    arrays = {}
    # fp8 E4M3, BFL layout: matrices fp8, vectors (biases, norm scales) bf16, as released fp8 checkpoints mix them
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v.to(torch.bfloat16) for k, v in bfl.items()}
    save_file(fp8, str(out / "flux_dev_fp8_e4m3_bfl.safetensors"))
    arrays["fp8_e4m3_bfl.output"] = run(convert({k: v.float() for k, v in fp8.items()}))

    # scaled fp8: weight = fp8(w / s) * s, s per tensor (one number)
    scaled, upcast = {}, {}
    for k, v in bfl.items():
        if v.ndim == 2:
            s = (v.abs().max() / 448.0).to(torch.float32)
            w8 = (v / s).to(torch.float8_e4m3fn)
            scaled[PREFIX + k] = w8
            scaled[PREFIX + k[: -len(".weight")] + ".scale_weight"] = s.reshape(())
            upcast[k] = w8.float() * s
        else:
            scaled[PREFIX + k] = v
            upcast[k] = v
    scaled[PREFIX + "scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    scaled[PREFIX + "double_blocks.0.img_attn.qkv.scale_input"] = torch.tensor(1.0)
    save_file(scaled, str(out / "flux_dev_fp8_scaled_bfl.safetensors"))
    arrays["fp8_scaled_bfl.output"] = run(convert(upcast))

    # fp8 E5M2, diffusers layout folder
    e5m2 = {k: v.to(torch.float8_e5m2) if v.ndim == 2 else v for k, v in sd.items()}
    (out / "flux_dev_fp8_e5m2").mkdir(exist_ok=True)
    shutil.copy(folder / "config.json", out / "flux_dev_fp8_e5m2" / "config.json")
    save_file(e5m2, str(out / "flux_dev_fp8_e5m2" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    arrays["fp8_e5m2.output"] = run({k: v.float() for k, v in e5m2.items()})

    # GGUF: diffusers' loader reads the file; its converter is given the tiny inner size
    single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]["checkpoint_mapping_fn"] = convert
    for qtype in GGUF_MODEL_TYPES:
        kind = gguf.GGMLQuantizationType[qtype]
        block = gguf.GGML_QUANT_SIZES[kind][0]
        tensors = {}
        for k, v in bfl.items():
            array = v.numpy()
            if array.ndim == 2 and array.shape[1] % block == 0:
                tensors[k] = (gguf.quants.quantize(array, kind), kind)
            else:  # what does not fit the blocks stays F32; biases F16, as GGUF FLUX files keep them
                tensors[k] = (array.astype(np.float16 if k.endswith(".bias") else np.float32), None)
        path = out / f"flux_dev_{qtype.lower()}.gguf"
        _write_gguf(path, tensors)
        model = FluxTransformer2DModel.from_single_file(
            str(path), config=str(folder), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
        quantised = [n for n, p in model.named_parameters() if isinstance(p, GGUFParameter)]
        assert len(quantised) > 10, quantised
        with torch.no_grad():
            arrays[f"{qtype.lower()}.output"] = model(**inputs).sample
        # diffusers' torch dequantisers multiply the fp16 block scales in fp16 (its weights are fp16-rounded);
        # the package's numpy dequantiser keeps fp32 as ggml's C reference does: the same model on those
        # weights is the exact reference
        dequantised = {k: torch.from_numpy(np.asarray(gguf.quants.dequantize(a, kind) if kind is not None else a,
                                                      np.float32).reshape(bfl[k].shape)) for k, (a, kind) in
                       tensors.items()}
        arrays[f"{qtype.lower()}.output_fp32"] = run(convert(dequantised))

    # single tensors: K-quants and the types only the gguf package reads
    writer_tensors, rows = {}, 3
    for qtype in K_QUANTS:
        kind = gguf.GGMLQuantizationType[qtype]
        raw = _k_quant_blocks(qtype, rows, 2, rng)
        writer_tensors[f"{qtype.lower()}.weight"] = (raw, kind)
        # the package's numpy dequantiser follows ggml's C reference in fp32; diffusers' torch port
        # multiplies the fp16 scales in fp16, so it differs by fp16 rounding
        arrays[f"quants.{qtype}"] = gguf.quants.dequantize(raw, kind)
        diffusers_values = dequantize_gguf_tensor(GGUFParameter(torch.from_numpy(raw), quant_type=kind))
        arrays[f"quants.{qtype}.diffusers"] = diffusers_values.float().reshape(rows, 512)
    for qtype in GGUF_ONLY_TYPES:
        kind = gguf.GGMLQuantizationType[qtype]
        values = rng.standard_normal((rows, 512)).astype(np.float32)
        raw = gguf.quants.quantize(values, kind)
        writer_tensors[f"{qtype.lower()}.weight"] = (raw, kind)
        arrays[f"quants.{qtype}"] = gguf.quants.dequantize(raw, kind)
    _write_gguf(out / "quants.gguf", writer_tensors)
    save_arrays(out / "cases.safetensors", arrays)
