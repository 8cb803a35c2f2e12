"""The training scripts' batch preparation against diffusers' (fixtures: tests/parity/dump_train_batch.py).

The step core is pinned by test_train_step_parity; this pins the glue that feeds it. Each case
builds the trainer from the script's own argument parsing, feeds the batch builder the draws the
dump recorded (flips, caption drops, the VAE sample's normals, the noise, the timestep-density
draws), and checks, to 1e-6, what reaches the transformer (packed noisy latents, timestep,
guidance, img_ids, txt_ids, prompt rows) and the loss of a recorded stand-in prediction (weighting
scheme, prior-preservation split and weight). Caption dropout is mindflux's own: a dropped row
must carry the empty prompt's embeddings.

The Kontext script's trainer runs the same cases (its reference tokens: test_train_kontext).

Planted once each (2026-12-03), each bug fails all eight batch cases (both scripts): normalising the
latents without the VAE's shift_factor (batches.BatchBuilder with shift_factor 0.0) fails at
"model_input", largest difference 0.042; fixing the guidance at 1.0 (the trainer passing 1.0 for
--guidance_scale 2.5) fails at "guidance", difference 1.5.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from mindflux.safetensors_io import load_file
from mindflux.training.batches import BatchDraws
from mindflux.training.dreambooth import DreamBoothTrainer
from mindflux.training.kontext import KontextTrainer
from mindflux.training.run_config import TrainingConfig
from tests.conftest import FIXTURES
from tests.tiny_flux import make_model_folder

DUMP = FIXTURES / "train_batch"
SCRIPT = Path(__file__).resolve().parents[1] / "train" / "train_dreambooth_lora_flux.py"
KONTEXT_SCRIPT = SCRIPT.with_name("train_dreambooth_lora_flux_kontext.py")
ATOL = 1e-6


def load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder(nn.Cell):
    """Stands in for the transformer: records what it is called with and returns a recorded prediction."""

    def __init__(self, prediction: np.ndarray, config):
        super().__init__()
        self.prediction = ms.Tensor(prediction)
        self.config = config
        self.seen = {}

    def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance=None, return_dict=False):
        self.seen.update(packed_noisy_model_input=hidden_states, prompt_embeds=encoder_hidden_states,
                         pooled_prompt_embeds=pooled_projections, timestep=timestep, img_ids=img_ids,
                         txt_ids=txt_ids, guidance=guidance)
        return (self.prediction,)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("batch") / "model")


def numpy(value) -> np.ndarray:
    return value.float().asnumpy() if isinstance(value, ms.Tensor) else np.asarray(value, np.float32)


def check(name: str, actual, expected) -> None:
    np.testing.assert_allclose(numpy(actual), np.asarray(expected, np.float32), rtol=0, atol=ATOL, err_msg=name)


def trainer_for(case: dict, model_folder: Path, tmp_path: Path, kontext: bool = False) -> DreamBoothTrainer:
    """The trainer as a script builds it: DreamBooth, or Kontext on pairs whose targets are the dump's images
    (each with the other image as its reference, sampled from the VAE posterior as the dump's latents are)."""
    common = ["--pretrained_model_name_or_path", str(model_folder), "--instance_prompt", "a photo of sks thing",
              "--output_dir", str(tmp_path / "out"), "--resolution", "16", "--center_crop", "--random_flip",
              "--device", "cpu", "--mode", "pynative", "--seed", "0", "--report_to", "none",
              "--precomputed_prompt_embeds", str(DUMP / "embeds.safetensors"), "--guidance_scale", "2.5",
              "--weighting_scheme", case["weighting_scheme"], "--logit_mean", "0.3", "--logit_std", "1.2",
              "--mode_scale", "1.29", "--train_batch_size", str(case["batch"])]
    if kontext:
        data = tmp_path / "pairs"
        shutil.copytree(DUMP / "instance", data)
        (data / "metadata.jsonl").write_text("".join(json.dumps({"image": f"0{i}.png", "cond": f"0{1 - i}.png"}) + "\n"
                                                     for i in (0, 1)))
        script = load_script(KONTEXT_SCRIPT, "train_dreambooth_lora_flux_kontext_batch")
        args = script.parse_args(common + ["--dataset_name", str(data), "--cond_image_column", "cond",
                                           "--vae_encode_mode", "sample"])
        return KontextTrainer(TrainingConfig.from_arguments(vars(args)))
    script = load_script(SCRIPT, "train_dreambooth_lora_flux_batch")
    args = common + ["--instance_data_dir", str(DUMP / "instance")]
    if case["with_prior_preservation"]:
        shutil.copytree(DUMP / "class", tmp_path / "class")
        args += ["--with_prior_preservation", "--class_data_dir", str(tmp_path / "class"), "--class_prompt",
                 "a photo of a thing", "--num_class_images", "1", "--prior_loss_weight",
                 str(case["prior_loss_weight"])]
    return DreamBoothTrainer(TrainingConfig.from_arguments(vars(script.parse_args(args))))


def feed(builder, arrays: dict, name: str) -> list:
    """The dump's draws instead of the run's generators, and diffusers' VAE posterior for the pixels the builder
    encodes (the VAE itself is compared at its own precision in test_the_vae_posterior_matches); returns the
    list the encoded pixels are recorded in."""
    eps = arrays[f"{name}.draw.vae_eps"]
    draws = BatchDraws(arrays[f"{name}.flips"].astype(bool), arrays[f"{name}.drops"].astype(bool), eps,
                       arrays[f"{name}.draw.noise"], arrays[f"{name}.draw.density"], cond_eps=np.zeros_like(eps))
    builder.draw = lambda size, shape: draws
    encoded = []

    def encode_moments(pixels):  # the targets first; Kontext's references next (their tokens: test_train_kontext)
        encoded.append(pixels)
        return arrays[f"{name}.latent_mean"], arrays[f"{name}.latent_std"]

    builder.latents.encode_moments = encode_moments
    return encoded


CASES = ["none", "logit_normal", "mode", "cosmap", "sigma_sqrt", "prior"]
SCRIPTS = [(name, False) for name in CASES] + [(name, True) for name in ("none", "logit_normal")]


@pytest.mark.parametrize("name, kontext", SCRIPTS, ids=[f"{n}-{'kontext' if k else 'dreambooth'}" for n, k in SCRIPTS])
def test_batch_inputs_match_diffusers(name, kontext, model_folder, tmp_path):
    case = json.loads((DUMP / "config.json").read_text())["cases"][name]
    arrays = load_file(str(DUMP / "cases.safetensors"))
    embeds = load_file(str(DUMP / "embeds.safetensors"))
    trainer = trainer_for(case, model_folder, tmp_path, kontext)
    trainer.prompts.t5[""] = embeds["empty_prompt_embeds"]  # caption dropout's prompt (not in diffusers' script)
    trainer.prompts.pooled[""] = embeds["empty_pooled_prompt_embeds"]
    encoded = feed(trainer.batches, arrays, name)
    inputs = trainer.batches(list(range(case["batch"])))
    check("pixel_values", encoded[0], arrays[f"{name}.pixel_values"])  # flips, normalisation, [instance; class]
    check("model_input", inputs[0], arrays[f"{name}.model_input"])
    check("sigmas", inputs[2], arrays[f"{name}.sigmas"])
    prediction = arrays[f"{name}.stand_in_prediction"]
    tokens = prediction.shape[1]
    if kontext:  # the transformer also returns outputs for the reference tokens; the loss must not see them
        prediction = np.concatenate([prediction, 100 * np.ones_like(prediction)], axis=1)
    recorder = Recorder(prediction, trainer.transformer.config)
    trainer.transformer = recorder
    loss = trainer.loss_net()(*inputs)
    for key in ("packed_noisy_model_input", "img_ids"):  # the target's part of the sequence
        check(key, recorder.seen[key][..., :tokens, :], arrays[f"{name}.{key}"])
    for key in ("timestep", "guidance", "prompt_embeds", "pooled_prompt_embeds"):
        check(key, recorder.seen[key], arrays[f"{name}.{key}"])
    check("txt_ids", recorder.seen["txt_ids"], np.zeros((7, 3), np.float32))
    np.testing.assert_allclose(float(loss.asnumpy()), float(arrays[f"{name}.loss"]), rtol=1e-6)


def test_the_vae_posterior_matches(model_folder, tmp_path):
    """The latent source's VAE posterior of the dump's pixels: framework rounding in the convolutions only."""
    case = json.loads((DUMP / "config.json").read_text())["cases"]["none"]
    arrays = load_file(str(DUMP / "cases.safetensors"))
    trainer = trainer_for(case, model_folder, tmp_path)
    mean, std = trainer.batches.latents.encode_moments(arrays["none.pixel_values"])
    np.testing.assert_allclose(mean, arrays["none.latent_mean"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(std, arrays["none.latent_std"], rtol=0, atol=1e-5)
