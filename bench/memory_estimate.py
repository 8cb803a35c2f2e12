"""Weights memory of a FLUX.1 pipeline, counted from parameter shapes, and its largest activations.

    python bench/memory_estimate.py                      # FLUX.1-dev's configs, 1024 x 1024, bf16
    python bench/memory_estimate.py --model FLUX.1-schnell --height 768 --width 1360

The models are built without allocating their weights (MindSpore's no_init_parameters), so this
runs anywhere in seconds. With --model, each component's config.json comes from that folder.
Activation figures are the largest tensors alive at once, per image, from the shapes alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GLOG_v", "3")

# FLUX.1-dev's component configs (black-forest-labs/FLUX.1-dev on the Hub), the fields that set shapes.
FLUX_DEV = {
    "transformer": ("FluxTransformer2DModel", dict(guidance_embeds=True)),  # the class defaults are FLUX's
    "text_encoder_2": ("T5EncoderModel", dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                              num_heads=64, feed_forward_proj="gated-gelu")),
    "text_encoder": ("CLIPTextModel", dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12)),
    "vae": ("AutoencoderKL", dict(latent_channels=16, block_out_channels=[128, 256, 512, 512],
                                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                  layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)),
}
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def count_parameters(model_folder: str | None) -> dict[str, int]:
    from mindspore.nn.utils import no_init_parameters

    import mindflux.models as models

    counts = {}
    for name, (class_name, config) in FLUX_DEV.items():
        cls = getattr(models, class_name)
        if model_folder:
            config = cls.load_config(os.path.join(model_folder, name))
        with no_init_parameters():
            model = cls.from_config(config)
        counts[name] = model.num_parameters()
    return counts


def activations(height: int, width: int, text_len: int, nbytes: int) -> dict[str, float]:
    """Bytes of the largest tensors alive at once, batch 1 (FLUX.1 sizes: 24 heads x 128, MLP x4)."""
    image, dim, heads = (height // 16) * (width // 16), 3072, 24
    seq = image + text_len
    single_block = seq * dim * nbytes * (3 + 4 + 5)  # q, k, v; the MLP's 4 * dim; its cat with attention
    scores = heads * seq * seq * 4  # fp32 softmax of the math path (CPU / GPU); flash attention has none
    vae_full = 256 * height * width * nbytes * 3  # last upsampling: 256 channels at full size, in, out, norm
    vae_tile = 256 * 512 * 512 * nbytes * 3  # the same on a 512-pixel tile
    mid_attention = (height // 8 * width // 8) ** 2 * 4  # the VAE mid-block's single head, math path
    return {"transformer block, flash attention (Ascend)": single_block,
            "transformer block, math attention (CPU/GPU)": single_block + scores,
            "VAE decode, whole image": vae_full + mid_attention, "VAE decode, 512-pixel tiles": vae_tile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a pipeline folder to read the configs from (default: FLUX.1-dev's)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--max_sequence_length", type=int, default=512)
    parser.add_argument("--dtype", choices=list(BYTES), default="bf16")
    args = parser.parse_args()
    nbytes = BYTES[args.dtype]
    counts = count_parameters(args.model)
    print(f"weights ({args.dtype}):")
    for name, count in {**counts, "total": sum(counts.values())}.items():
        print(f"  {name:16}{count:>16,} parameters {count * nbytes / 1e9:8.2f} GB")
    print(f"largest activations at {args.height}x{args.width}, {args.max_sequence_length} text tokens, per image:")
    for what, size in activations(args.height, args.width, args.max_sequence_length, nbytes).items():
        print(f"  {what:46}{size / 1e9:8.2f} GB")
    print(json.dumps({"parameters": counts}))


if __name__ == "__main__":
    main()
