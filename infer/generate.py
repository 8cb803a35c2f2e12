"""Text to image with FLUX.1 on MindSpore: a command line over mindflux.FluxPipeline.

    python infer/generate.py                              # the demo model shipped in the repo
    python infer/generate.py --prompt "a blue triangle on a black background"
    python infer/generate.py --model FLUX.1-schnell --prompt "a red circle on a white background"
    python infer/generate.py --model FLUX.1-dev --prompt_file prompts.txt --num_images 4 --seed 7 \\
        --lora style.safetensors:0.8 --dtype bf16 --device ascend --output_dir outputs

Without --model the tiny demo pipeline in mindflux/demo/flux-shapes draws (64x64 shapes; see
docs/demo.md), with the prompt "a red circle on a white background" unless one is given.
--model is a local pipeline folder as diffusers' save_pretrained writes it (model_index.json and
transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/), e.g. one
downloaded with `huggingface-cli download black-forest-labs/FLUX.1-schnell --local-dir FLUX.1-schnell`.
Image k of every prompt uses seed --seed + k; files are named NNN_seedS.png, numbered on from the
highest NNN already in --output_dir plus the image's index in the run (no earlier picture is ever
replaced), and carry the prompt, seed, steps, guidance, model and --cache in their PNG text metadata;
images.jsonl gets one line per image (prompt, seed, file, seconds). Under msrun each process makes
every N-th image and writes images.rankR.jsonl (see docs/inference.md). Ctrl-C (or SIGTERM) keeps the
PNGs finished so far and ends with status 130 (143); an image that comes out NaN/inf is reported,
not saved.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

EXIT_USAGE, EXIT_ERROR = 2, 1
MAX_LORA_SCALE = 100.0  # beyond this a LoRA only destroys the image (common scales are 0.5-2, sliders +-5)


class CLIError(Exception):
    """A mistake in the command line or its files: printed as one line, no traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def parse_lora(spec: str) -> tuple[str, float]:
    """PATH[:SCALE] -> (path, scale); a suffix that is not a number stays part of the path."""
    path, sep, scale = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="pipeline folder with model_index.json (FLUX.1-dev or schnell, diffusers layout) "
                                   "or a Hub repo id such as black-forest-labs/FLUX.1-schnell; "
                                   "default: the demo model in mindflux/demo/flux-shapes")
    p.add_argument("--model_source", choices=("huggingface", "modelscope"), default=None,
                   help="where a repo id in --model is fetched from (default: $MINDFLUX_MODEL_SOURCE, else the "
                        "Hugging Face Hub; HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE apply to it)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--prompt_file", help="a text file with one prompt per line (blank lines and # comments skipped)")
    p.add_argument("--negative_prompt", help="used with --true_cfg_scale > 1 (true classifier-free guidance)")
    p.add_argument("--height", type=int,
                   help="image height in pixels (default: the model's size, 1024 for FLUX.1); not a multiple of 16: "
                        "a warning, then rounded down to one, as diffusers does")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's size); rounded down to a "
                                             "multiple of 16 like --height")
    p.add_argument("--num_inference_steps", "--steps", type=int, dest="num_inference_steps",
                   help="denoising steps (default 28; 4 for schnell, which has no guidance embedding); --steps is an "
                        "alias")
    p.add_argument("--guidance_scale", type=float, default=3.5,
                   help="embedded guidance of FLUX.1-dev (default 3.5); schnell ignores it")
    p.add_argument("--true_cfg_scale", type=float, default=1.0,
                   help="true CFG scale; above 1 with --negative_prompt, every step runs the transformer twice")
    p.add_argument("--max_sequence_length", type=int,
                   help="T5 tokens (default: the T5 tokenizer's model_max_length, 512 for FLUX.1; at most 512)")
    p.add_argument("--seed", type=int, default=0, help="image k of each prompt uses seed + k (default 0; >= 0)")
    p.add_argument("--num_images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA file (diffusers, kohya, ComfyUI, BFL or XLabs format) and its scale (default 1.0);"
                        " repeat for several")
    p.add_argument("--fuse_lora", action="store_true", help="add the LoRAs into the weights (faster steps)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="weights and compute dtype (default: bf16 on Ascend Atlas A2, fp16 on GPUs and the Ascend "
                        "910A, fp32 on the CPU; fp32 on a card is refused when FLUX cannot fit)")
    p.add_argument("--device", default="auto", choices=["auto", "ascend", "gpu", "cpu"],
                   help="default: Ascend, then GPU, then CPU")
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"],
                   help="graph: the transformer compiles once per resolution (default); pynative: op by op "
                        "(on the CPU 0.8x graph mode's peak memory at 1024x1024, 1.4x its time; docs/performance.md)")
    p.add_argument("--release_text_encoders", action="store_true",
                   help="free CLIP and T5 (9.8 GB in bf16) after encoding every prompt, before denoising")
    p.add_argument("--vae_tiling", action="store_true",
                   help="VAE-decode in overlapping 512-pixel tiles (less memory; FLUX's own tile size is 1024)")
    p.add_argument("--cache", metavar="KIND:THRESHOLD",
                   help="skip denoising steps whose input barely changed: fbcache:0.12 (first-block cache, as "
                        "diffusers') or teacache:0.4 (TeaCache); see docs/performance.md for which to choose")
    p.add_argument("--image", help="an input image: img2img with a FLUX.1-dev/schnell model, editing with Kontext; "
                                   "sets the default --height/--width (see docs/inference.md)")
    p.add_argument("--mask_image", help="with --image: inpaint (dev/schnell) or fill (FLUX.1-Fill) where it is white")
    p.add_argument("--control_image", help="a Canny / depth map for FLUX.1-Canny/Depth-dev or a control --lora")
    p.add_argument("--strength", type=float,
                   help="with --image: how much of the schedule runs, in [0, 1] (default: the pipeline's, 0.6)")
    p.add_argument("--output_dir", default="outputs",
                   help="where the PNGs go (default outputs/); numbering continues after the files already there")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as err:
            raise CLIError(f"cannot read --prompt_file {args.prompt_file}: {err.strerror or err}") from None
        except UnicodeDecodeError as err:
            raise CLIError(f"--prompt_file {args.prompt_file} is not UTF-8 text (byte {err.start}: "
                           f"{err.object[err.start:err.start + 1]!r}); give a text file, one prompt a line") from None
        if "\x00" in text:
            raise CLIError(f"--prompt_file {args.prompt_file} holds NUL bytes: not a text file")
        lines = text.splitlines()
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts and getattr(args, "demo", False):
        from mindflux.demo.model import DEMO_PROMPT

        prompts = [DEMO_PROMPT]
    if not prompts:
        raise CLIError("no prompt: give --prompt TEXT (repeatable) or --prompt_file FILE")
    return prompts


def check_args(args) -> list[tuple[str, float]]:
    """Problems that need no model: found before anything slow starts."""
    args.demo = not args.model
    if args.demo:
        from mindflux.demo.model import DEMO_MODEL_DIR

        if not (DEMO_MODEL_DIR / "model_index.json").is_file():
            raise CLIError(f"no --model and no demo model in {DEMO_MODEL_DIR} (train it: python "
                           "train/train_demo_model.py); give a FLUX.1 pipeline folder, e.g. `huggingface-cli "
                           "download black-forest-labs/FLUX.1-schnell --local-dir FLUX.1-schnell`")
        args.model = str(DEMO_MODEL_DIR)
    from mindflux.hub import is_repo_id

    if is_repo_id(args.model):  # fetched (or found in the Hub cache) when the pipeline loads
        pass
    elif not os.path.isdir(args.model):
        raise CLIError(f"--model {args.model} is neither a folder nor a Hub repo id (org/name)")
    elif not os.path.isfile(os.path.join(args.model, "model_index.json")):
        raise CLIError(f"--model {args.model} has no model_index.json: not a diffusers pipeline folder")
    for name in ("height", "width", "num_images", "num_inference_steps", "max_sequence_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name} must be positive; got {value}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0 (image k uses seed + k); got {args.seed}")
    for name in ("guidance_scale", "true_cfg_scale"):
        if not math.isfinite(getattr(args, name)):
            raise CLIError(f"--{name} must be a finite number; got {getattr(args, name)}")
    if args.max_sequence_length is not None and args.max_sequence_length > 512:
        raise CLIError(f"--max_sequence_length cannot be greater than 512 but is {args.max_sequence_length}")
    for name in ("height", "width"):  # once here, rather than a warning from the pipeline for every image
        value = getattr(args, name)
        if value is not None and value % 16:
            rounded = value // 16 * 16
            if rounded == 0:
                raise CLIError(f"--{name} must be at least 16; got {value}")
            print(f"warning: --{name} {value} is not a multiple of 16; rounded down to {rounded} (as diffusers does)",
                  file=sys.stderr)
            setattr(args, name, rounded)
    loras = [parse_lora(spec) for spec in args.lora]
    for path, scale in loras:
        if not os.path.exists(path):
            raise CLIError(f"LoRA file {path} does not exist")
        if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
            raise CLIError(f"--lora {path}:{scale:g}: the scale must be a finite number within "
                           f"+-{MAX_LORA_SCALE:g}")
    if args.fuse_lora and not loras:
        raise CLIError("--fuse_lora needs at least one --lora")
    from mindflux.outputs import check_writable_folder

    try:  # now, not after minutes of loading
        check_writable_folder(args.output_dir)
    except ValueError as err:
        raise CLIError(str(err)) from None
    return loras


def load_loras(pipe, loras: list[tuple[str, float]], fuse: bool) -> None:
    from mindflux.lora import FORMATS

    names = []
    for index, (path, _) in enumerate(loras):
        name = f"lora_{index}"
        try:
            pipe.load_lora_weights(path, adapter_name=name)
        except (ValueError, OSError, KeyError) as err:
            reason = str(err) or type(err).__name__  # in full: a list of unloadable keys is one line each
            if "accepted formats" not in reason:
                reason += f" (accepted formats: {', '.join(FORMATS)}, as .safetensors)"
            raise CLIError(f"cannot load LoRA file {path}: {reason}") from err
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    if fuse:
        pipe.fuse_lora(adapter_names=names)


def png_info(metadata: dict[str, object]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        if value is not None:
            info.add_text(key, str(value))
    return info


def run(args, saved: list[str]) -> None:
    """Generate every image; `saved` collects the paths written (kept when interrupted)."""
    loras = check_args(args)
    prompts = read_prompts(args)
    from mindflux.hub import is_repo_id, resolve_pipeline
    from mindflux.pipelines.auto import call_arguments_for, image_arguments, pipeline_class_for

    # which family member (img2img, inpaint, Kontext, Fill, Control) and its images: checked before loading;
    # a repo id is fetched (or found in the Hub cache) first, since the class follows from its files
    model_folder = resolve_pipeline(args.model, model_source=args.model_source) if is_repo_id(args.model) \
        else args.model
    pipeline_class = pipeline_class_for(model_folder, image=args.image is not None,
                                        mask_image=args.mask_image is not None,
                                        control_image=args.control_image is not None, control_lora=bool(loras))
    image_call, image_metadata = image_arguments(args.image, args.mask_image, args.control_image, args.strength,
                                                 args.height, args.width)

    import mindspore as ms
    import numpy as np

    import mindflux
    from mindflux.backend import policy, synchronize
    from mindflux.backend.memory import check_model_fits
    from mindflux.inference import RecordWriter, plan_images, shard_jobs, start_clock, summarize
    from mindflux.models.cache_utils import parse_cache_config

    cache = parse_cache_config(args.cache) if args.cache else None  # a bad --cache fails before loading

    device = mindflux.set_device(args.device, args.mode)
    from mindflux.training.distributed import init_distributed

    context = init_distributed()  # under msrun: this process's share of the images (mindflux/inference/batch.py)
    jobs = shard_jobs(plan_images(prompts, args.num_images, args.seed), context.rank, context.world_size)
    device_policy = policy()
    dtype = args.dtype or device_policy.default_dtype
    device_policy.check_dtype(dtype, "--dtype")
    check_model_fits(model_folder, dtype, args.height or 1024, args.width or 1024, args.max_sequence_length or 512,
                     "--dtype")  # images are made one at a time
    print(f"device {device}, {args.mode} mode, {dtype}; loading {args.model}", flush=True)

    start = time.perf_counter()
    pipe = pipeline_class.from_pretrained(model_folder, mindspore_dtype=dtype, model_source=args.model_source)
    if loras:
        load_loras(pipe, loras, args.fuse_lora)
    if args.vae_tiling:
        pipe.enable_vae_tiling(tile_sample_min_size=512)
    if cache is not None:
        pipe.transformer.enable_cache(cache)
    load_s = time.perf_counter() - start

    schnell = not pipe.transformer.config.guidance_embeds
    steps = args.num_inference_steps or (4 if schnell else 28)
    do_cfg = args.negative_prompt is not None and args.true_cfg_scale > 1
    if args.negative_prompt is not None and not do_cfg:
        print("note: --negative_prompt is used only with --true_cfg_scale > 1", flush=True)

    # Every prompt is encoded first, so the text encoders can be freed before denoising starts.
    if args.release_text_encoders:
        pipe.enable_text_encoder_release()  # encoded op by op: compiled encoders could not be freed
    start = time.perf_counter()
    encoded = {i: pipe.encode_prompt(prompts[i], max_sequence_length=args.max_sequence_length)[:2]
               for i in sorted({job.prompt_index for job in jobs})}
    negative = pipe.encode_prompt(args.negative_prompt, max_sequence_length=args.max_sequence_length)[:2] \
        if do_cfg else (None, None)
    synchronize()
    encode_s = time.perf_counter() - start
    if args.release_text_encoders:
        pipe.release_text_encoders()

    from PIL import Image

    from mindflux.outputs import next_free_index, save_new_image

    # Numbers go on after the files already there (every rank reads the folder before any writes), and
    # each image's number is its global index on top: ranks never pick the same name, nothing is replaced.
    base = next_free_index(args.output_dir)
    total = len(jobs)
    step_s, first_steps_s, decode_s, bad = [], [], [], []
    records = RecordWriter(args.output_dir, context)
    start_all = start_clock(context)
    for index, job in enumerate(jobs):
        prompt, seed, (prompt_embeds, pooled) = job.prompt, job.seed, encoded[job.prompt_index]
        started = time.perf_counter()
        stamps: list[float] = []

        def stamp(pipeline, step, timestep, callback_kwargs, stamps=stamps):
            synchronize()  # the device runs ahead of Python; a FLUX step is long enough not to notice
            stamps.append(time.perf_counter())
            return {}

        first = " (the first step includes the graph compile)" if index == 0 and args.mode == "graph" else ""
        pipe.set_progress_bar_config(desc=f"image {index + 1}/{total}{first}", leave=False)
        array = pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative[0],
                     negative_pooled_prompt_embeds=negative[1], true_cfg_scale=args.true_cfg_scale,
                     **call_arguments_for(pipeline_class, image_call), num_inference_steps=steps,
                     guidance_scale=args.guidance_scale, generator=seed, output_type="np",
                     callback_on_step_end=stamp).images[0]
        between = [b - a for a, b in zip(stamps, stamps[1:])]
        step_s += between
        first_steps_s.append(pipe.timings["denoising_s"] - sum(between))
        decode_s.append(pipe.timings["decoding_s"])
        if not np.isfinite(array).all():  # would be saved as a black picture
            bad.append(f"image {job.index + 1} (seed {seed}, prompt {prompt[:40]!r})")
            print(f"error: image {job.index + 1} (seed {seed}) came out NaN/inf: not saved", file=sys.stderr,
                  flush=True)
            continue
        image = Image.fromarray((array * 255).round().astype(np.uint8))  # as the pipeline's "pil" output
        metadata = {"prompt": prompt, "negative_prompt": args.negative_prompt if do_cfg else None, "seed": seed,
                    "steps": steps, "guidance_scale": None if schnell else args.guidance_scale,
                    "true_cfg_scale": args.true_cfg_scale if do_cfg else None, "height": image.height,
                    "width": image.width, "model": os.path.basename(os.path.normpath(args.model)),
                    "lora": " ".join(f"{os.path.basename(p)}:{s:g}" for p, s in loras) or None,
                    "cache": str(cache) if cache else None, "cache_skipped_steps": len(
                        pipe.transformer.cache_skipped_steps["cond"]) if cache else None,
                    "dtype": dtype, "software": f"mindflux {mindflux.__version__}, MindSpore {ms.__version__}",
                    **image_metadata}
        path, _ = save_new_image(image, args.output_dir, base + job.index, f"seed{seed}", pnginfo=png_info(metadata))
        saved.append(path)
        records.write(job, os.path.basename(path), time.perf_counter() - started)
        print(f"{path}  ({prompt[:60]}{'...' if len(prompt) > 60 else ''})", flush=True)
    records.close()
    summary = summarize(context, len(jobs) - len(bad), start_all)  # waits for every process
    if summary:
        print(summary, flush=True)
    if not jobs:
        return

    if bad:
        raise CLIError(f"{len(bad)} of {total} images came out NaN/inf and were not saved ({'; '.join(bad[:3])}): "
                       "check the model, the LoRAs and their scales, or use --dtype fp32")
    # The first step of the first image includes graph compilation (graph mode) or kernel set-up.
    per_step = statistics.median(step_s) if step_s else first_steps_s[0]
    print(f"timing: load {load_s:.1f} s | text encoding {encode_s:.2f} s ({len(encoded)} prompt"
          f"{'s' if len(encoded) > 1 else ''}) | denoising {per_step:.3f} s/step (median; the first step "
          f"{first_steps_s[0]:.2f} s, with {args.mode} start-up) | decoding {statistics.median(decode_s):.2f} s/image"
          f" | {total} image{'s' if total > 1 else ''} in {args.output_dir}")


def main(argv: list[str] | None = None) -> int:
    # Blocked before MindSpore starts any thread (they inherit the mask); see mindflux/interrupts.py.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM))
    try:
        return _main(argv)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _main(argv: list[str] | None) -> int:
    from mindflux.interrupts import exit_code, interrupt_guard

    saved: list[str] = []
    with interrupt_guard("generate.py"):
        args = build_parser().parse_args(argv)
        try:
            run(args, saved)
        except KeyboardInterrupt as err:
            kept = f"{len(saved)} finished image(s) kept in {args.output_dir}" if saved else "no image was finished"
            print(f"generate.py: interrupted; {kept}", file=sys.stderr)
            return exit_code(err)
        except (CLIError, FileNotFoundError, NotADirectoryError, ValueError, TypeError, OSError) as err:
            if args.debug:
                raise
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"generate.py: error: {message}", file=sys.stderr)
            return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
