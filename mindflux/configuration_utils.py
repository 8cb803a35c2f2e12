"""config.json handling shared by every model and scheduler, the way diffusers reads and writes it."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

# The diffusers release whose file layout mindflux reads and writes.
DIFFUSERS_VERSION = "0.35.2"

# Bookkeeping keys that diffusers and transformers put into config.json; they are not arguments.
_BOOKKEEPING_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "_commit_hash"}


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes: `model.config.in_channels`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("a model's config is read-only; build a new model with from_config(config, key=value)")

    __setitem__ = __delitem__ = update = pop = setdefault = _readonly


def register_to_config(init):
    """Decorate `__init__` so its arguments (with defaults filled in) become `self.config`."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        config = {k: v for k, v in bound.arguments.items() if k != "self" and not k.startswith("_")}
        object.__setattr__(self, "_internal_dict", FrozenConfig(_jsonable(config)))

    return wrapper


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def resolve_folder(path: str, subfolder: str | None = None) -> str:
    folder = os.path.join(str(path), subfolder) if subfolder else str(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder {folder} does not exist")
    return folder


class ConfigMixin:
    """config.json read/write. Subclasses decorate `__init__` with `@register_to_config`."""

    config_name = "config.json"
    # Class names (diffusers `_class_name`, transformers `architectures`) this class accepts.
    _accepted_class_names: tuple[str, ...] = ()
    # Keys found in configs of this kind that carry no meaning here (transformers writes many).
    _ignored_config_keys: frozenset[str] = frozenset()

    @property
    def config(self) -> FrozenConfig:
        return self._internal_dict

    @classmethod
    def load_config(cls, path: str, subfolder: str | None = None) -> dict:
        """Read `config.json` from a folder (or a direct path to a JSON file)."""
        file = path if str(path).endswith(".json") and os.path.isfile(path) else None
        if file is None:
            file = os.path.join(resolve_folder(path, subfolder), cls.config_name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found: a {cls.__name__} folder needs a {cls.config_name}")
        try:
            with open(file, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from None
        cls._check_architecture(config, file)
        return config

    @classmethod
    def _check_architecture(cls, config: dict, where: str) -> None:
        accepted = set(cls._accepted_class_names) | {cls.__name__}
        found = config.get("_class_name") or (config.get("architectures") or [None])[0]
        if found is not None and found not in accepted:
            raise ValueError(f"{where} describes a {found}, not a {cls.__name__}")

    @classmethod
    def from_config(cls, config: dict | None = None, **overrides: Any):
        """Build an instance from a config dict; keys not understood are reported, not passed on."""
        config = {**(config or {}), **overrides}
        cls._check_architecture(config, "the config")
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
        unknown = sorted(k for k in config if k not in accepted and k not in _BOOKKEEPING_KEYS
                         and k not in cls._ignored_config_keys)
        if unknown:
            logger.warning("%s ignores config keys it does not know: %s", cls.__name__, ", ".join(unknown))
        return cls(**{k: v for k, v in config.items() if k in accepted})

    def config_to_save(self) -> dict:
        return {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_VERSION, **self.config}

    def save_config(self, save_directory: str) -> None:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.config_name)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.config_to_save(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
