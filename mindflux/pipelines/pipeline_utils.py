"""DiffusionPipeline: a folder of components listed in model_index.json, read and written as diffusers does.

A pipeline folder (what diffusers' `save_pretrained` writes, and what the Hub's FLUX.1 repos hold):

    model_index.json        {"_class_name": "FluxPipeline", "vae": ["diffusers", "AutoencoderKL"], ...}
    transformer/ vae/ scheduler/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/

Each component is loaded by its class name: mindflux's own classes for models and the scheduler,
transformers' tokenizer classes for the tokenizers (they need no torch). A Hub or ModelScope repo id is
fetched first (mindflux.hub).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any

import mindspore as ms
from tqdm.auto import tqdm

from ..backend import synchronize
from ..configuration_utils import DIFFUSERS_VERSION
from ..hub import resolve_pipeline
from ..modeling_utils import ModelMixin, resolve_dtype

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"


def _component_classes() -> dict[str, tuple[str, type]]:
    """model_index.json class name -> (library written into model_index.json, class that loads it)."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast, T5Tokenizer, T5TokenizerFast

    from ..models import AutoencoderKL, CLIPTextModel, FluxTransformer2DModel, T5EncoderModel
    from ..schedulers import FlowMatchEulerDiscreteScheduler

    classes = {cls.__name__: ("diffusers", cls) for cls in
               (FluxTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler)}
    classes.update({cls.__name__: ("transformers", cls) for cls in
                    (CLIPTextModel, T5EncoderModel, CLIPTokenizer, CLIPTokenizerFast, T5Tokenizer, T5TokenizerFast)})
    return classes


# model_index.json "_class_name" -> pipeline class; every subclass of DiffusionPipeline adds itself when it is
# defined (mindflux.pipelines imports them all), so this module needs no import of the pipelines above it.
_PIPELINES: dict[str, type] = {}


def _pipeline_classes() -> dict[str, type]:
    return dict(_PIPELINES)


class DiffusionPipeline:
    """Base of mindflux pipelines: components by name, model_index.json loading and saving, dtype casting.

    A subclass lists its components as the arguments of `__init__` (those with a default are
    optional) and passes them to `register_modules`.
    """

    config_name = MODEL_INDEX
    _optional_components: list[str] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _PIPELINES[cls.__name__] = cls

    # ---- components -------------------------------------------------------------------------
    def register_modules(self, **components: Any) -> None:
        for name, component in components.items():
            setattr(self, name, component)

    @classmethod
    def component_names(cls) -> list[str]:
        """The `__init__` arguments, in order: the components a folder of this pipeline holds."""
        return [n for n in inspect.signature(cls.__init__).parameters if n != "self"]

    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name, None) for name in self.component_names()}

    def models(self) -> dict[str, ModelMixin]:
        """The components that hold weights (not tokenizers, not the scheduler)."""
        return {name: c for name, c in self.components.items() if isinstance(c, ModelMixin)}

    @property
    def dtype(self) -> ms.Type:
        transformer = getattr(self, "transformer", None)
        return transformer.dtype if transformer is not None else ms.float32

    def to(self, dtype) -> DiffusionPipeline:
        """Cast every model's floating parameters (MindSpore has no per-Cell device placement to move)."""
        for model in self.models().values():
            model.to(dtype)
        return self

    # ---- progress bar -----------------------------------------------------------------------
    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm keyword arguments for the progress bar over the denoising steps, e.g. disable=True."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable=None, total: int | None = None) -> tqdm:
        config = getattr(self, "_progress_bar_config", {})
        if iterable is not None:
            return tqdm(iterable, **config)
        if total is None:
            raise ValueError("progress_bar needs an iterable or a total")
        return tqdm(total=total, **config)

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def load_model_index(cls, folder: str) -> dict:
        folder = str(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"pipeline folder {folder} does not exist (a Hub repo id is written org/name)")
        path = os.path.join(folder, MODEL_INDEX)
        if not os.path.isfile(path):
            hint = (" (it holds a single model's config.json: load it with that model's from_pretrained)"
                    if os.path.isfile(os.path.join(folder, "config.json")) else "")
            raise FileNotFoundError(f"{folder} has no {MODEL_INDEX}, so it is not a pipeline folder{hint}")
        try:
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(index, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return index

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, mindspore_dtype=None, *, revision: str | None = None,
                        variant: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, model_source: str | None = None, **kwargs: Any):
        """Load every component listed in `model_index.json` from its subfolder.

        `pretrained_model_name_or_path` is a folder or a Hub repo id, fetched with the diffusers
        keywords `revision`, `variant`, `cache_dir`, `local_files_only`, `token` (or from ModelScope
        with `model_source="modelscope"`); see mindflux.hub.

        `mindspore_dtype` ("fp32" / "bf16" / "fp16", a MindSpore dtype, or a dict of component name
        -> dtype with an optional "default") is the dtype of the models' weights; fp32 without it,
        as diffusers. A component passed as a keyword argument (None included) is used as given
        instead of being loaded, as in diffusers.
        """
        folder = resolve_pipeline(pretrained_model_name_or_path, revision=revision, variant=variant,
                                  cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                                  model_source=model_source)
        index = cls.load_model_index(folder)
        pipeline_cls = cls
        found = index.get("_class_name")
        if cls is DiffusionPipeline:
            pipelines = _pipeline_classes()
            if found not in pipelines:
                raise ValueError(f"{os.path.join(folder, MODEL_INDEX)} names the pipeline class {found!r}; mindflux "
                                 f"has {', '.join(pipelines)}")
            pipeline_cls = pipelines[found]
        elif found is not None and found != cls.__name__ and (
                found not in _PIPELINES or _PIPELINES[found].component_names() != cls.component_names()):
            # a FLUX.1-dev folder loads as any family member with the same components, silently (as diffusers)
            logger.warning("%s describes a %s; loading it as a %s", os.path.join(folder, MODEL_INDEX), found,
                           cls.__name__)

        names = pipeline_cls.component_names()
        unknown_kwargs = sorted(set(kwargs) - set(names))
        if unknown_kwargs:
            raise TypeError(f"{pipeline_cls.__name__}.from_pretrained got unexpected arguments {unknown_kwargs}; "
                            f"its components are {names}")
        ignored = sorted(k for k in index if not k.startswith("_") and k not in names)
        if ignored:
            logger.warning("%s lists components %s that %s does not use; they are ignored", MODEL_INDEX, ignored,
                           pipeline_cls.__name__)

        classes = _component_classes()
        components = {}
        for name in names:
            if name in kwargs:
                components[name] = kwargs[name]
                continue
            entry = index.get(name)
            if entry is None or (isinstance(entry, (list, tuple)) and entry[-1] is None):
                if name not in pipeline_cls._optional_components:
                    raise ValueError(f"{os.path.join(folder, MODEL_INDEX)} has no component {name!r}, which "
                                     f"{pipeline_cls.__name__} needs (or pass {name}=... to from_pretrained)")
                components[name] = None
                continue
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
                raise ValueError(f"{MODEL_INDEX}: component {name!r} must be [library, class name]; got {entry!r}")
            library, class_name = entry
            if class_name not in classes:
                raise ValueError(f"{os.path.join(folder, MODEL_INDEX)}: component {name!r} is a {library}.{class_name}"
                                 f", a class mindflux cannot load; it loads {', '.join(sorted(classes))}")
            component_folder = os.path.join(folder, name)
            if not os.path.isdir(component_folder):
                raise FileNotFoundError(f"component {name!r} ({class_name}) is listed in {MODEL_INDEX} but its "
                                        f"folder {component_folder} does not exist")
            components[name] = _load_component(classes[class_name][1], component_folder,
                                                _dtype_for(mindspore_dtype, name), variant)
        return pipeline_cls(**components)

    # ---- saving -----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, max_shard_size: int | str = "10GB") -> None:
        """Write model_index.json and every component into its subfolder, in the layout diffusers loads."""
        save_directory = str(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        libraries = {cls: library for library, cls in _component_classes().values()}
        index: dict[str, Any] = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_VERSION}
        for name, component in self.components.items():
            if component is None:
                if name not in self._optional_components:
                    raise ValueError(f"component {name!r} is None (released?); a pipeline folder needs it")
                index[name] = [None, None]
                continue
            cls = next((c for c in type(component).__mro__ if c in libraries), None)
            if cls is None:
                raise ValueError(f"component {name!r} is a {type(component).__name__}, which mindflux cannot save")
            index[name] = [libraries[cls], cls.__name__]
            target = os.path.join(save_directory, name)
            if isinstance(component, ModelMixin):
                component.save_pretrained(target, max_shard_size=max_shard_size)
            else:
                component.save_pretrained(target)
        with open(os.path.join(save_directory, MODEL_INDEX), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")  # as diffusers' to_json_string


def _dtype_for(mindspore_dtype, name: str) -> ms.Type | None:
    if isinstance(mindspore_dtype, dict):
        return resolve_dtype(mindspore_dtype.get(name, mindspore_dtype.get("default")))
    return resolve_dtype(mindspore_dtype)


def _load_component(cls: type, folder: str, dtype: ms.Type | None, variant: str | None = None):
    if issubclass(cls, ModelMixin):
        return cls.from_pretrained(folder, mindspore_dtype=dtype, variant=variant)
    return cls.from_pretrained(folder)


__all__ = ["DiffusionPipeline", "synchronize"]
