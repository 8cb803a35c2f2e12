"""What the text encoders share: transformers' folder layout (config.json + model.safetensors), an
embedding table and activations with torch's names, output tuples, dtype limits."""

from __future__ import annotations

import functools
from collections import namedtuple

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from ..modeling_utils import ModelMixin
from .activations import gelu_tanh

# The transformers release whose config.json and weight layout mindflux reads and writes.
TRANSFORMERS_VERSION = "4.57.1"

# Keys transformers writes into every config.json that say nothing about the encoder's numbers
# (training, generation, tokenizer and hub bookkeeping); they are dropped without a warning.
GENERIC_CONFIG_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_attn_implementation_autoset",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "initializer_range", "initializer_factor", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tie_encoder_decoder", "tie_word_embeddings", "use_cache", "output_past", "output_hidden_states",
    "output_attentions", "return_dict", "torchscript", "use_bfloat16", "pruned_heads", "chunk_size_feed_forward",
    "gradient_checkpointing", "problem_type", "id2label", "label2id", "tokenizer_class", "prefix",
    "task_specific_params", "finetuning_task", "max_length", "min_length", "num_beams", "early_stopping",
})

BaseModelOutput = namedtuple("BaseModelOutput", ["last_hidden_state", "hidden_states"])
BaseModelOutputWithPooling = namedtuple("BaseModelOutputWithPooling",
                                        ["last_hidden_state", "pooler_output", "hidden_states"])

_DTYPE_NAMES = {ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16"}
# torch.finfo(dtype).min, which transformers fills masked attention scores with
_FLOAT_MIN = {ms.float32: -3.4028234663852886e38, ms.float16: -65504.0, ms.bfloat16: -3.3895313892515355e38}


def finfo_min(dtype: ms.Type) -> float:
    return _FLOAT_MIN[dtype] if dtype in _FLOAT_MIN else _FLOAT_MIN[ms.float32]


class Embedding(nn.Cell):
    """A lookup table whose parameter is `weight`, as torch's nn.Embedding (MindSpore's is `embedding_table`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = Parameter(initializer(Normal(1.0), (num_embeddings, embedding_dim), ms.float32))

    def construct(self, input_ids: Tensor) -> Tensor:
        return ops.gather(self.weight, input_ids, 0)


ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")


class Activation(nn.Cell):
    """transformers' activations by config name (`hidden_act`, `dense_act_fn`)."""

    def __init__(self, name: str):
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"activation {name!r} is not supported; use one of {', '.join(ACTIVATIONS)}")
        self.name = name

    def construct(self, x: Tensor) -> Tensor:
        if self.name == "quick_gelu":
            return x * ops.sigmoid(1.702 * x)
        if self.name == "gelu":
            return ops.gelu(x, approximate="none")
        if self.name in ("gelu_new", "gelu_pytorch_tanh"):
            return gelu_tanh(x)
        if self.name == "relu":
            return ops.relu(x)
        return ops.silu(x)


class TransformersModelMixin(ModelMixin):
    """ModelMixin for models that live in transformers' folders: `model.safetensors` (or a sharded
    index) and a config.json with `architectures` and `model_type`, which is checked on loading and
    written on saving so that transformers' from_pretrained reads mindflux's folders."""

    weights_name = "model.safetensors"
    model_type = ""
    _ignored_config_keys = GENERIC_CONFIG_KEYS

    @classmethod
    def _check_architecture(cls, config: dict, where: str) -> None:
        super()._check_architecture(config, where)
        found = config.get("model_type")
        if found is not None and found != cls.model_type:
            raise ValueError(f"{where} describes a model of type {found!r}, not a {cls.__name__} "
                             f"(model_type {cls.model_type!r})")

    def config_to_save(self) -> dict:
        return {"architectures": [type(self).__name__], "model_type": self.model_type, **self.config,
                "torch_dtype": _DTYPE_NAMES.get(self.dtype, "float32"), "transformers_version": TRANSFORMERS_VERSION}

    def enable_gradient_checkpointing(self) -> None:
        # the block lists sit below the top level here ("text_model.encoder.layers")
        for path in self._checkpointed_block_lists:
            for block in functools.reduce(getattr, path.split("."), self):
                block.recompute()
