"""Reference images of diffusers' FLUX.1 family pipelines on tiny models (issue 17).

Topic "pipelines" writes tests/fixtures/pipelines/ (after topic "pipeline", whose tiny_flux folder gives the
text encoders, tokenizers, scheduler and the dev transformer):
  vae/                  tiny_flux's VAE with the encoder's log-variance fixed at -30 (conv_out weight 0, bias -30 on
                        those channels): a posterior sample equals its mean to 3e-7, so image -> latents is exact
  transformer_fill/     a FLUX.1-Fill-shaped transformer (x_embedder 384 wide: 64 latent + 64 masked image + 256 mask)
  transformer_control/  a FLUX.1-Canny/Depth-shaped transformer (x_embedder 128 wide: 64 latent + 64 control)
  control_lora.safetensors  a control LoRA (x_embedder adapter 128 wide) that diffusers widened the dev transformer for
  inputs/               the PNGs the cases read (an image, a larger image that is resized, a mask, a control image)
  cases.safetensors     per case: images (np), the latents after every step, every random draw diffusers made
                        (draws.K, in order: VAE posterior samples and noise) and given `latents`
  cases.json            the call arguments of each case (images by file name), and diffusers' Kontext resolutions
"""

from __future__ import annotations

import json
from pathlib import Path

from .dump_pipeline import FIXTURES, TRANSFORMER, init_transformer

PROMPTS = ["a red circle on a white background", "two small blue triangles in the top left corner"]
COMMON = dict(max_sequence_length=16, generator_seed=0)
# Each case: the pipeline class, its call (images as file names under inputs/; "latents": the shape of given
# latents drawn here), the transformer folder.
CASES = {
    "img2img": dict(pipeline="FluxImg2ImgPipeline", call=dict(
        prompt=PROMPTS, image="image.png", height=64, width=48, strength=0.75, num_inference_steps=4,
        guidance_scale=3.5)),
    "img2img_latents": dict(pipeline="FluxImg2ImgPipeline", latents=[2, 12, 64], call=dict(
        prompt=PROMPTS[1], image="large.png", height=48, width=64, strength=0.5, num_inference_steps=4,
        num_images_per_prompt=2, guidance_scale=3.5)),
    "inpaint": dict(pipeline="FluxInpaintPipeline", call=dict(
        prompt=PROMPTS, image="image.png", mask_image="mask.png", height=64, width=48, strength=0.8,
        num_inference_steps=3, guidance_scale=3.5)),
    "inpaint_latents": dict(pipeline="FluxInpaintPipeline", latents=[2, 16, 8, 6], call=dict(
        prompt=PROMPTS[0], image="image.png", mask_image="mask.png", height=64, width=48, strength=1.0,
        num_inference_steps=2, num_images_per_prompt=2, guidance_scale=3.5, padding_mask_crop=4)),
    "kontext": dict(pipeline="FluxKontextPipeline", call=dict(
        prompt=PROMPTS, image="image.png", height=48, width=64, max_area=48 * 64, _auto_resize=False,
        num_inference_steps=3, guidance_scale=2.5)),
    "kontext_latents": dict(pipeline="FluxKontextPipeline", latents=[2, 12, 64], call=dict(
        prompt=PROMPTS[1], image="large.png", height=64, width=48, max_area=64 * 48, _auto_resize=False,
        num_inference_steps=2, num_images_per_prompt=2, guidance_scale=2.5)),
    "fill": dict(pipeline="FluxFillPipeline", transformer="transformer_fill", call=dict(
        prompt=PROMPTS, image="image.png", mask_image="mask.png", height=64, width=48, num_inference_steps=3,
        guidance_scale=30.0)),
    "fill_latents": dict(pipeline="FluxFillPipeline", transformer="transformer_fill", latents=[2, 12, 64], call=dict(
        prompt=PROMPTS[0], image="image.png", mask_image="mask.png", height=64, width=48, strength=0.7,
        num_inference_steps=3, num_images_per_prompt=2, guidance_scale=30.0)),
    "control": dict(pipeline="FluxControlPipeline", transformer="transformer_control", call=dict(
        prompt=PROMPTS, control_image="control.png", height=64, width=48, num_inference_steps=3,
        guidance_scale=10.0)),
    "control_latents": dict(pipeline="FluxControlPipeline", transformer="transformer_control", latents=[2, 12, 64],
                            call=dict(prompt=PROMPTS[1], control_image="control.png", height=48, width=64,
                                      num_inference_steps=2, num_images_per_prompt=2, guidance_scale=10.0)),
}
for _case in CASES.values():
    _case["call"].update(max_sequence_length=COMMON["max_sequence_length"])


def pipeline_folder(out: Path) -> Path:
    """tiny_flux regenerated in this run if there is one, else the committed one."""
    fresh = out.parent / "pipeline" / "tiny_flux"
    return fresh if (fresh / "model_index.json").is_file() else FIXTURES / "pipeline" / "tiny_flux"


def write_inputs(folder: Path) -> None:
    """Smooth colour fields with a few shapes (so the VAE sees structure), a rectangular mask, a control image."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(17)

    def picture(height: int, width: int) -> np.ndarray:
        yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
        base = rng.uniform(0.2, 0.8, (3, 1, 1)) * yy + rng.uniform(0.2, 0.8, (3, 1, 1)) * xx
        top, left = height // 4, width // 3
        base[:, top:top + height // 3, left:left + width // 3] = rng.uniform(0, 1, (3, 1, 1))
        return (np.clip(base.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)

    Image.fromarray(picture(64, 48)).save(folder / "image.png")
    Image.fromarray(picture(90, 110)).save(folder / "large.png")  # resized by the pipelines
    mask = np.zeros((64, 48), np.uint8)
    mask[16:44, 8:36] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    edges = np.zeros((64, 48, 3), np.uint8)
    edges[8:56:8, :] = 255
    edges[:, 6:42:12] = 255
    Image.fromarray(edges).save(folder / "control.png")


def build_models(out: Path, generator) -> None:
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    vae = AutoencoderKL.from_pretrained(str(pipeline_folder(out) / "vae"))
    channels = vae.config.latent_channels
    with torch.no_grad():  # log-variance -30: posterior samples are the mean to 3e-7 (std = exp(-15))
        vae.encoder.conv_out.weight[channels:] = 0
        vae.encoder.conv_out.bias[channels:] = -30
    vae.save_pretrained(out / "vae")
    for name, in_channels in (("transformer_fill", 384), ("transformer_control", 128)):
        model = FluxTransformer2DModel(**dict(TRANSFORMER, in_channels=in_channels, out_channels=64))
        init_transformer(model, generator)
        model.save_pretrained(out / name)


class DrawRecorder:
    """Wraps diffusers' randn_tensor where the pipelines and the VAE posterior call it; keeps every draw."""

    def __init__(self) -> None:
        self.draws = []
        self._patched = []

    def __enter__(self):
        import importlib

        from diffusers.utils import torch_utils

        original = torch_utils.randn_tensor

        def recording(*args, **kwargs):
            value = original(*args, **kwargs)
            self.draws.append(value.clone())
            return value

        for name in ("diffusers.models.autoencoders.vae", "diffusers.pipelines.flux.pipeline_flux_img2img",
                     "diffusers.pipelines.flux.pipeline_flux_inpaint", "diffusers.pipelines.flux.pipeline_flux_fill",
                     "diffusers.pipelines.flux.pipeline_flux_kontext",
                     "diffusers.pipelines.flux.pipeline_flux_control"):
            module = importlib.import_module(name)
            self._patched.append((module, module.randn_tensor))
            module.randn_tensor = recording
        return self

    def __exit__(self, *exc) -> None:
        for module, original in self._patched:
            module.randn_tensor = original


def run_case(components: dict, out: Path, name: str, generator) -> dict:
    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    case = CASES[name]
    call = dict(case["call"])
    for key in ("image", "mask_image", "control_image"):
        if key in call:
            call[key] = Image.open(out / "inputs" / call[key])
    arrays = {}
    if "latents" in case:
        call["latents"] = arrays["latents"] = torch.randn(case["latents"], generator=generator)
    pipe = getattr(diffusers, case["pipeline"])(**components)
    pipe.set_progress_bar_config(disable=True)
    steps = []

    def record(pipeline, step, timestep, callback_kwargs):
        steps.append(callback_kwargs["latents"].clone())
        return {}

    # padding_mask_crop pastes PIL images back into the original: 8-bit output
    output_type = "pil" if call.get("padding_mask_crop") is not None else "np"
    with torch.no_grad(), DrawRecorder() as recorder:
        images = pipe(**call, generator=torch.Generator().manual_seed(COMMON["generator_seed"]),
                      output_type=output_type, callback_on_step_end=record).images
    if output_type == "pil":
        images = np.stack([np.asarray(i, np.float32) / 255 for i in images])
    arrays.update(images=torch.from_numpy(images), step_latents=torch.stack(steps))
    arrays.update({f"draws.{i}": d for i, d in enumerate(recorder.draws)})
    return {f"{name}.{k}": v for k, v in arrays.items()}


# (image height, image width, height, width, max_area, _auto_resize) -> the sizes diffusers' Kontext call picks
KONTEXT_SIZE_CASES = [(768, 1024, None, None, 1024 ** 2, True), (1000, 1000, 512, 768, 512 ** 2, True),
                      (90, 110, 64, 48, 64 * 48, False), (1200, 500, 1024, 1024, 1024 ** 2, True)]


def kontext_sizes(components: dict) -> list[dict]:
    """The output size and the reference image's size diffusers' FluxKontextPipeline chooses, read where it
    prepares the latents (the call stops there, before any denoising)."""
    import torch
    from diffusers import FluxKontextPipeline
    from PIL import Image

    class Stop(Exception):
        pass

    pipe = FluxKontextPipeline(**components)
    found = []

    def prepare_latents(image, batch_size, channels, height, width, *args, **kwargs):
        found.append(dict(height=height, width=width, image_height=image.shape[2], image_width=image.shape[3]))
        raise Stop

    pipe.prepare_latents = prepare_latents
    embeds, pooled = torch.zeros(1, 4, 32), torch.zeros(1, 16)
    for image_height, image_width, height, width, max_area, auto in KONTEXT_SIZE_CASES:
        try:
            pipe(image=Image.new("RGB", (image_width, image_height)), prompt_embeds=embeds,
                 pooled_prompt_embeds=pooled, height=height, width=width, max_area=max_area, _auto_resize=auto)
        except Stop:
            found[-1].update(case=[image_height, image_width, height, width, max_area, auto])
    return found


def control_lora(out: Path, components: dict, generator) -> dict:
    """A Canny/Depth-style control LoRA (x_embedder adapter reading 128 channels, plus attention adapters) in
    diffusers' format, loaded by diffusers into the 64-wide dev transformer; its widened config and outputs."""
    import torch
    from diffusers import FluxControlPipeline
    from safetensors.torch import save_file

    transformer = components["transformer"]
    dim, rank = transformer.inner_dim, 4
    state = {"transformer.x_embedder.lora_A.weight": 0.2 * torch.randn(rank, 128, generator=generator),
             "transformer.x_embedder.lora_B.weight": 0.2 * torch.randn(dim, rank, generator=generator)}
    for target in ("to_q", "to_k", "to_v"):
        state[f"transformer.transformer_blocks.0.attn.{target}.lora_A.weight"] = \
            0.2 * torch.randn(rank, dim, generator=generator)
        state[f"transformer.transformer_blocks.0.attn.{target}.lora_B.weight"] = \
            0.2 * torch.randn(dim, rank, generator=generator)
    save_file(state, str(out / "control_lora.safetensors"))
    from diffusers import FluxTransformer2DModel

    fresh = FluxTransformer2DModel.from_pretrained(str(pipeline_folder(out) / "transformer"))
    pipe = FluxControlPipeline(**dict(components, transformer=fresh))
    pipe.load_lora_weights(str(out / "control_lora.safetensors"))
    inputs = dict(hidden_states=torch.randn(2, 12, 128, generator=generator),
                  encoder_hidden_states=torch.randn(2, 4, 32, generator=generator),
                  pooled_projections=torch.randn(2, 16, generator=generator), timestep=torch.tensor([0.7, 0.3]),
                  guidance=torch.tensor([3.5, 3.5]), img_ids=torch.zeros(12, 3), txt_ids=torch.zeros(4, 3))
    inputs["img_ids"][:, 1] = torch.arange(12) // 4
    inputs["img_ids"][:, 2] = torch.arange(12) % 4
    with torch.no_grad():
        output = pipe.transformer(**inputs, return_dict=False)[0]
    assert pipe.transformer.config.in_channels == 128
    return {**{f"control_lora.{k}": v for k, v in inputs.items()}, "control_lora.output": output}


def make_reference(out: Path) -> None:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    from .torch_common import save_arrays, seed

    generator = seed(1700)
    write_inputs(out / "inputs")
    build_models(out, generator)
    base = FluxPipeline.from_pretrained(str(pipeline_folder(out)), torch_dtype=torch.float32)
    transformers = {"transformer": base.transformer}
    for name in ("transformer_fill", "transformer_control"):
        transformers[name] = FluxTransformer2DModel.from_pretrained(str(out / name))
    vae = AutoencoderKL.from_pretrained(str(out / "vae"))
    arrays = {}
    for name, case in CASES.items():
        components = dict(base.components, vae=vae, transformer=transformers[case.get("transformer", "transformer")])
        components = {k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
        arrays.update(run_case(components, out, name, generator))
        images = arrays[f"{name}.images"].numpy()
        assert np.mean((images == 0) | (images == 1)) < 0.2 and images.std() > 0.05, (name, images.std())
    # the decode step on its own: packed latents -> images, through the sampled-VAE folder's decoder
    latents = torch.randn((2, 12, 64), generator=generator)
    with torch.no_grad():
        unpacked = base._unpack_latents(latents, 64, 48, base.vae_scale_factor)
        decoded = vae.decode(unpacked / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        arrays.update({"decode.latents": latents, "decode.images": base.image_processor.postprocess(
            decoded, output_type="pt").permute(0, 2, 3, 1)})
    arrays.update(control_lora(out, {k: v for k, v in base.components.items()
                                     if k not in ("image_encoder", "feature_extractor")}, generator))
    save_arrays(out / "cases.safetensors", arrays)
    meta = {"cases": CASES, "preferred_kontext_resolutions": [list(r) for r in PREFERRED_KONTEXT_RESOLUTIONS],
            "kontext_sizes": kontext_sizes(dict(base.components))}
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
