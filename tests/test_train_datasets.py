"""--dataset_name through the `datasets` library (mindflux.training.data_source), against the local metadata.jsonl form.

The same image pairs and captions are written three ways: a metadata.jsonl folder (the local reader), a
Dataset with Image columns written by save_to_disk (read with load_from_disk; the images travel as PNG
bytes), and a parquet folder whose image columns hold paths relative to it (read with load_dataset and
--cache_dir), and a Hub id read offline from a datasets cache. Every form gives the same pixels and
captions, and a Kontext run on the saved dataset writes the same LoRA as one on the folder. Bad input
stops with one line before any model is loaded.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mindflux.safetensors_io import load_file
from mindflux.training.data_source import EncodedImage, read_data_source
from mindflux.training.dataset import DreamBoothDataset
from mindflux.training.kontext import KontextDataset
from tests.tiny_flux import make_images, make_model_folder

datasets = pytest.importorskip("datasets")  # the test extra installs it (setup.py)

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_datasets", ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kontext_script = load_script("train_dreambooth_lora_flux_kontext")
dreambooth_script = load_script("train_dreambooth_lora_flux")
PROMPT = "a photo of sks thing"
CAPTIONS = ["invert the colours", None, "make it a negative", "invert it"]  # row 1 falls back on --instance_prompt


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """{"model", "folder", "saved", "parquet"}: a tiny model and one set of pairs in the three forms."""
    root = tmp_path_factory.mktemp("datasets")
    make_model_folder(root / "model")
    folder = root / "folder"
    make_images(folder / "in", count=4, size=40)
    (folder / "out").mkdir()
    targets = [f"out/{i:02d}.png" for i in range(4)]
    references = [f"in/{i:02d}.png" for i in range(4)]
    for target, reference in zip(targets, references):
        Image.fromarray(255 - np.asarray(Image.open(folder / reference))).save(folder / target)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for target, reference, caption in zip(targets, references, CAPTIONS):
            f.write(json.dumps({"image": target, "cond_image": reference, "text": caption}) + "\n")

    def pil(path):  # decoded pixels without a file name: datasets stores them as encoded bytes
        return Image.fromarray(np.asarray(Image.open(folder / path)))

    features = datasets.Features({"image": datasets.Image(), "cond_image": datasets.Image(),
                                  "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [pil(p) for p in targets], "cond_image": [pil(p) for p in references],
                                "text": CAPTIONS}, features=features).save_to_disk(str(root / "saved"))
    (root / "parquet").mkdir()
    for sub in ("in", "out"):
        (root / "parquet" / sub).symlink_to(folder / sub, target_is_directory=True)
    datasets.Dataset.from_dict({"image": targets, "cond_image": references, "text": CAPTIONS}).to_parquet(
        str(root / "parquet" / "train.parquet"))
    return {"model": root / "model", "folder": folder, "saved": root / "saved", "parquet": root / "parquet",
            "cache": root / "cache"}


def kontext_dataset(source):
    return KontextDataset(source, PROMPT, 32, repeats=2, rng=np.random.default_rng(0))


def test_every_form_gives_the_same_pixels_and_captions(forms):
    """Random crops drawn in row order from one seed: equal pixels mean equal images in equal order."""
    local = read_data_source(None, str(forms["folder"]), "image", None, "cond_image", instance_prompt=PROMPT)
    saved = read_data_source(None, str(forms["saved"]), "image", None, "cond_image", instance_prompt=PROMPT)
    parquet = read_data_source(None, str(forms["parquet"]), "image", "text", "cond_image",
                               cache_dir=str(forms["cache"]), instance_prompt=PROMPT)
    assert all(isinstance(ref, EncodedImage) for ref in saved.images + saved.references)
    assert all(isinstance(ref, str) for ref in parquet.images + parquet.references)
    assert any(forms["cache"].iterdir())  # load_dataset kept its cache under --cache_dir
    expected = kontext_dataset(local)
    assert expected.captions[2:4] == [PROMPT] * 2 and expected.captions[0] == CAPTIONS[0]
    for source in (saved, parquet):
        data = kontext_dataset(source)
        assert data.captions == expected.captions
        for a, b in zip(data.images + data.references, expected.images + expected.references):
            np.testing.assert_array_equal(a, b)
    # the DreamBooth dataset takes the same source (its targets and captions)
    dreambooth = DreamBoothDataset(saved.name, PROMPT, 32, rng=np.random.default_rng(0),
                                   source=saved)
    reference = DreamBoothDataset(str(forms["folder"]), PROMPT, 32, rng=np.random.default_rng(0),
                                  source=local)
    assert dreambooth.captions == reference.captions and dreambooth.image_paths[0].endswith("row 0 column 'image'")
    for a, b in zip(dreambooth.images, reference.images):
        np.testing.assert_array_equal(a, b)


def kontext_args(forms, data: Path, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(forms["model"]), "--dataset_name", str(data),
            "--cond_image_column", "cond_image", "--caption_column", "text", "--instance_prompt",
            PROMPT, "--output_dir", str(out), "--device", "cpu", "--mode", "pynative", "--seed", "0",
            "--report_to", "none", "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2",
            "--max_sequence_length", "8", "--learning_rate", "1e-3", "--random_flip"]


def test_a_kontext_run_on_a_saved_dataset_writes_the_folder_runs_lora(forms, tmp_path):
    """Two steps on each form (random crops and flips, captions through the text encoders): the same batches
    give the same LoRA, bit for bit."""
    assert kontext_script.cli(kontext_args(forms, forms["folder"], tmp_path / "folder")) == 0
    assert kontext_script.cli(kontext_args(forms, forms["saved"], tmp_path / "saved")) == 0
    a, b = (load_file(str(tmp_path / name / "pytorch_lora_weights.safetensors")) for name in ("folder", "saved"))
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) == 0.0
    assert max(float(np.abs(a[k]).max()) for k in a if ".lora_B." in k) > 0  # it trained


def test_the_dreambooth_script_reads_a_saved_dataset(forms):
    args = dreambooth_script.parse_args(["--pretrained_model_name_or_path", str(forms["model"]), "--dataset_name",
                                         str(forms["saved"]), "--instance_prompt", PROMPT])
    assert args.dataset_name == str(forms["saved"]) and args.instance_data_dir is None


@pytest.mark.parametrize("extra, message", [
    (["--cond_image_column", "before"], "--cond_image_column 'before' not found in --dataset_name SAVED; its "
                                        "columns are image, cond_image, text"),
    (["--cond_image_column", "cond_image", "--caption_column", "prompt"], "--caption_column 'prompt' not found"),
    (["--cond_image_column", "cond_image", "--image_column", "text"], "row 0 column 'text': image "),
])
def test_bad_columns_stop_before_the_model_loads(forms, tmp_path, capsys, extra, message):
    """The model folder does not exist: the data's error comes first (exit 1, one line)."""
    args = ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(forms["saved"]),
            "--instance_prompt", "x", "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    assert kontext_script.cli(args + extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("SAVED", str(forms["saved"])) in err[0], err


@pytest.mark.parametrize("form, message", [("parquet", "BuilderConfig 'cats' not found"),
                                           ("saved", "was written by save_to_disk and has no configs")])
def test_dataset_config_name_goes_to_the_library(forms, tmp_path, form, message):
    with pytest.raises(ValueError, match=f"--dataset_(name|config_name) .*{message}"):
        read_data_source(None, str(forms[form]), "image", "text", "cond_image", dataset_config_name="cats",
                         cache_dir=str(tmp_path))


def test_a_hub_id_reads_from_the_offline_cache(forms, tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE=1 a Hub id loads from --cache_dir as datasets left it after a download (built here
    from a parquet copy of the saved dataset: datasets' cache layout, <cache>/<user>___<name>/...)."""
    import huggingface_hub.constants

    cache = tmp_path / "cache"
    datasets.load_from_disk(str(forms["saved"])).to_parquet(str(tmp_path / "pairs" / "train.parquet"))
    datasets.load_dataset(str(tmp_path / "pairs"), cache_dir=str(cache))
    (cache / "pairs").rename(cache / "user___pairs")  # its files are named pairs-train.arrow already
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = read_data_source(None, "user/pairs", "image", "text", "cond_image", cache_dir=str(cache),
                           instance_prompt=PROMPT)
    local = read_data_source(None, str(forms["folder"]), "image", "text", "cond_image", instance_prompt=PROMPT)
    expected, data = kontext_dataset(local), kontext_dataset(hub)
    assert data.captions == expected.captions
    for a, b in zip(data.images + data.references, expected.images + expected.references):
        np.testing.assert_array_equal(a, b)


def test_a_hub_id_not_in_the_offline_cache_is_one_line(forms, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = ["--pretrained_model_name_or_path", str(forms["model"]), "--dataset_name", "user/pairs",
            "--cond_image_column", "cond_image", "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "c")]
    assert kontext_script.cli(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dataset_name user/pairs: Couldn't reach 'user/pairs'" in err[0], err


@pytest.mark.parametrize("name", ["user/pairs", "SAVED"])
def test_without_the_library_only_metadata_folders_are_read(forms, tmp_path, capsys, monkeypatch, name):
    """`datasets` not installed: a Hub id or another folder stops at the arguments, saying what to install;
    a metadata.jsonl folder needs no library."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails; find_spec raises ValueError
    base = ["--pretrained_model_name_or_path", str(forms["model"]), "--cond_image_column", "cond_image",
            "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        kontext_script.parse_args(base + ["--dataset_name", str(forms["saved"]) if name == "SAVED" else name])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pip install datasets" in err and "metadata.jsonl" in err, err
    assert kontext_script.parse_args(base + ["--dataset_name", str(forms["folder"])]).dataset_name == str(
        forms["folder"])
