"""Repo ids through huggingface_hub (a fake local cache, a fake endpoint) and the ModelScope switch."""

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from mindflux import FluxPipeline, FluxTransformer2DModel
from mindflux.hub import HubError, add_variant, is_repo_id, model_patterns, pipeline_patterns
from mindflux.modeling_utils import weight_files
from tests.conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
TINY = FIXTURES / "pipeline" / "tiny_flux"
DEMO = ROOT / "mindflux" / "demo" / "flux-shapes"
SHA = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(hub_cache: Path, repo_id: str, folder: Path, sha: str = SHA) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return repo / "snapshots" / sha


def test_a_repo_id_loads_from_the_cache_like_the_folder(tmp_path):
    fake_hub_cache(tmp_path, "org/tiny", TINY)
    by_id = FluxTransformer2DModel.from_pretrained("org/tiny", subfolder="transformer", cache_dir=str(tmp_path),
                                                   local_files_only=True)
    by_sha = FluxTransformer2DModel.from_pretrained("org/tiny", subfolder="transformer", cache_dir=str(tmp_path),
                                                    local_files_only=True, revision=SHA)
    by_folder = FluxTransformer2DModel.from_pretrained(str(TINY / "transformer"))
    reference = {k: v.asnumpy() for k, v in by_folder.state_dict().items()}
    for model in (by_id, by_sha):
        state = model.state_dict()
        assert set(state) == set(reference)
        assert all(np.array_equal(state[k].asnumpy(), reference[k]) for k in reference)
    pipe = FluxPipeline.from_pretrained("org/tiny", cache_dir=str(tmp_path), local_files_only=True)
    assert np.array_equal(pipe.vae.decoder.conv_out.weight.asnumpy(),
                          FluxPipeline.from_pretrained(str(TINY)).vae.decoder.conv_out.weight.asnumpy())


def test_missing_repo_names_it_and_says_what_to_do(tmp_path):
    with pytest.raises(HubError) as info:
        FluxPipeline.from_pretrained("org/not-cached", cache_dir=str(tmp_path), local_files_only=True)
    message = str(info.value)
    assert "org/not-cached" in message and "not in the local Hub cache" in message and "HF_ENDPOINT" in message


def test_variants_pick_their_files(tmp_path):
    assert add_variant("diffusion_pytorch_model.safetensors", "fp16") == "diffusion_pytorch_model.fp16.safetensors"
    assert add_variant("model.safetensors.index.json", "bf16") == "model.safetensors.index.bf16.json"
    shutil.copy(TINY / "transformer" / "diffusion_pytorch_model.safetensors",
                tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    assert weight_files(str(tmp_path), "diffusion_pytorch_model.safetensors", "fp16") == [
        str(tmp_path / "diffusion_pytorch_model.fp16.safetensors")]
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        weight_files(str(tmp_path), "diffusion_pytorch_model.safetensors")


# The files of black-forest-labs/FLUX.1-dev (as listed on the Hub), for the allow-patterns.
FLUX_DEV_FILES = [
    ".gitattributes", "LICENSE.md", "README.md", "ae.safetensors", "dev_grid.jpg", "flux1-dev.safetensors",
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer_config.json", "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
COMPONENTS = ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae"]


def test_allow_patterns_fetch_the_diffusers_folders_only():
    allow, ignore = pipeline_patterns(COMPONENTS)
    fetched = list(filter_repo_objects(FLUX_DEV_FILES, allow_patterns=allow, ignore_patterns=ignore))
    assert sorted(fetched) == sorted(f for f in FLUX_DEV_FILES if "/" in f or f == "model_index.json")
    assert "flux1-dev.safetensors" not in fetched and "ae.safetensors" not in fetched

    files = ["vae/config.json", "vae/diffusion_pytorch_model.safetensors",
             "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.bin"]
    allow, ignore = pipeline_patterns(["vae"], variant="fp16")
    assert list(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore)) == [
        "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors"]
    allow, ignore = model_patterns("transformer")
    assert sorted(filter_repo_objects(FLUX_DEV_FILES, allow_patterns=allow, ignore_patterns=ignore)) == [
        f for f in FLUX_DEV_FILES if f.startswith("transformer/")]


def test_repo_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    assert is_repo_id("black-forest-labs/FLUX.1-dev")
    assert not is_repo_id(str(tmp_path)) and not is_repo_id("FLUX.1-dev") and not is_repo_id("../org/name")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    monkeypatch.chdir(tmp_path)  # an existing relative folder wins over the Hub, as in diffusers
    assert not is_repo_id("org/name")


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub's answers to repo_info for a gated repo (401 + GatedRepo), a forbidden one and a missing one."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if "/org/gated/" in self.path:
            status, code = 401, "GatedRepo"
        elif "/org/forbidden/" in self.path:
            status, code = 403, None
        else:
            status, code = 404, "RepoNotFound"
        body = json.dumps({"error": "denied"}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_endpoint(monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # what HF_ENDPOINT sets when huggingface_hub is imported
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    yield endpoint
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("repo, expected", [
    ("org/gated", ["is a gated model", "accept its conditions at", "huggingface-cli login", "HF_TOKEN"]),
    ("org/forbidden", ["refused access (HTTP 403)", "huggingface-cli login"]),
    ("org/missing", ["neither a local folder nor a model repo", "HF_ENDPOINT", "huggingface-cli login"]),
])
def test_hub_refusals_are_explained(fake_endpoint, tmp_path, repo, expected):
    with pytest.raises(HubError) as info:
        FluxPipeline.from_pretrained(repo, cache_dir=str(tmp_path))
    message = str(info.value)
    assert repo in message and fake_endpoint in message and all(e in message for e in expected), message
    assert "Traceback" not in message and len(message.splitlines()) == 1


def test_modelscope_is_chosen_explicitly(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # not installed
    with pytest.raises(HubError, match="pip install modelscope"):
        FluxPipeline.from_pretrained("org/tiny", model_source="modelscope")
    with pytest.raises(ValueError, match="MINDFLUX_MODEL_SOURCE must be one of huggingface, modelscope"):
        monkeypatch.setenv("MINDFLUX_MODEL_SOURCE", "civitai")
        FluxPipeline.from_pretrained("org/tiny")

    calls = []
    snapshot = fake_hub_cache(tmp_path, "org/tiny", TINY)

    def snapshot_download(repo_id, **kwargs):  # the modelscope package's function, recorded
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=snapshot_download))
    monkeypatch.setenv("MINDFLUX_MODEL_SOURCE", "modelscope")
    pipe = FluxPipeline.from_pretrained("org/tiny", revision="v1")
    assert pipe.transformer is not None and [c[0] for c in calls] == ["org/tiny", "org/tiny"]
    assert calls[0][1]["allow_patterns"] == ["model_index.json"] and calls[1][1]["revision"] == "v1"
    assert "transformer/*.safetensors" in calls[1][1]["allow_patterns"]


def test_generate_runs_from_a_hub_cache_offline(tmp_path):
    fake_hub_cache(tmp_path / "home" / "hub", "org/flux-shapes", DEMO)
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    result = subprocess.run([sys.executable, str(ROOT / "infer" / "generate.py"), "--model", "org/flux-shapes",
                             "--device", "cpu", "--mode", "pynative", "--steps", "2", "--output_dir",
                             str(tmp_path / "out"), "--prompt", "a red circle on a white background"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    image = Image.open(tmp_path / "out" / "000_seed0.png")
    assert image.text["model"] == "flux-shapes" and image.size == (64, 64)


def test_a_lora_repo_id_loads_from_the_cache(tmp_path):
    from tests.lora_utils import LORA, StandInPipeline

    folder = tmp_path / "repo"
    folder.mkdir()
    shutil.copy(LORA / "kohya.safetensors", folder / "style.safetensors")
    fake_hub_cache(tmp_path / "hub", "org/lora", folder)
    pipe = StandInPipeline()
    pipe.load_lora_weights("org/lora", weight_name="style.safetensors", adapter_name="hub",
                           cache_dir=str(tmp_path / "hub"), local_files_only=True)
    pipe.load_lora_weights(str(LORA / "kohya.safetensors"), adapter_name="local")
    ours, theirs = pipe.transformer.get_adapter_state_dict("hub"), pipe.transformer.get_adapter_state_dict("local")
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(HubError, match="org/other"):
        pipe.load_lora_weights("org/other", cache_dir=str(tmp_path / "hub"), local_files_only=True)
