"""Model ids from the Hugging Face Hub (or a mirror) and ModelScope, resolved to local folders.

`from_pretrained("black-forest-labs/FLUX.1-dev")` works as in diffusers: a name that is not a local
path is a repo id, fetched with `huggingface_hub.snapshot_download` into its cache (HF_HOME /
HF_HUB_CACHE), restricted by allow-patterns to the files the loader reads (FLUX.1-dev's 23.8 GB
single file beside the diffusers folders is left out). huggingface_hub itself honours HF_ENDPOINT
(mirrors), HF_TOKEN and HF_HUB_OFFLINE=1 (the cache only; nothing is contacted).

ModelScope ids go through the `modelscope` package instead, chosen explicitly: `model_source=
"modelscope"` or MINDFLUX_MODEL_SOURCE=modelscope (the same id can name different repos there).
"""

from __future__ import annotations

import json
import os
import re

MODEL_SOURCES = ("huggingface", "modelscope")
MODEL_SOURCE_ENV = "MINDFLUX_MODEL_SOURCE"
# Keywords of diffusers' from_pretrained that choose what to fetch.
HUB_KWARGS = ("revision", "variant", "cache_dir", "local_files_only", "token", "model_source")
# Weight formats mindflux does not read (pickles, other frameworks) and single-file checkpoints are not fetched.
_NOT_FETCHED = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.gguf"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMON_VARIANTS = ("fp16", "bf16", "fp32", "ema", "non_ema")


class HubError(OSError):
    """A model id that could not be resolved; the message names it and says what to do."""


def add_variant(weights_name: str, variant: str | None) -> str:
    """diffusers' variant file name: model.safetensors -> model.fp16.safetensors (index: .index.fp16.json)."""
    if not variant:
        return weights_name
    if weights_name.endswith(".index.json"):
        return f"{weights_name[: -len('.json')]}.{variant}.json"
    stem, _, ext = weights_name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def get_model_source(source: str | None = None) -> str:
    """The source of model ids: the argument, else MINDFLUX_MODEL_SOURCE, else the Hugging Face Hub."""
    chosen = (source or os.environ.get(MODEL_SOURCE_ENV) or "huggingface").lower()
    if chosen not in MODEL_SOURCES:
        where = "model_source" if source else MODEL_SOURCE_ENV
        raise ValueError(f"{where} must be one of {', '.join(MODEL_SOURCES)}; got {chosen!r}")
    return chosen


def is_repo_id(name: str) -> bool:
    """`org/name` that is not an existing local path."""
    name = os.fspath(name)
    return not os.path.exists(name) and bool(_REPO_ID.match(name)) and ".." not in name


def _weight_patterns(folder: str, variant: str | None) -> tuple[list[str], list[str]]:
    prefix = f"{folder}/" if folder else ""
    allow = [f"{prefix}*.json", f"{prefix}*.txt", f"{prefix}*.model"]  # configs, tokenizers (spiece.model)
    if variant:
        allow.append(f"{prefix}*.{variant}.safetensors")
        return allow, []
    allow.append(f"{prefix}*.safetensors")
    return allow, [f"{prefix}*.{v}.safetensors" for v in _COMMON_VARIANTS]


def pipeline_patterns(components: list[str], variant: str | None = None) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns for a pipeline repo: model_index.json and the components' folders only."""
    allow, ignore = ["model_index.json"], list(_NOT_FETCHED)
    for name in components:
        more_allow, more_ignore = _weight_patterns(name, variant)
        allow += more_allow
        ignore += more_ignore
    return allow, ignore


def model_patterns(subfolder: str | None, variant: str | None = None) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns for one model: its config and weights (in `subfolder` if given)."""
    allow, ignore = _weight_patterns(subfolder.strip("/") if subfolder else "", variant)
    return allow, ignore + list(_NOT_FETCHED)


def resolve_pipeline(name_or_path: str, revision: str | None = None, variant: str | None = None,
                     cache_dir: str | None = None, local_files_only: bool = False, token: str | bool | None = None,
                     model_source: str | None = None) -> str:
    """A pipeline folder: the path itself, or a repo id fetched (model_index.json first, then its components)."""
    name_or_path = os.fspath(name_or_path)
    if not is_repo_id(name_or_path):
        return name_or_path
    source = get_model_source(model_source)
    fetch = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    folder = _download(source, name_or_path, ["model_index.json"], [], **fetch)
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise HubError(f"{name_or_path} has no model_index.json, so it is not a diffusers pipeline repo (for a "
                       "single checkpoint file use FluxTransformer2DModel.from_single_file)")
    with open(index_path, encoding="utf-8") as f:
        components = [k for k, v in json.load(f).items() if not k.startswith("_") and isinstance(v, list)]
    allow, ignore = pipeline_patterns(components, variant)
    return _download(source, name_or_path, allow, ignore, **fetch)


def resolve_model(name_or_path: str, subfolder: str | None = None, revision: str | None = None,
                  variant: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                  token: str | bool | None = None, model_source: str | None = None) -> str:
    """A model folder (before `subfolder` is joined): the path itself, or a repo id fetched."""
    name_or_path = os.fspath(name_or_path)
    if not is_repo_id(name_or_path):
        return name_or_path
    allow, ignore = model_patterns(subfolder, variant)
    return _download(get_model_source(model_source), name_or_path, allow, ignore, revision=revision,
                     cache_dir=cache_dir, local_files_only=local_files_only, token=token)


def resolve_lora(name_or_path: str, weight_name: str | None = None, subfolder: str | None = None,
                 revision: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                 token: str | bool | None = None, model_source: str | None = None) -> str:
    """A LoRA file or folder: the path itself, or a repo id fetched (only `weight_name` when given)."""
    name_or_path = os.fspath(name_or_path)
    if not is_repo_id(name_or_path):
        return name_or_path
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    allow = [prefix + (weight_name or "*.safetensors")]
    return _download(get_model_source(model_source), name_or_path, allow, list(_NOT_FETCHED), revision=revision,
                     cache_dir=cache_dir, local_files_only=local_files_only, token=token)


def _download(source: str, repo_id: str, allow: list[str], ignore: list[str], **fetch) -> str:
    if source == "modelscope":
        return _modelscope_download(repo_id, allow, ignore, **fetch)
    return _hf_download(repo_id, allow, ignore, **fetch)


def _hf_download(repo_id: str, allow: list[str], ignore: list[str], revision=None, cache_dir=None,
                 local_files_only=False, token=None) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    login = "log in with `huggingface-cli login` or set HF_TOKEN"
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                 token=token, allow_patterns=allow, ignore_patterns=ignore)
    except GatedRepoError:
        raise HubError(f"{repo_id} is a gated model on {endpoint}: accept its conditions at {endpoint}/{repo_id} "
                       f"with your account, then {login}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id} is neither a local folder nor a model repo on {endpoint} that you can read: check "
                       f"the name; for a private or gated repo {login}; to use a mirror set HF_ENDPOINT (e.g. "
                       "HF_ENDPOINT=https://hf-mirror.com); for a ModelScope id set "
                       "MINDFLUX_MODEL_SOURCE=modelscope") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r} on {endpoint}") from None
    except LocalEntryNotFoundError as err:
        cache = cache_dir or constants.HF_HUB_CACHE
        status = _http_status(err)
        if status in (401, 403):
            raise HubError(f"{repo_id}: {endpoint} refused access (HTTP {status}); it may be gated or private: "
                           f"accept its conditions at {endpoint}/{repo_id}, then {login}") from None
        offline = local_files_only or constants.HF_HUB_OFFLINE
        why = ("downloads are off (HF_HUB_OFFLINE=1 or local_files_only)" if offline
               else f"{endpoint} could not be reached")
        raise HubError(f"{repo_id} (revision {revision or 'main'}) is not in the local Hub cache {cache} and {why}: "
                       "download it once with network access, or set HF_ENDPOINT to a reachable mirror") from None
    except HfHubHTTPError as err:
        status = _http_status(err)
        if status in (401, 403):
            raise HubError(f"{repo_id}: {endpoint} refused access (HTTP {status}); it may be gated or private: "
                           f"accept its conditions at {endpoint}/{repo_id}, then {login}") from None
        raise HubError(f"{repo_id}: {endpoint} answered {err}") from None


def _http_status(err: BaseException) -> int | None:
    """The HTTP status behind a huggingface_hub error (it may be the cause of a LocalEntryNotFoundError)."""
    while err is not None:
        response = getattr(err, "response", None)
        if response is not None and getattr(response, "status_code", None):
            return int(response.status_code)
        err = err.__cause__ or err.__context__
    return None


def _modelscope_download(repo_id: str, allow: list[str], ignore: list[str], revision=None, cache_dir=None,
                         local_files_only=False, token=None) -> str:
    try:
        import modelscope
    except ImportError:
        raise HubError(f"{repo_id}: the model source is ModelScope, which needs the `modelscope` package: "
                       "pip install modelscope (or use the Hugging Face Hub: unset MINDFLUX_MODEL_SOURCE)") from None
    if token:
        from modelscope.hub.api import HubApi

        HubApi().login(token)
    try:
        return modelscope.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                            local_files_only=local_files_only, allow_patterns=allow,
                                            ignore_patterns=ignore)
    except (ValueError, OSError) as err:  # modelscope reports missing repos and files this way
        raise HubError(f"{repo_id} could not be fetched from ModelScope: {err} (check the id; log in with "
                       "`modelscope login` for private models)") from None


__all__ = ["HUB_KWARGS", "MODEL_SOURCES", "HubError", "add_variant", "is_repo_id", "get_model_source", "model_patterns",
           "pipeline_patterns", "resolve_lora", "resolve_model", "resolve_pipeline"]
