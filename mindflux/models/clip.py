"""CLIPTextModel: CLIP's text transformer with transformers' constructor, parameter names and numbers.

FLUX.1 uses CLIP ViT-L/14's text tower (text_encoder/) for its pooled output only:

    input_ids (B, S) --token + position embeddings--> (B, S, hidden)
    num_hidden_layers pre-LayerNorm blocks with causal self-attention and a quick_gelu MLP
    final_layer_norm -> last_hidden_state (B, S, hidden)
    pooler_output (B, hidden): last_hidden_state at each sequence's end-of-text token
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..adapters.peft_mixin import PeftAdapterMixin
from ..configuration_utils import register_to_config
from .normalization import LayerNorm
from .text_encoder_utils import (
    Activation,
    BaseModelOutputWithPooling,
    Embedding,
    TransformersModelMixin,
    finfo_min,
)

# q k^T reads k as stored (an explicit transpose is a copy on the CPU)
_scores = ops.BatchMatMul(transpose_b=True)
_weighted_sum = ops.BatchMatMul()


class CLIPTextEmbeddings(nn.Cell):
    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int):
        super().__init__()
        self.max_position_embeddings = max_position_embeddings
        self.token_embedding = Embedding(vocab_size, hidden_size)
        self.position_embedding = Embedding(max_position_embeddings, hidden_size)

    def construct(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        seq_len = input_ids.shape[-1]
        if seq_len > self.max_position_embeddings:
            raise ValueError(f"CLIP takes at most {self.max_position_embeddings} tokens (max_position_embeddings); "
                             f"got {seq_len}: truncate the prompt when tokenizing")
        if position_ids is None:
            positions = self.position_embedding.weight[:seq_len]  # position ids 0..S-1, without a gather
        else:
            positions = self.position_embedding(position_ids)
        return self.token_embedding(input_ids) + positions


class CLIPAttention(nn.Cell):
    def __init__(self, hidden_size: int, num_attention_heads: int, attention_dropout: float = 0.0):
        super().__init__()
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_attention_heads "
                             f"{num_attention_heads}")
        self.embed_dim, self.num_heads = hidden_size, num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.k_proj = nn.Dense(hidden_size, hidden_size)
        self.v_proj = nn.Dense(hidden_size, hidden_size)
        self.q_proj = nn.Dense(hidden_size, hidden_size)
        self.out_proj = nn.Dense(hidden_size, hidden_size)
        self.dropout = nn.Dropout(p=attention_dropout)

    def _heads(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.reshape(b, s, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        """`attention_mask` is additive, fp32, broadcastable to (B, heads, S, S)."""
        b, s, _ = hidden_states.shape
        q = self._heads(self.q_proj(hidden_states))
        k = self._heads(self.k_proj(hidden_states))
        v = self._heads(self.v_proj(hidden_states))
        scores = _scores(q, k) * self.scale
        if scores.dtype != ms.float32:  # softmax in fp32, as transformers does for half precision
            scores = scores.astype(ms.float32)
        probs = self.dropout(ops.softmax(scores + attention_mask, -1).astype(q.dtype))
        out = _weighted_sum(probs, v).transpose(0, 2, 1, 3).reshape(b, s, self.embed_dim)
        return self.out_proj(out)


class CLIPMLP(nn.Cell):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.activation_fn = Activation(hidden_act)
        self.fc1 = nn.Dense(hidden_size, intermediate_size)
        self.fc2 = nn.Dense(intermediate_size, hidden_size)

    def construct(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    def __init__(self, hidden_size: int, intermediate_size: int, num_attention_heads: int, hidden_act: str,
                 layer_norm_eps: float, attention_dropout: float):
        super().__init__()
        self.self_attn = CLIPAttention(hidden_size, num_attention_heads, attention_dropout)
        self.layer_norm1 = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, hidden_act)
        self.layer_norm2 = LayerNorm(hidden_size, eps=layer_norm_eps)

    def construct(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), attention_mask)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nn.Cell):
    def __init__(self, num_hidden_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(**layer_kwargs) for _ in range(num_hidden_layers)])

    def construct(self, hidden_states: Tensor, attention_mask: Tensor, output_hidden_states: bool = False):
        all_states = ()
        for layer in self.layers:
            if output_hidden_states:
                all_states = all_states + (hidden_states,)
            hidden_states = layer(hidden_states, attention_mask)
        if output_hidden_states:
            all_states = all_states + (hidden_states,)
        return hidden_states, all_states


class CLIPTextTransformer(nn.Cell):
    def __init__(self, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                 num_attention_heads: int, max_position_embeddings: int, hidden_act: str, layer_norm_eps: float,
                 attention_dropout: float, eos_token_id: int):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, hidden_size, max_position_embeddings)
        self.encoder = CLIPEncoder(num_hidden_layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                   num_attention_heads=num_attention_heads, hidden_act=hidden_act,
                                   layer_norm_eps=layer_norm_eps, attention_dropout=attention_dropout)
        self.final_layer_norm = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.eos_token_id = eos_token_id
        n = max_position_embeddings
        # Constants, sliced to the sequence length in construct: the causal mask (additive, fp32)
        # and the position index used by pooling.
        causal = np.triu(np.full((n, n), finfo_min(ms.float32), np.float32), 1)
        self._causal_mask = Tensor(causal[None, None])
        self._positions = Tensor(np.arange(n, dtype=np.int32)[None])

    def _pooled_index(self, input_ids: Tensor) -> Tensor:
        """Per sequence, the first position holding the end-of-text token: the first maximal id when
        the config has the legacy eos_token_id 2 (as FLUX's has), else the first `eos_token_id`
        (position 0 when absent). Both as transformers chooses them."""
        ids = input_ids.astype(ms.int32)
        seq_len = ids.shape[-1]
        target = ids.max(axis=-1, keepdims=True) if self.eos_token_id == 2 else self.eos_token_id
        # non-matching positions are pushed past the end; none matching leaves seq_len, which % makes 0
        miss = (ids != target).astype(ms.int32)
        first = (self._positions[:, :seq_len] + miss * seq_len).min(axis=-1, keepdims=True)
        return first % seq_len

    def construct(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                  output_hidden_states: bool = False):
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be (batch, seq_len); got shape {input_ids.shape}")
        seq_len = input_ids.shape[-1]
        hidden_states = self.embeddings(input_ids, position_ids)
        mask = self._causal_mask[:, :, :seq_len, :seq_len]
        if attention_mask is not None:  # padding: 1 = attend, 0 = skip
            keep = attention_mask[:, None, None, :].astype(ms.float32)
            mask = mask + (1.0 - keep) * finfo_min(ms.float32)
        hidden_states, all_states = self.encoder(hidden_states, mask, output_hidden_states)
        last_hidden_state = self.final_layer_norm(hidden_states)
        index = self._pooled_index(input_ids)  # (B, 1)
        b, _, width = last_hidden_state.shape
        index = ops.broadcast_to(index[:, :, None], (b, 1, width))
        pooled = ops.gather_elements(last_hidden_state, 1, index)[:, 0]
        return last_hidden_state, pooled, all_states


class CLIPTextModel(PeftAdapterMixin, TransformersModelMixin):
    """The text model of CLIP, without projection. Defaults are transformers' CLIPTextConfig's;
    FLUX.1's text_encoder/config.json has hidden_size 768, 12 layers and heads, intermediate 3072.
    LoRA adapters (add_adapter, ...) as on the transformer; diffusers targets q_proj, k_proj, v_proj, out_proj."""

    model_type = "clip_text_model"
    # checkpoints written by older transformers carry the position_ids buffer
    _keys_to_ignore_on_load_unexpected = (r"position_ids$",)
    _ignored_config_keys = TransformersModelMixin._ignored_config_keys | {"projection_dim", "dropout"}
    _checkpointed_block_lists = ("text_model.encoder.layers",)

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 49408,
        hidden_size: int = 512,
        intermediate_size: int = 2048,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        max_position_embeddings: int = 77,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,
        eos_token_id: int = 49407,
    ):
        super().__init__()
        self.text_model = CLIPTextTransformer(vocab_size, hidden_size, intermediate_size, num_hidden_layers,
                                              num_attention_heads, max_position_embeddings, hidden_act,
                                              layer_norm_eps, attention_dropout, eos_token_id)

    def get_input_embeddings(self) -> Embedding:
        return self.text_model.embeddings.token_embedding

    def construct(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                  output_hidden_states: bool = False, return_dict: bool = True):
        """input_ids (B, S), S <= max_position_embeddings; attention_mask (B, S) of 1 / 0, optional
        (FLUX passes none). Returns last_hidden_state (B, S, hidden), pooler_output (B, hidden) and,
        with output_hidden_states, the embeddings and every layer's output (before final_layer_norm)."""
        last_hidden_state, pooled, all_states = self.text_model(input_ids, attention_mask, position_ids,
                                                                output_hidden_states)
        hidden_states = all_states if output_hidden_states else None
        if not return_dict:
            return (last_hidden_state, pooled) + ((hidden_states,) if output_hidden_states else ())
        return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=pooled,
                                          hidden_states=hidden_states)
