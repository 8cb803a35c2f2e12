"""T5EncoderModel: the encoder of T5 with transformers' constructor, parameter names and numbers.

FLUX.1 uses T5-v1.1-XXL's encoder (text_encoder_2/) for its sequence embeddings:

    input_ids (B, L) --shared--> (B, L, d_model)
    position bias (1, num_heads, L, L) from relative position buckets (first block's table, shared by all)
    num_layers blocks: RMS norm -> self-attention (no score scaling) -> residual,
                       RMS norm -> gated-gelu feed-forward -> residual
    final_layer_norm -> last_hidden_state (B, L, d_model)

Half precision follows transformers: RMS norms in fp32, softmax in fp32, `wo` kept in fp32 under
fp16 (then the residual stream is fp32 from the first feed-forward on), and fp16 residuals clamped.
"""

from __future__ import annotations

import inspect
import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from ..configuration_utils import register_to_config
from .text_encoder_utils import Activation, BaseModelOutput, Embedding, TransformersModelMixin, finfo_min

_scores = ops.BatchMatMul(transpose_b=True)
_weighted_sum = ops.BatchMatMul()
_FP16_MAX = 65504.0
# Bucket tables are built for this many tokens at first and grown when a longer input comes.
_INITIAL_BUCKET_LENGTH = 512


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
    """T5's bucket of each relative position (memory index - query index), in numpy.

    Half of the buckets (per direction) count exact distances; the other half cover distances up
    to `max_distance` logarithmically; farther ones share the last bucket. The logarithm is taken
    in float32 and truncated, as transformers computes it, so bucket edges fall where its do.
    """
    relative_position = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(np.int64) * num_buckets
        distance = np.abs(relative_position)
    else:
        distance = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    with np.errstate(divide="ignore"):  # log(0) for the exact range, which np.where discards
        scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, distance, large)


def _add(residual: Tensor, update: Tensor) -> Tensor:
    # fp16 + fp32 (the fp32 `wo` output) gives fp32, as torch's type promotion does
    if residual.dtype != update.dtype:
        return residual.astype(ms.float32) + update.astype(ms.float32)
    return residual + update


def _clamp_fp16(x: Tensor) -> Tensor:
    """Keep fp16 activations finite, as transformers' T5 does (a margin of 1000 once one overflowed)."""
    if x.dtype != ms.float16:
        return x
    limit = ops.select(ops.isinf(x).any(), Tensor(_FP16_MAX - 1000, ms.float16), Tensor(_FP16_MAX, ms.float16))
    return ops.clamp(x, -limit, limit)


class T5LayerNorm(nn.Cell):
    """RMS norm without bias: the mean square in fp32, the result in the weight's dtype when that is half."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = Parameter(initializer("ones", (hidden_size,), ms.float32))
        self.variance_epsilon = eps

    def construct(self, hidden_states: Tensor) -> Tensor:
        h = hidden_states.astype(ms.float32)
        h = h * ops.rsqrt(ops.mean(ops.square(h), -1, keep_dims=True) + self.variance_epsilon)
        if self.weight.dtype in (ms.float16, ms.bfloat16):
            h = h.astype(self.weight.dtype)
        return self.weight * h


class T5Attention(nn.Cell):
    def __init__(self, d_model: int, d_kv: int, num_heads: int, dropout_rate: float,
                 has_relative_attention_bias: bool = False, relative_attention_num_buckets: int = 32,
                 relative_attention_max_distance: int = 128):
        super().__init__()
        self.n_heads, self.key_value_proj_dim = num_heads, d_kv
        self.inner_dim = num_heads * d_kv
        self.q = nn.Dense(d_model, self.inner_dim, has_bias=False)
        self.k = nn.Dense(d_model, self.inner_dim, has_bias=False)
        self.v = nn.Dense(d_model, self.inner_dim, has_bias=False)
        self.o = nn.Dense(self.inner_dim, d_model, has_bias=False)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.has_relative_attention_bias = has_relative_attention_bias
        if has_relative_attention_bias:
            self.relative_attention_num_buckets = relative_attention_num_buckets
            self.relative_attention_max_distance = relative_attention_max_distance
            self.relative_attention_bias = Embedding(relative_attention_num_buckets, num_heads)
            self.set_bucket_length(_INITIAL_BUCKET_LENGTH)

    def set_bucket_length(self, length: int) -> None:
        """Precompute the (length, length) bucket table that `compute_bias` slices (numpy, no arange op)."""
        positions = np.arange(length)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], True,
                                           self.relative_attention_num_buckets, self.relative_attention_max_distance)
        self.bucket_length = length
        self._buckets = Tensor(buckets.astype(np.int32))

    def compute_bias(self, seq_len: int) -> Tensor:
        """(1, heads, L, L) bias added to the attention scores."""
        values = self.relative_attention_bias(self._buckets[:seq_len, :seq_len])  # (L, L, heads)
        return values.transpose(2, 0, 1)[None]

    def _heads(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.reshape(b, s, self.n_heads, self.key_value_proj_dim).transpose(0, 2, 1, 3)

    def construct(self, hidden_states: Tensor, position_bias: Tensor) -> Tensor:
        b, s, _ = hidden_states.shape
        q = self._heads(self.q(hidden_states))
        k = self._heads(self.k(hidden_states))
        v = self._heads(self.v(hidden_states))
        scores = _scores(q, k) + position_bias.astype(q.dtype)  # T5 does not scale the scores
        probs = ops.softmax(scores.astype(ms.float32), -1).astype(scores.dtype)
        out = _weighted_sum(self.dropout(probs), v).transpose(0, 2, 1, 3).reshape(b, s, self.inner_dim)
        return self.o(out)


class T5LayerSelfAttention(nn.Cell):
    def __init__(self, d_model: int, layer_norm_epsilon: float, dropout_rate: float, **attention_kwargs):
        super().__init__()
        self.SelfAttention = T5Attention(d_model, dropout_rate=dropout_rate, **attention_kwargs)
        self.layer_norm = T5LayerNorm(d_model, eps=layer_norm_epsilon)
        self.dropout = nn.Dropout(p=dropout_rate)

    def construct(self, hidden_states: Tensor, position_bias: Tensor) -> Tensor:
        update = self.SelfAttention(self.layer_norm(hidden_states), position_bias)
        return _add(hidden_states, self.dropout(update))


class T5DenseActDense(nn.Cell):
    def __init__(self, d_model: int, d_ff: int, dropout_rate: float, act: str):
        super().__init__()
        self.wi = nn.Dense(d_model, d_ff, has_bias=False)
        self.wo = nn.Dense(d_ff, d_model, has_bias=False)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.act = Activation(act)

    def construct(self, hidden_states: Tensor) -> Tensor:
        hidden_states = self.dropout(self.act(self.wi(hidden_states)))
        return self.wo(hidden_states.astype(self.wo.weight.dtype))  # `wo` may be kept in fp32


class T5DenseGatedActDense(nn.Cell):
    def __init__(self, d_model: int, d_ff: int, dropout_rate: float, act: str):
        super().__init__()
        self.wi_0 = nn.Dense(d_model, d_ff, has_bias=False)
        self.wi_1 = nn.Dense(d_model, d_ff, has_bias=False)
        self.wo = nn.Dense(d_ff, d_model, has_bias=False)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.act = Activation(act)

    def construct(self, hidden_states: Tensor) -> Tensor:
        hidden_states = self.dropout(self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states))
        return self.wo(hidden_states.astype(self.wo.weight.dtype))  # `wo` may be kept in fp32


class T5LayerFF(nn.Cell):
    def __init__(self, d_model: int, d_ff: int, dropout_rate: float, layer_norm_epsilon: float, act: str,
                 gated: bool):
        super().__init__()
        dense = T5DenseGatedActDense if gated else T5DenseActDense
        self.DenseReluDense = dense(d_model, d_ff, dropout_rate, act)
        self.layer_norm = T5LayerNorm(d_model, eps=layer_norm_epsilon)
        self.dropout = nn.Dropout(p=dropout_rate)

    def construct(self, hidden_states: Tensor) -> Tensor:
        return _add(hidden_states, self.dropout(self.DenseReluDense(self.layer_norm(hidden_states))))


class T5Block(nn.Cell):
    def __init__(self, attention_kwargs: dict, ff_kwargs: dict, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.CellList([
            T5LayerSelfAttention(has_relative_attention_bias=has_relative_attention_bias, **attention_kwargs),
            T5LayerFF(**ff_kwargs),
        ])

    def construct(self, hidden_states: Tensor, position_bias: Tensor) -> Tensor:
        hidden_states = _clamp_fp16(self.layer[0](hidden_states, position_bias))
        return _clamp_fp16(self.layer[1](hidden_states))


class T5Stack(nn.Cell):
    def __init__(self, embed_tokens: Embedding, num_layers: int, d_model: int, dropout_rate: float,
                 layer_norm_epsilon: float, attention_kwargs: dict, ff_kwargs: dict):
        super().__init__()
        self.embed_tokens = embed_tokens  # the model's `shared` table: one Parameter under both names
        self.block = nn.CellList([T5Block(attention_kwargs, ff_kwargs, has_relative_attention_bias=i == 0)
                                  for i in range(num_layers)])
        self.final_layer_norm = T5LayerNorm(d_model, eps=layer_norm_epsilon)
        self.dropout = nn.Dropout(p=dropout_rate)

    def construct(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_hidden_states: bool = False):
        inputs_embeds = self.embed_tokens(input_ids)
        seq_len = input_ids.shape[1]
        # computed once by the first block's attention and shared by every block, mask included
        position_bias = self.block[0].layer[0].SelfAttention.compute_bias(seq_len)
        if attention_mask is not None:  # 1 = attend, 0 = padding
            keep = attention_mask[:, None, None, :].astype(inputs_embeds.dtype)
            position_bias = position_bias + (1.0 - keep) * finfo_min(inputs_embeds.dtype)
        hidden_states = self.dropout(inputs_embeds)
        all_states = ()
        for block in self.block:
            if output_hidden_states:
                all_states = all_states + (hidden_states,)
            hidden_states = block(hidden_states, position_bias)
        hidden_states = self.dropout(self.final_layer_norm(hidden_states))
        if output_hidden_states:
            all_states = all_states + (hidden_states,)
        return hidden_states, all_states


class T5EncoderModel(TransformersModelMixin):
    """T5's encoder. Defaults are transformers' T5Config's; FLUX.1's text_encoder_2/config.json is
    T5-v1.1-XXL: d_model 4096, d_kv 64, d_ff 10240, 24 layers, 64 heads, "gated-gelu"."""

    model_type = "t5"
    _keep_in_fp32_modules = ("wo",)
    _keys_to_ignore_on_load_unexpected = (r"^decoder\.",)
    _tied_weights = {"shared.weight": "encoder.embed_tokens.weight"}
    _ignored_config_keys = TransformersModelMixin._ignored_config_keys | {
        "num_decoder_layers", "classifier_dropout", "n_positions", "feed_forward_proj_type"}
    _checkpointed_block_lists = ("encoder.block",)

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 32128,
        d_model: int = 512,
        d_kv: int = 64,
        d_ff: int = 2048,
        num_layers: int = 6,
        num_heads: int = 8,
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
        dropout_rate: float = 0.1,
        layer_norm_epsilon: float = 1e-6,
        feed_forward_proj: str = "relu",
        dense_act_fn: str | None = None,
        is_gated_act: bool | None = None,
    ):
        super().__init__()
        self.dense_act_fn, self.is_gated_act = self.feed_forward_activation(feed_forward_proj, dense_act_fn,
                                                                            is_gated_act)
        attention_kwargs = dict(d_model=d_model, d_kv=d_kv, num_heads=num_heads, dropout_rate=dropout_rate,
                                layer_norm_epsilon=layer_norm_epsilon,
                                relative_attention_num_buckets=relative_attention_num_buckets,
                                relative_attention_max_distance=relative_attention_max_distance)
        ff_kwargs = dict(d_model=d_model, d_ff=d_ff, dropout_rate=dropout_rate, layer_norm_epsilon=layer_norm_epsilon,
                         act=self.dense_act_fn, gated=self.is_gated_act)
        self.shared = Embedding(vocab_size, d_model)
        self.encoder = T5Stack(self.shared, num_layers, d_model, dropout_rate, layer_norm_epsilon, attention_kwargs,
                               ff_kwargs)

    @staticmethod
    def feed_forward_activation(feed_forward_proj: str, dense_act_fn: str | None = None,
                                is_gated_act: bool | None = None) -> tuple[str, bool]:
        """("gated-gelu" -> ("gelu_new", True), "relu" -> ("relu", False)); explicit config values win,
        as in transformers' T5Config."""
        parts = feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj {feed_forward_proj!r} must be 'ACT' or 'gated-ACT' (e.g. "
                             f"'gated-gelu', 'relu')")
        derived = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
        return dense_act_fn or derived, parts[0] == "gated" if is_gated_act is None else bool(is_gated_act)

    def config_to_save(self) -> dict:
        # transformers reads these two back as they are, so they are written resolved, never null
        return {**super().config_to_save(), "dense_act_fn": self.dense_act_fn, "is_gated_act": self.is_gated_act,
                "is_encoder_decoder": False, "use_cache": False}

    def get_input_embeddings(self) -> Embedding:
        return self.shared

    def __call__(self, *args, **kwargs):
        # The bucket table is a constant of the graph; a longer input than it covers rebuilds it
        # here, before construct, so that graph mode compiles the new shape with the new table.
        bound = inspect.signature(self.construct).bind(*args, **kwargs)
        input_ids = bound.arguments.get("input_ids")
        attention = self.encoder.block[0].layer[0].SelfAttention
        if input_ids is not None and input_ids.ndim == 2 and input_ids.shape[1] > attention.bucket_length:
            attention.set_bucket_length(max(input_ids.shape[1], 2 * attention.bucket_length))
        return super().__call__(*args, **kwargs)

    def construct(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_hidden_states: bool = False,
                  return_dict: bool = True):
        """input_ids (B, L); attention_mask (B, L) of 1 / 0, optional (FLUX passes none). Returns
        last_hidden_state (B, L, d_model) and, with output_hidden_states, the embeddings, every
        block's output and the final normed output."""
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be (batch, seq_len); got shape {input_ids.shape}")
        last_hidden_state, all_states = self.encoder(input_ids, attention_mask, output_hidden_states)
        hidden_states = all_states if output_hidden_states else None
        if not return_dict:
            return (last_hidden_state,) + ((hidden_states,) if output_hidden_states else ())
        return BaseModelOutput(last_hidden_state=last_hidden_state, hidden_states=hidden_states)
