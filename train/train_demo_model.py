"""Train the demo model: a tiny FLUX pipeline that draws coloured shapes, made by mindflux alone.

    python train/train_demo_model.py                      # writes mindflux/demo/flux-shapes

Stages, all on the training core the LoRA script uses (optimizer, LR schedule, train step):
 1. render the procedural shapes dataset (mindflux.demo.shapes), deterministic from --seed;
 2. train the 16-channel VAE on it (reconstruction + small KL), then measure its latents'
    shift and scale, as FLUX's scaling_factor / shift_factor;
 3. build random, frozen CLIP and T5 encoders (weights rounded to bf16, as they are saved) over
    the real tokenizers, and encode every caption once;
 4. cache the VAE posterior of every image and train the transformer from scratch with the
    flow-matching loss (full training: every parameter is trainable);
 5. save the diffusers-format pipeline folder and measure how many of the fixed evaluation
    prompts are drawn as asked (mindflux.demo.model.evaluate).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
logger = logging.getLogger("train_demo_model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mindflux.demo.model import DEMO_MODEL_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=str(DEMO_MODEL_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_images", type=int, default=8192, help="images rendered for training")
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--vae_batch_size", type=int, default=16)
    p.add_argument("--vae_learning_rate", type=float, default=1e-3)
    p.add_argument("--vae_from", help="a trained VAE folder to reuse instead of stage 2")
    p.add_argument("--transformer_from", help="a trained transformer folder to go on training instead of starting "
                                              "from random weights")
    p.add_argument("--transformer_steps", type=int, default=6000)
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=6e-4)
    p.add_argument("--weighting_scheme", default="logit_normal")
    p.add_argument("--guidance_scale", type=float, default=3.5, help="the guidance embedding's training value")
    p.add_argument("--eval_cases", type=int, default=48)
    p.add_argument("--device", default="auto")
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"])
    return p.parse_args(argv)


def render_dataset(num_images: int, seed: int):
    import numpy as np

    from mindflux.demo.shapes import render, sample_specs
    from mindflux.image_processor import to_pixels

    specs = sample_specs(num_images, seed)
    return specs, np.stack([to_pixels(np.asarray(render(s), np.uint8)) for s in specs])


def fit(loss_net, params, learning_rate: float, steps: int, make_inputs, desc: str, warmup: int = 100) -> list[float]:
    """Train `params` with AdamW, warmup then cosine decay to 0 (sharper samples than a constant rate at
    the end); returns the loss per step."""
    from tqdm.auto import tqdm

    from mindflux.training import LoRATrainStep, create_optimizer, get_scheduler

    optimizer = create_optimizer("AdamW", params, weight_decay=1e-4)
    schedule = get_scheduler("cosine", learning_rate, num_warmup_steps=warmup, num_training_steps=steps)
    step = LoRATrainStep(loss_net, optimizer, schedule, max_grad_norm=1.0)
    losses = []
    progress = tqdm(range(steps), desc=desc)
    for _ in progress:
        out = step(*make_inputs())
        if not math.isfinite(out.loss):
            raise FloatingPointError(f"{desc}: the loss became {out.loss} at step {step.global_step}")
        losses.append(out.loss)
        progress.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return losses


def train_vae(args, pixels, rng, folder: Path):
    import mindspore as ms
    import numpy as np

    from mindflux import AutoencoderKL
    from mindflux.demo.model import IMAGE_SIZE, VAE_CONFIG
    from mindflux.latents import latent_size, standard_normal
    from mindflux.training.vae import VAEReconstructionLoss

    vae = AutoencoderKL.from_config(VAE_CONFIG)
    latent = latent_size(IMAGE_SIZE, IMAGE_SIZE, 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1))
    shape = (args.vae_batch_size, VAE_CONFIG["latent_channels"], *latent)

    def batch():
        index = rng.integers(0, len(pixels), args.vae_batch_size)
        return ms.Tensor(pixels[index]), ms.Tensor(standard_normal(shape, rng))

    losses = fit(VAEReconstructionLoss(vae), vae.trainable_params(), args.vae_learning_rate, args.vae_steps, batch,
                 "VAE")
    # FLUX normalizes latents with a shift and scale measured on data: z' = (z - shift) * scale.
    vae.set_train(False)
    means = np.concatenate([vae.encode(ms.Tensor(pixels[i:i + 256])).latent_dist.mean.asnumpy()
                            for i in range(0, min(len(pixels), 2048), 256)])
    vae.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config.update(shift_factor=float(means.mean()), scaling_factor=float(1.0 / means.std()))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return losses


def build_text_encoders(folder: Path):
    """Random CLIP / T5 over the real tokenizers; weights rounded to bf16 now, since they are saved so."""
    import mindspore as ms
    from transformers import CLIPTokenizer, T5TokenizerFast

    from mindflux import CLIPTextModel, T5EncoderModel
    from mindflux.demo.model import CLIP_CONFIG, MAX_SEQUENCE_LENGTH, T5_CONFIG

    tokenizers = ROOT / "tests" / "fixtures" / "tokenizers"
    shutil.copytree(tokenizers / "clip", folder / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(tokenizers / "t5", folder / "tokenizer_2", dirs_exist_ok=True)
    config_path = folder / "tokenizer_2" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = MAX_SEQUENCE_LENGTH  # the pipeline's default T5 length for this model
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    tokenizer_2 = T5TokenizerFast.from_pretrained(str(folder / "tokenizer_2"))
    clip = CLIPTextModel.from_config(CLIP_CONFIG)
    t5 = T5EncoderModel.from_config({**T5_CONFIG, "vocab_size": len(tokenizer_2)})
    for model in (clip, t5):
        model.to(ms.bfloat16).to(ms.float32)
        model.set_train(False)
    return clip, tokenizer, t5, tokenizer_2


def main(args: argparse.Namespace) -> dict:
    import mindspore as ms
    import numpy as np

    import mindflux
    from mindflux import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from mindflux.demo.model import (
        MAX_SEQUENCE_LENGTH,
        SCHEDULER_CONFIG,
        TRANSFORMER_CONFIG,
        drawn_as_asked,
        eval_cases,
        evaluate,
    )
    from mindflux.latents import normalize_latents, prepare_latent_image_ids, prepare_text_ids, standard_normal
    from mindflux.pipelines import FluxPipeline
    from mindflux.text_encoding import encode_prompt
    from mindflux.training import FlowMatchingSampler, FluxFlowMatchingLoss

    started = time.time()
    device = mindflux.set_device(args.device, args.mode)
    ms.set_seed(args.seed)
    data_rng, vae_rng, step_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(args.seed).spawn(3))
    out = Path(args.output_dir)
    work = out.parent / (out.name + ".partial")  # written here, renamed at the end: no half-written model
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    # 1. data
    specs, pixels = render_dataset(args.num_images, args.seed)
    logger.info("rendered %d images of %d captions", len(specs), len({s.caption for s in specs}))

    # 2. VAE
    report = {"command": " ".join(sys.argv), "device": device, "mode": args.mode, "seed": args.seed}
    t0 = time.time()
    if args.vae_from:
        shutil.copytree(args.vae_from, work / "vae")
    else:
        losses = train_vae(args, pixels, vae_rng, work / "vae")
        report["vae"] = {"steps": args.vae_steps, "final_loss": float(np.mean(losses[-100:])),
                         "seconds": round(time.time() - t0)}
    vae = AutoencoderKL.from_pretrained(str(work / "vae"))

    # 3. text
    clip, tokenizer, t5, tokenizer_2 = build_text_encoders(work)
    captions = sorted({s.caption for s in specs})
    embeds, pooled, _ = encode_prompt(clip, tokenizer, t5, tokenizer_2, captions,
                                      max_sequence_length=MAX_SEQUENCE_LENGTH)
    embeds, pooled = embeds.asnumpy(), pooled.asnumpy()
    caption_index = np.array([captions.index(s.caption) for s in specs])

    # 4. transformer on cached latents
    posterior = [vae.encode(ms.Tensor(pixels[i:i + 256])).latent_dist for i in range(0, len(pixels), 256)]
    latent_mean = np.concatenate([p.mean.asnumpy() for p in posterior])
    latent_std = np.concatenate([p.std.asnumpy() for p in posterior])
    del posterior
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    sampler = FlowMatchingSampler(scheduler, args.weighting_scheme, generator=step_rng)
    if args.transformer_from:
        transformer = FluxTransformer2DModel.from_pretrained(args.transformer_from)
    else:
        transformer = FluxTransformer2DModel.from_config(TRANSFORMER_CONFIG)
    h, w = latent_mean.shape[2:]
    img_ids, txt_ids = prepare_latent_image_ids(h // 2, w // 2), prepare_text_ids(MAX_SEQUENCE_LENGTH)
    guidance = ms.Tensor(np.full(args.train_batch_size, args.guidance_scale, np.float32))

    def batch():
        index = step_rng.integers(0, len(pixels), args.train_batch_size)
        latents = latent_mean[index] + latent_std[index] * standard_normal(latent_mean[index].shape, step_rng)
        latents = normalize_latents(ms.Tensor(latents), vae.config.scaling_factor, vae.config.shift_factor)
        draw = sampler.sample(latents.shape)
        return (latents, ms.Tensor(draw.noise), ms.Tensor(draw.sigmas), ms.Tensor(draw.timesteps),
                ms.Tensor(embeds[caption_index[index]]), ms.Tensor(pooled[caption_index[index]]), img_ids, txt_ids,
                guidance)

    t0 = time.time()
    losses = fit(FluxFlowMatchingLoss(transformer, args.weighting_scheme), transformer.trainable_params(),
                 args.learning_rate, args.transformer_steps, batch, "transformer")
    report["transformer"] = {"steps": args.transformer_steps, "batch_size": args.train_batch_size,
                             "final_loss": float(np.mean(losses[-100:])), "seconds": round(time.time() - t0)}
    transformer.set_train(False)

    # 5. save and evaluate
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    clip.to(ms.bfloat16)  # random and frozen: bf16 halves the largest file (the 49408-token embedding)
    t5.to(ms.bfloat16)
    pipe.save_pretrained(str(work))
    clip.to(ms.float32)
    t5.to(ms.float32)
    cases = eval_cases(args.eval_cases)
    readings = evaluate(FluxPipeline.from_pretrained(str(work)), cases)
    correct = [drawn_as_asked(r, c.spec) for r, c in zip(readings, cases)]
    report["evaluation"] = {"cases": len(cases), "drawn_as_asked": int(sum(correct)),
                            "accuracy": float(np.mean(correct))}
    report["total_seconds"] = round(time.time() - started)
    (work / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    logger.info("demo model written to %s: %s", out, json.dumps(report))
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(parse_args())
