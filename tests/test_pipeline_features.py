"""What every FLUX pipeline inherits from FluxPipeline, checked in each of the six: a LoRA and its per-call
`joint_attention_kwargs={"scale": ...}`, VAE tiling, and batching (lists of prompts and images,
num_images_per_prompt, one generator per image). Tiny models of tests/fixtures, 48 x 48, one denoising step,
PyNative."""

import numpy as np
import pytest

import mindflux.pipelines as pipelines
from mindflux import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from tests.conftest import FIXTURES, max_abs_diff

DUMPS = FIXTURES / "pipelines"
INPUTS = DUMPS / "inputs"
PROMPTS = ["a red circle on a white background", "two small blue triangles in the top left corner"]
SIZE = 48
SEEDS = [11, 12, 13, 14]  # one per image of a 2 prompts x 2 images batch

# pipeline -> (transformer, its own arguments, how many input images a batch gets, batch row -> input image)
PIPELINES = {
    "FluxPipeline": ("transformer", {}, 0, None),
    # strength 0.5 of 2 steps: the second step runs, from the image noised half way (so the image counts)
    "FluxImg2ImgPipeline": ("transformer", {"strength": 0.5, "num_inference_steps": 2}, 4, lambda j: j),
    "FluxInpaintPipeline": ("transformer", {"strength": 0.5, "num_inference_steps": 2, "mask_image": "mask"}, 4,
                            lambda j: j),
    "FluxFillPipeline": ("transformer_fill", {"mask_image": "mask"}, 4, lambda j: j),
    # Kontext encodes the posterior mean (no draw), so 2 images can serve 4 rows: repeated whole, as diffusers
    "FluxKontextPipeline": ("transformer", {"max_area": SIZE * SIZE, "_auto_resize": False}, 2, lambda j: j % 2),
    # control images are repeated per prompt's images (diffusers' repeat_interleave)
    "FluxControlPipeline": ("transformer_control", {}, 2, lambda j: j // 2),
}
IMAGE_ARG = {"FluxControlPipeline": "control_image"}


@pytest.fixture(scope="module")
def loaded():
    from PIL import Image

    base = FluxPipeline.from_pretrained(str(FIXTURES / "pipeline" / "tiny_flux"),
                                        vae=AutoencoderKL.from_pretrained(str(DUMPS / "vae")))
    transformers = {"transformer": base.transformer}
    for name in ("transformer_fill", "transformer_control"):
        transformers[name] = FluxTransformer2DModel.from_pretrained(str(DUMPS / name))
    source = np.asarray(Image.open(INPUTS / "large.png").convert("RGB"), np.float32) / 255
    # four different pictures: crops of one input file, at the call's size
    images = [source[i * 8:i * 8 + SIZE, i * 4:i * 4 + SIZE] for i in range(4)]
    mask = np.zeros((SIZE, SIZE, 1), np.float32)
    mask[8:32, 16:40] = 1
    pipes = {}
    for name, (transformer, _, _, _) in PIPELINES.items():
        pipe = getattr(pipelines, name)(**dict(base.components, transformer=transformers[transformer]))
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    return {"pipes": pipes, "images": images, "mask": mask, "baseline": {}}


def call(loaded, name: str, rows: list[int], **extra) -> tuple[np.ndarray, list[np.ndarray]]:
    """The images for batch rows `rows` of the 2 prompts x 2 images batch (4 rows: the batch itself, one call),
    and the latents after each step."""
    _, own, count, image_of = PIPELINES[name]
    steps = []
    kwargs = {"height": SIZE, "width": SIZE, "num_inference_steps": 1, "max_sequence_length": 16,
              "output_type": "np", "generator": [SEEDS[j] for j in rows], **own,
              "callback_on_step_end": lambda p, i, t, kw: steps.append(kw["latents"].asnumpy()) or {}}
    if len(rows) == 4:
        kwargs.update(prompt=PROMPTS, num_images_per_prompt=2)
    else:
        kwargs["prompt"] = PROMPTS[rows[0] // 2]
    if count:
        chosen = loaded["images"][:count] if len(rows) == 4 else [loaded["images"][image_of(rows[0])]]
        kwargs[IMAGE_ARG.get(name, "image")] = chosen
    if "mask_image" in kwargs:
        kwargs["mask_image"] = loaded["mask"]
    kwargs.update(extra)
    return loaded["pipes"][name](**kwargs).images, steps


def baseline(loaded, name: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Row 0 on its own, no LoRA, no tiling (shared by the tests below)."""
    if name not in loaded["baseline"]:
        loaded["baseline"][name] = call(loaded, name, [0])
    return loaded["baseline"][name]


def lora_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """A diffusers-format rank-4 LoRA on every attention's q/k/v of the tiny transformer (inner width 32)."""
    rng = np.random.default_rng(seed)
    layers = [f"transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("to_q", "to_k", "to_v")]
    layers += [f"single_transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("to_q", "to_k", "to_v")]
    out = {}
    for layer in layers:
        out[f"transformer.{layer}.lora_A.weight"] = rng.standard_normal((4, 32)).astype(np.float32) * 0.3
        out[f"transformer.{layer}.lora_B.weight"] = rng.standard_normal((32, 4)).astype(np.float32) * 0.3
    return out


@pytest.mark.parametrize("name", list(PIPELINES))
def test_lora_and_its_scale(loaded, name):
    pipe, plain = loaded["pipes"][name], baseline(loaded, name)[1][-1]  # the final latents (no VAE decode)
    pipe.load_lora_weights(lora_state_dict(), adapter_name="features")
    try:
        adapted, _ = call(loaded, name, [0], output_type="latent")
        off, _ = call(loaded, name, [0], output_type="latent", joint_attention_kwargs={"scale": 0.0})
    finally:
        pipe.unload_lora_weights()
    assert max_abs_diff(adapted, plain) > 1e-2  # the LoRA reaches the output
    assert max_abs_diff(off, plain) <= 1e-6      # scale 0 switches it off for the call


@pytest.mark.parametrize("name", list(PIPELINES))
def test_vae_tiling(loaded, name):
    """32-pixel tiles over 48-pixel images: the pipeline encodes its input images and decodes its latents through
    the VAE's tiled path (held to diffusers' tiling by test_autoencoder_kl).

    Not checked: closeness to the untiled image. With these tiny random VAEs (a mid-block attention and group
    norms over the whole latent) tiling moves the image by 0.53-0.80 max / 0.06-0.11 mean over the six
    pipelines, about as far as changing the seed and prompt does (0.11-0.21 mean); diffusers' tiling does the same
    (tests/fixtures/vae: tiled and untiled decodes differ by over 0.1)."""
    from mindspore import Tensor

    pipe, (plain, plain_steps) = loaded["pipes"][name], baseline(loaded, name)
    sizes = pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size
    pipe.enable_vae_tiling(tile_sample_min_size=32)
    try:
        tiled, steps = call(loaded, name, [0])
        decoded_tiled = pipe.decode_latents(Tensor(steps[-1]), SIZE, SIZE).asnumpy().transpose(0, 2, 3, 1)
    finally:
        pipe.disable_vae_tiling()
        pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = sizes
    decoded_plain = pipe.decode_latents(Tensor(steps[-1]), SIZE, SIZE).asnumpy().transpose(0, 2, 3, 1)
    assert max_abs_diff(tiled, decoded_tiled) <= 1e-6  # the image is the tiled decode of the call's latents
    assert max_abs_diff(tiled, decoded_plain) > 1e-2   # ... which differs from the untiled decode
    first_step_change = max_abs_diff(steps[0], plain_steps[0])
    if PIPELINES[name][2]:  # input images were encoded in tiles: the latents differ from the first step on
        assert first_step_change > 1e-3 * np.abs(plain_steps[0]).max()
    else:  # text to image: only the decode is tiled
        assert first_step_change == 0
    assert np.isfinite(tiled).all() and tiled.shape == plain.shape


@pytest.mark.parametrize("name", list(PIPELINES))
def test_batch_equals_single_calls(loaded, name):
    """2 prompts x num_images_per_prompt=2 (with their images) give 4 images; image j is the call of row j alone
    with row j's generator: prompt j // 2 and the input image that row is paired with. Rows 0 and 2 differ in
    prompt, generator and (for Kontext and Control, whose images repeat differently) the input image."""
    batch, _ = call(loaded, name, [0, 1, 2, 3])
    assert batch.shape == (4, SIZE, SIZE, 3)
    assert max_abs_diff(batch[0], baseline(loaded, name)[0][0]) <= 1e-5
    assert max_abs_diff(batch[2], call(loaded, name, [2])[0][0]) <= 1e-5
    assert max_abs_diff(batch[0], batch[2]) > 1e-2  # the rows differ: the checks above can tell them apart


def test_pipelines_and_training_read_files_alike(tmp_path):
    """One loader (mindflux.image_processor.load_image) for pipeline inputs and training data: a 16-bit greyscale
    PNG is scaled by its bit depth in both (not clipped to white); transparency is dropped as diffusers drops it for
    pipeline inputs (a mask painted on a transparent layer keeps its black), composited over white for training."""
    from PIL import Image

    from mindflux import image_processor
    from mindflux.training.dataset import load_image as training_load_image

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    pixels = image_processor.preprocess(str(tmp_path / "grey16.png"), name="image")  # (1, 3, 32, 32) in [-1, 1]
    expected = np.round(ramp / 65535 * 255) / 255 * 2 - 1
    assert np.abs(pixels[0, 0] - expected).max() <= 1e-6
    np.testing.assert_array_equal(np.asarray(training_load_image(str(tmp_path / "grey16.png"))),
                                  np.asarray(image_processor.load_image(str(tmp_path / "grey16.png"))))
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[4:12, 4:12] = 255  # an opaque white square on a transparent black layer
    Image.fromarray(rgba).save(tmp_path / "mask.png")
    mask = image_processor.preprocess(str(tmp_path / "mask.png"), name="mask_image", mask=True)
    assert mask.sum() == 64 and mask[0, 0, 4:12, 4:12].all()
    assert np.asarray(training_load_image(str(tmp_path / "mask.png"))).min() == 255


def test_fill_and_mask_inputs_fail_before_model_work(loaded, tmp_path):
    """What tests/test_pipelines.py checks for Inpaint and Img2Img, for Fill and the mask file: the error names the
    argument or file and comes before prompt encoding (the text encoders are gone, which would fail otherwise)."""
    fill = loaded["pipes"]["FluxFillPipeline"]
    bare = type(fill)(**dict(fill.components, text_encoder=None, text_encoder_2=None))
    call = dict(prompt="a cat", height=SIZE, width=SIZE, num_inference_steps=2, output_type="latent")
    image, mask = loaded["images"][0], loaded["mask"]
    with pytest.raises(ValueError, match=r"`mask_image` is \(32, 48\).*`image` is \(48, 48\)"):
        bare(**call, image=image, mask_image=mask[:32])
    with pytest.raises(ValueError, match="strength should in"):
        bare(**call, image=image, mask_image=mask, strength=-0.1)
    broken = tmp_path / "mask.png"
    broken.write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=f"`mask_image`: cannot read image file {broken}"):
        bare(**call, image=image, mask_image=str(broken))
    with pytest.raises(ValueError, match="x_embedder takes 128: load it with FluxControlPipeline"):
        pipelines.FluxFillPipeline(**dict(bare.components, transformer=loaded["pipes"]["FluxControlPipeline"]
                                          .transformer))(**call, image=image, mask_image=mask)
