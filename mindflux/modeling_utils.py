"""ModelMixin: diffusers-style from_pretrained / save_pretrained / .to(dtype) for MindSpore Cells."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn
from mindspore.nn.utils import no_init_parameters

from .checkpoints import open_checkpoint
from .configuration_utils import ConfigMixin, resolve_folder
from .hub import add_variant, resolve_model
from .safetensors_io import SafetensorsError, bf16_bits_to_float32, float32_to_bf16_bits
from .safetensors_io import save_tensors as _save_tensors

logger = logging.getLogger(__name__)

_MS_TO_ST = {ms.float32: "F32", ms.float16: "F16", ms.bfloat16: "BF16", ms.float64: "F64", ms.int64: "I64",
             ms.int32: "I32"}
DTYPES = {"fp32": ms.float32, "float32": ms.float32, "fp16": ms.float16, "float16": ms.float16,
          "bf16": ms.bfloat16, "bfloat16": ms.bfloat16}


def resolve_dtype(dtype) -> ms.Type | None:
    """Accept a MindSpore dtype or one of "fp32"/"fp16"/"bf16" (and their long names)."""
    if dtype is None or isinstance(dtype, ms.Type):
        return dtype
    if str(dtype).lower() in DTYPES:
        return DTYPES[str(dtype).lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")


class WeightsLoadingError(ValueError):
    """A checkpoint that does not fit the model: every missing, unexpected or misshapen key, by name."""


def parse_size(size: int | str) -> int:
    """ "10GB" / "500MB" / "5GiB" / 123 -> bytes (decimal units, as diffusers/transformers count)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"cannot read size {size!r}; write e.g. '10GB' or '500MB'")
    value, unit = float(match.group(1)), match.group(2)
    base = 1024 if "I" in unit else 1000
    return int(value * base ** "BKMGT".index(unit[0]))


def weight_files(folder: str, weights_name: str, variant: str | None = None) -> list[str]:
    """The safetensors files of a folder: one `weights_name`, or the shards its index lists
    (`variant` "fp16": diffusion_pytorch_model.fp16.safetensors / ....safetensors.index.fp16.json)."""
    single = os.path.join(folder, add_variant(weights_name, variant))
    index = os.path.join(folder, add_variant(weights_name + ".index.json", variant))
    weights_name = os.path.basename(single)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index} is not a valid shard index: {err}") from None
        return [os.path.join(folder, name) for name in dict.fromkeys(weight_map.values())]
    found = [n for n in sorted(os.listdir(folder)) if n.endswith((".bin", ".pt", ".ckpt", ".pth"))]
    hint = f" (found {', '.join(found)}: convert it to safetensors)" if found else ""
    raise FileNotFoundError(f"{folder} has neither {weights_name} nor {os.path.basename(index)}{hint}")


def tensor_to_numpy(tensor: ms.Tensor) -> tuple[np.ndarray, str]:
    """A parameter's value as (numpy array, safetensors dtype); BF16 comes back as its bit pattern."""
    if tensor.dtype == ms.bfloat16:
        return float32_to_bf16_bits(tensor.astype(ms.float32).asnumpy()), "BF16"
    return tensor.asnumpy(), _MS_TO_ST[tensor.dtype]


def numpy_to_tensor(array: np.ndarray, file_dtype: str, target: ms.Type) -> ms.Tensor:
    """A checkpoint array as a MindSpore tensor of `target` dtype (one conversion, one copy)."""
    if file_dtype == "BF16":
        array = bf16_bits_to_float32(array)
    tensor = ms.Tensor(np.ascontiguousarray(array))
    return tensor if tensor.dtype == target else tensor.astype(target)


def cast_parameter(param: Parameter, dtype: ms.Type) -> None:
    """Convert `param` to `dtype` in place, values included.

    `set_dtype` alone relabels the host copy, which a parameter already on a card does not follow;
    `set_data` alone casts the new data back to the parameter's old dtype. So: cast with an op, relabel,
    then hand over the cast data. A parameter not yet initialised (no_init_parameters) has no data.
    """
    if param.has_init:
        param.set_dtype(dtype)
        return
    data = param.astype(dtype)
    param.set_dtype(dtype)
    param.set_data(data)


class ModelMixin(nn.Cell, ConfigMixin):
    """Base of every mindflux model: diffusers' loading, saving and casting story for a Cell."""

    weights_name = "diffusion_pytorch_model.safetensors"
    # fnmatch patterns of parameters that stay fp32 when the model is cast to fp16 (as transformers does).
    _keep_in_fp32_modules: tuple[str, ...] = ()
    # regexes of checkpoint keys that are dropped silently (old buffers such as position_ids).
    _keys_to_ignore_on_load_unexpected: tuple[str, ...] = ()
    # {parameter: the checkpoint key it shares weights with}, for tied embeddings.
    _tied_weights: dict[str, str] = {}
    # Cells that enable_gradient_checkpointing() marks for recompute; set by each model.
    _checkpointed_block_lists: tuple[str, ...] = ()

    # ---- state dict -------------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, ms.Parameter]]:
        """(diffusers name, Parameter) for every parameter, in registration order."""
        seen = set()
        for name, param in self.parameters_and_names():
            if id(param) not in seen:
                seen.add(id(param))
                yield name, param

    def state_dict(self) -> dict[str, ms.Parameter]:
        return dict(self.named_parameters())

    @property
    def dtype(self) -> ms.Type:
        for _, p in self.named_parameters():
            if p.dtype in (ms.float32, ms.float16, ms.bfloat16):
                return p.dtype
        return ms.float32

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(int(np.prod(p.shape)) for _, p in self.named_parameters() if p.requires_grad or not only_trainable)

    # ---- casting ----------------------------------------------------------------------------
    def _target_dtype(self, name: str, dtype: ms.Type) -> ms.Type:
        if dtype == ms.float16 and any(fnmatch.fnmatch(name, f"*{pat}*") for pat in self._keep_in_fp32_modules):
            return ms.float32
        return dtype

    def to(self, dtype) -> ModelMixin:
        """Cast floating parameters in place (MindSpore Cells have no device placement to move)."""
        dtype = resolve_dtype(dtype)
        for name, param in self.named_parameters():
            if param.dtype in (ms.float32, ms.float16, ms.bfloat16):
                target = self._target_dtype(name, dtype)
                if param.dtype != target:
                    cast_parameter(param, target)
        return self

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None,
                        mindspore_dtype=None, *, revision: str | None = None, variant: str | None = None,
                        cache_dir: str | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, model_source: str | None = None, **config_overrides):
        """Build the model from `config.json` and fill it from safetensors weights (F32, F16, BF16 or fp8).

        `pretrained_model_name_or_path` is a folder or a Hub repo id (`revision`, `variant`, `cache_dir`,
        `local_files_only`, `token` as in diffusers; `model_source="modelscope"` for ModelScope ids;
        see mindflux.hub). Parameters are created without random initialisation and filled one tensor
        at a time. Without `mindspore_dtype` the weights are loaded as fp32, as diffusers does.
        """
        root = resolve_model(pretrained_model_name_or_path, subfolder, revision=revision, variant=variant,
                             cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                             model_source=model_source)
        folder = resolve_folder(root, subfolder)
        config = cls.load_config(folder)
        files = weight_files(folder, cls.weights_name, variant)
        with no_init_parameters():
            model = cls.from_config(config, **config_overrides)
        model.load_weights(files, dtype=resolve_dtype(mindspore_dtype) or ms.float32)
        model.set_train(False)
        return model

    def load_weights(self, files: Iterable[str] | str, dtype: ms.Type | None = None,
                     convert: Callable[[str, np.ndarray], Iterable[tuple[str, np.ndarray]]] | None = None) -> None:
        """Fill parameters from weight files (safetensors, fp8 included, or GGUF; see mindflux.checkpoints),
        one tensor at a time; raise one error listing every missing, unexpected and misshapen key.

        `convert(key, array)` turns one checkpoint entry into (parameter name, array) pairs: a
        rename, a split of a fused weight, or nothing to drop it. Arrays keep the file's storage
        (BF16 as uint16 bits) until they are assigned. `dtype` None keeps each parameter's dtype.
        """
        files = [files] if isinstance(files, str) else list(files)
        params = self.state_dict()
        filled: set[str] = set()
        unexpected, mismatched = [], []
        ignore = [re.compile(p) for p in self._keys_to_ignore_on_load_unexpected]
        tied = {src: dst for dst, src in self._tied_weights.items()}
        for path in files:
            st = open_checkpoint(path)
            for key in st.keys():
                array, file_dtype = st.get(key)
                for name, piece in (convert(key, array) if convert else [(key, array)]):
                    if any(p.search(name) for p in ignore):
                        continue
                    targets = [n for n in (name, tied.get(name)) if n in params]
                    if not targets:
                        unexpected.append(key if name == key else f"{key} (as {name})")
                    for target in targets:
                        param = params[target]
                        if tuple(param.shape) != tuple(piece.shape):
                            mismatched.append(f"{name}: checkpoint {tuple(piece.shape)} vs model {tuple(param.shape)}")
                            continue
                        want = self._target_dtype(target, dtype) if dtype is not None else param.dtype
                        if param.dtype != want:
                            param.set_dtype(want)
                        param.set_data(numpy_to_tensor(piece, file_dtype, want))
                        filled.add(target)
                st.release(key)  # the parameter holds its own copy now: one copy of the weights, not two
        missing = [n for n in params if n not in filled]
        if missing or unexpected or mismatched:
            lines = [f"weights in {', '.join(files)} do not fit {type(self).__name__}:"]
            for title, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
                if names:
                    lines.append(f"  {title} ({len(names)}): " + ", ".join(names))
            raise WeightsLoadingError("\n".join(lines))

    # ---- saving -----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, max_shard_size: int | str = "10GB") -> None:
        """Write config.json and safetensors weights (sharded with an index past `max_shard_size`),
        in the layout diffusers' (PyTorch) from_pretrained reads."""
        os.makedirs(save_directory, exist_ok=True)
        limit = parse_size(max_shard_size)
        shards: list[list[tuple[str, ms.Parameter]]] = [[]]
        size = 0
        for name, param in self.named_parameters():
            if ".lora_" in name:  # adapters are saved with save_lora_weights, not with the base model
                continue
            nbytes = int(np.prod(param.shape)) * param.itemsize
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append((name, param))
            size += nbytes
        stem, ext = self.weights_name.rsplit(".", 1)
        names = ([self.weights_name] if len(shards) == 1 else
                 [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))])
        weight_map, total = {}, 0
        for file_name, shard in zip(names, shards):
            entries = {}
            for name, param in shard:
                entries[name] = (param.shape, _MS_TO_ST[param.dtype], lambda p=param: tensor_to_numpy(p)[0])
                weight_map[name] = file_name
                total += int(np.prod(param.shape)) * param.itemsize
            _save_tensors(entries, os.path.join(save_directory, file_name), metadata={"format": "pt"})
        index = os.path.join(save_directory, self.weights_name + ".index.json")
        if len(shards) > 1:
            with open(index, "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        elif os.path.exists(index):
            os.remove(index)
        self.save_config(save_directory)

    # ---- training helpers ---------------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        for attr in self._checkpointed_block_lists:
            for block in getattr(self, attr):
                block.recompute()

    def freeze(self) -> ModelMixin:
        for _, param in self.named_parameters():
            param.requires_grad = False
        return self


__all__ = ["ModelMixin", "WeightsLoadingError", "SafetensorsError", "resolve_dtype", "weight_files"]
