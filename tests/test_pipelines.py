"""The FLUX.1 family pipelines (Img2Img, Inpaint, Kontext, Fill, Control) against diffusers 0.35.2
(tests/parity/dump_pipelines.py): the same tiny models and input files, diffusers' own random draws fed through
`noise_source`, every step's latents and the images compared; loading, dispatch and bad inputs."""

import hashlib
import json
import re

import numpy as np
import pytest
from mindspore import Tensor

import mindflux.pipelines as pipelines
from mindflux import AutoencoderKL, DiffusionPipeline, FluxPipeline, FluxTransformer2DModel
from tests.conftest import FIXTURES, load_cases, max_abs_diff

DUMPS = FIXTURES / "pipelines"
INPUTS = DUMPS / "inputs"
META = json.loads((DUMPS / "cases.json").read_text(encoding="utf-8"))
CASES = META["cases"]
REF = load_cases(DUMPS / "cases.safetensors")
IMAGE_TOL = 0.5 / 255  # the bound on images in [0, 1]
LATENT_TOL = 1e-3      # relative to each step's largest latent


@pytest.fixture(scope="module")
def components():
    base = FluxPipeline.from_pretrained(str(FIXTURES / "pipeline" / "tiny_flux"),
                                        vae=AutoencoderKL.from_pretrained(str(DUMPS / "vae")))
    return base.components


@pytest.fixture(scope="module")
def transformers(components):
    loaded = {"transformer": components["transformer"]}
    for name in ("transformer_fill", "transformer_control"):
        loaded[name] = FluxTransformer2DModel.from_pretrained(str(DUMPS / name))
    return loaded


def make_pipe(components, transformers, name: str):
    case = CASES[name]
    pipe = getattr(pipelines, case["pipeline"])(
        **dict(components, transformer=transformers[case.get("transformer", "transformer")]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def feed_draws(pipe, name: str) -> list:
    """diffusers' draws, in its order, served to the pipeline's randn; returns the ones left over."""
    draws = [REF[f"{name}.draws.{i}"] for i in range(sum(k.startswith(f"{name}.draws.") for k in REF))]

    def source(shape):
        assert draws, f"mindflux drew {shape} more than diffusers did"
        draw = draws.pop(0)
        assert draw.shape == shape, (draw.shape, shape)
        return draw

    pipe.noise_source = source
    return draws


def call_of(name: str) -> dict:
    call = dict(CASES[name]["call"])
    for key in ("image", "mask_image", "control_image"):
        if key in call:
            call[key] = str(INPUTS / call[key])  # file paths: the loading path is checked too
    if f"{name}.latents" in REF:
        call["latents"] = REF[f"{name}.latents"]
    return call


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers(components, transformers, name):
    pipe = make_pipe(components, transformers, name)
    left = feed_draws(pipe, name)
    steps = []
    crop = CASES[name]["call"].get("padding_mask_crop") is not None  # PIL output, pasted into the original
    images = pipe(**call_of(name), generator=0, output_type="pil" if crop else "np",
                  callback_on_step_end=lambda p, i, t, kw: steps.append(kw["latents"].asnumpy()) or {}).images
    if crop:
        images = np.stack([np.asarray(i, np.float32) / 255 for i in images])
    ref_steps = REF[f"{name}.step_latents"]
    assert len(steps) == len(ref_steps)
    for got, expected in zip(steps, ref_steps):
        assert max_abs_diff(got, expected) <= LATENT_TOL * np.abs(expected).max()
    ref = REF[f"{name}.images"]
    assert images.shape == ref.shape
    # 8-bit images: a value within 0.5/255 of a rounding edge may land one level away
    assert max_abs_diff(images, ref) <= (1 / 255 + 1e-6 if crop else IMAGE_TOL)
    if crop:
        assert np.mean(np.abs(images - ref) > 1e-6) < 0.01
    # Inpaint's 64-channel transformer does not use the masked image, which diffusers still encodes (its last draw)
    assert len(left) == (1 if CASES[name]["pipeline"] == "FluxInpaintPipeline" else 0)


def test_decode_step_matches_diffusers(components):
    """Packed latents -> images on their own: unpack, / scaling + shift, VAE decode, [-1, 1] -> [0, 1]."""
    pipe = FluxPipeline(**components)
    images = pipe.decode_latents(Tensor(REF["decode.latents"]), 64, 48).asnumpy().transpose(0, 2, 3, 1)
    assert max_abs_diff(images, REF["decode.images"]) <= 2e-6


def test_kontext_sizes():
    """The output size (max_area at the requested aspect ratio) and the reference image's size (the preferred
    Kontext resolution nearest its aspect ratio, or its own) that diffusers chose for the same arguments."""
    from mindflux.pipelines.flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS, kontext_sizes

    assert [list(r) for r in PREFERRED_KONTEXT_RESOLUTIONS] == META["preferred_kontext_resolutions"]
    for expected in META["kontext_sizes"]:
        image_height, image_width, height, width, max_area, auto = expected["case"]
        size, reference = kontext_sizes(height or 1024, width or 1024, max_area, (image_height, image_width), auto)
        assert size == (expected["height"], expected["width"]) and \
            reference == (expected["image_height"], expected["image_width"]), expected


def test_dispatch_from_model_index_and_inputs(tmp_path):
    from mindflux.pipelines.auto import pipeline_class_for

    folder = FIXTURES / "pipeline" / "tiny_flux"
    assert pipeline_class_for(folder) is pipelines.FluxPipeline
    assert pipeline_class_for(folder, image=True) is pipelines.FluxImg2ImgPipeline
    assert pipeline_class_for(folder, image=True, mask_image=True) is pipelines.FluxInpaintPipeline
    index = json.loads((folder / "model_index.json").read_text())
    for class_name, expected in (("FluxKontextPipeline", pipelines.FluxKontextPipeline),
                                 ("FluxFillPipeline", pipelines.FluxFillPipeline),
                                 ("FluxControlPipeline", pipelines.FluxControlPipeline)):
        (tmp_path / "model_index.json").write_text(json.dumps(dict(index, _class_name=class_name)))
        flags = {"FluxFillPipeline": dict(image=True, mask_image=True),
                 "FluxControlPipeline": dict(control_image=True)}.get(class_name, dict(image=True))
        assert pipeline_class_for(tmp_path, **flags) is expected
    # diffusers' folders of each family member load as that class (the registry fills DiffusionPipeline's table)
    for name in ("scheduler", "vae", "tokenizer", "tokenizer_2", "transformer"):
        (tmp_path / name).symlink_to(folder / name)
    (tmp_path / "model_index.json").write_text(json.dumps(dict(index, _class_name="FluxKontextPipeline")))
    assert type(DiffusionPipeline.from_pretrained(str(tmp_path), text_encoder=None, text_encoder_2=None)) \
        is pipelines.FluxKontextPipeline
    with pytest.raises(ValueError, match="--mask_image needs --image"):
        pipeline_class_for(folder, mask_image=True)
    with pytest.raises(ValueError, match="--control_image.*FLUX.1-Canny"):
        pipeline_class_for(folder, control_image=True)
    assert type(DiffusionPipeline.from_pretrained(str(folder), text_encoder=None, text_encoder_2=None)) \
        is pipelines.FluxPipeline


def test_bad_inputs_fail_before_model_work(components, transformers, tmp_path):
    """Each error names the argument or file, and comes before prompt encoding (the text encoders are gone,
    which would be a different error)."""
    bare = dict(components, text_encoder=None, text_encoder_2=None)
    call = dict(prompt="a cat", height=64, width=48, num_inference_steps=2, output_type="latent")
    image, mask = str(INPUTS / "image.png"), str(INPUTS / "mask.png")
    inpaint = pipelines.FluxInpaintPipeline(**bare)
    with pytest.raises(ValueError, match=r"`mask_image` is \(90, 110\).*`image` is \(64, 48\)"):
        inpaint(**call, image=image, mask_image=str(INPUTS / "large.png"))
    with pytest.raises(ValueError, match="strength should in"):
        pipelines.FluxImg2ImgPipeline(**bare)(**call, image=image, strength=1.5)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        pipelines.FluxImg2ImgPipeline(**bare)(**call, image=image, strength=0.0)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"`image`: cannot read image file {broken}"):
        inpaint(**call, image=str(broken), mask_image=mask)
    with pytest.raises(ValueError, match="`control_image` needs a control transformer"):
        pipelines.FluxControlPipeline(**bare)(**call, control_image=str(INPUTS / "control.png"))
    with pytest.raises(ValueError, match="x_embedder takes 384: load it with FluxFillPipeline"):
        FluxPipeline(**dict(bare, transformer=transformers["transformer_fill"]))(**call)
    with pytest.raises(ValueError, match="x_embedder takes 128: load it with FluxControlPipeline"):
        pipelines.FluxImg2ImgPipeline(**dict(bare, transformer=transformers["transformer_control"]))(
            **call, image=image)
    with pytest.raises(TypeError, match=r"unexpected arguments \['mask_image'\]"):
        pipelines.FluxImg2ImgPipeline(**bare)(**call, image=image, mask_image=mask)


def test_control_lora_widens_x_embedder_as_diffusers(components):
    """A control LoRA's x_embedder adapter reads 128 channels: loading it into the 64-wide dev transformer widens
    x_embedder (zero columns) and in_channels, and the transformer then gives diffusers' outputs."""
    transformer = FluxTransformer2DModel.from_pretrained(str(FIXTURES / "pipeline" / "tiny_flux" / "transformer"))
    pipe = pipelines.FluxControlPipeline(**dict(components, transformer=transformer))
    pipe.load_lora_weights(str(DUMPS / "control_lora.safetensors"))
    assert pipe.transformer.config.in_channels == 128
    pipe.check_transformer()  # the control pipeline now takes it
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance", "img_ids",
             "txt_ids")
    output = pipe.transformer(**{n: Tensor(REF[f"control_lora.{n}"]) for n in names}, return_dict=False)[0]
    expected = REF["control_lora.output"]
    assert max_abs_diff(output, expected) <= 1e-4 * np.abs(expected).max()  # measured 1.9e-5, as the LoRA files


def test_single_file_in_channels_from_img_in(tmp_path):
    """A BFL single file of FLUX.1-Fill (img_in 384 wide) builds a transformer with in_channels 384."""
    from mindflux.safetensors_io import load_file, save_file

    state = load_file(str(FIXTURES / "transformer" / "flux_dev_bfl.safetensors"))
    weight = np.asarray(state["img_in.weight"], np.float32)
    wide = np.concatenate([weight, np.random.default_rng(0).standard_normal(
        (weight.shape[0], 384 - weight.shape[1])).astype(np.float32)], axis=1)
    state["img_in.weight"] = wide
    save_file({k: (np.asarray(v, np.float32), "F32") for k, v in state.items()}, str(tmp_path / "fill.safetensors"))
    model = FluxTransformer2DModel.from_single_file(str(tmp_path / "fill.safetensors"), axes_dims_rope=[4, 6, 6])
    assert model.config.in_channels == 384 and model.config.out_channels == state["final_layer.linear.weight"].shape[0]
    np.testing.assert_array_equal(model.x_embedder.weight.asnumpy(), wide)


def _generate_cli():
    import sys

    sys.path.insert(0, str(FIXTURES.parents[1] / "infer"))
    import generate

    return generate


@pytest.mark.parametrize("flags, message", [
    (["--image", INPUTS / "image.png", "--mask_image", INPUTS / "large.png"], "--mask_image .* is 110x90 but --image"),
    (["--image", INPUTS / "image.png", "--strength", "1.5"], r"--strength must be in \[0, 1\]; got 1.5"),
    (["--mask_image", INPUTS / "mask.png"], "--mask_image needs --image"),
    (["--control_image", INPUTS / "control.png"], "--control_image needs a control model"),
    (["--image", "/no/such/image.png"], "--image /no/such/image.png: cannot read it"),
])
def test_generate_image_flags_fail_before_loading(flags, message, capsys):
    generate = _generate_cli()
    rc = generate.main(["--model", str(FIXTURES / "pipeline" / "tiny_flux"), "--prompt", "x", "--device", "cpu",
                        *map(str, flags)])
    err = capsys.readouterr().err
    assert rc == 1 and "loading" not in err
    assert re.search(message, err), err


def test_generate_inpaints_with_input_hashes(tmp_path, capsys):
    """--image and --mask_image choose FluxInpaintPipeline; the PNG is the pipeline's and records the inputs."""
    from PIL import Image

    generate = _generate_cli()
    model = FIXTURES / "pipeline" / "tiny_flux"
    rc = generate.main(["--model", str(model), "--prompt", "a blue square", "--device", "cpu", "--mode", "pynative",
                        "--max_sequence_length", "16", "--steps", "2", "--seed", "3", "--strength", "0.9",
                        "--image", str(INPUTS / "image.png"), "--mask_image", str(INPUTS / "mask.png"),
                        "--output_dir", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    image = Image.open(tmp_path / "000_seed3.png")
    assert image.size == (48, 64)  # the input image's size
    assert image.text["image_sha256"] == hashlib.sha256((INPUTS / "image.png").read_bytes()).hexdigest()
    assert image.text["mask_image_sha256"] == hashlib.sha256((INPUTS / "mask.png").read_bytes()).hexdigest()
    assert image.text["strength"] == "0.9"
    pipe = pipelines.FluxInpaintPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a blue square", image=str(INPUTS / "image.png"), mask_image=str(INPUTS / "mask.png"),
                    strength=0.9, height=64, width=48, num_inference_steps=2, guidance_scale=3.5, generator=3,
                    max_sequence_length=16)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.images[0]))
