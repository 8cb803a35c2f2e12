"""The demo model: a tiny FLUX-architecture pipeline that mindflux trains on the shapes dataset.

`train/train_demo_model.py` builds it from these configs and writes it to `DEMO_MODEL_DIR`; the
CLI `infer/generate.py` uses that folder when no --model is given, and the tests measure it with
`evaluate`. Images are 64x64; the VAE downsamples 8x to 8x8x16 latents, i.e. 16 image tokens.
The text encoders are random and frozen (the tokenizers are real): the transformer learns to
read their embeddings of the captions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .shapes import BACKGROUNDS, COLOURS, NOVEL_SHAPE, SHAPES, Reading, ShapeSpec, classify, random_placement

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "flux-shapes"
# DreamBooth demo: instance images of a shape the demo model never saw, and the prompt that names it
INSTANCE_DIR = Path(__file__).resolve().parent / "ring"
INSTANCE_PROMPT = "an orange ring on a white background"  # "ring": a word and a shape it never saw
IMAGE_SIZE = 64
DEMO_PROMPT = "a red circle on a white background"  # generate.py's prompt when it is given none
MAX_SEQUENCE_LENGTH = 32  # T5 tokens; a caption is at most ~12

TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
                          num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                          guidance_embeds=True, axes_dims_rope=[8, 12, 12])
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[16, 32, 64, 64], layers_per_block=1,
                  act_fn="silu", latent_channels=16, norm_num_groups=8, sample_size=IMAGE_SIZE, use_quant_conv=False,
                  use_post_quant_conv=False, mid_block_add_attention=True, force_upcast=True)
CLIP_CONFIG = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0,
                   eos_token_id=2, pad_token_id=1, projection_dim=32)
T5_CONFIG = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
                 dropout_rate=0.0)  # vocab_size comes from the tokenizer
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


@dataclass(frozen=True)
class EvalCase:
    prompt: str
    seed: int
    spec: ShapeSpec  # what should be drawn (position and size are free)


def eval_cases(count: int = 48, seed: int = 1234) -> list[EvalCase]:
    """A fixed list of prompt/seed pairs covering every shape, colour and background."""
    combos = [(s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, BACKGROUNDS) if c != b]
    rng = np.random.default_rng(seed)
    picked = [combos[i] for i in rng.permutation(len(combos))[:count]]
    cases = []
    for index, (shape, colour, background) in enumerate(picked):
        spec = ShapeSpec(shape, colour, background, 0.5, 0.5, 0.5)
        cases.append(EvalCase(spec.caption, 1000 + index, spec))
    return cases


def instance_specs(count: int = 6, seed: int = 7) -> list[ShapeSpec]:
    """The DreamBooth demo's instance images: orange rings on white, placed and sized at random."""
    rng = np.random.default_rng(seed)
    specs = []
    for _ in range(count):
        size, cx, cy = random_placement(rng)
        specs.append(ShapeSpec(NOVEL_SHAPE, "orange", "white", cx, cy, size))
    return specs


def drawn_as_asked(reading: Reading, spec: ShapeSpec) -> bool:
    return (reading.shape, reading.colour, reading.background) == (spec.shape, spec.colour, spec.background)


def evaluate(pipe, cases: list[EvalCase], num_inference_steps: int = 28, batch_size: int = 16) -> list[Reading]:
    """Generate one image per case (its own seed) and read back what was drawn."""
    readings = []
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        images = pipe([c.prompt for c in batch], generator=[c.seed for c in batch],
                      num_inference_steps=num_inference_steps, output_type="np").images
        readings += [classify((np.clip(image, 0, 1) * 255).round().astype(np.uint8)) for image in images]
    return readings
