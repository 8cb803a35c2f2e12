"""FluxTransformer2DModel: the FLUX.1 MMDiT, with diffusers' constructor and parameter names.

Shapes, for batch B, L text tokens, N image tokens, S = L + N, H heads of D channels, dim = H * D:

    hidden_states (B, N, in_channels) --x_embedder--> (B, N, dim)
    encoder_hidden_states (B, L, joint_attention_dim) --context_embedder--> (B, L, dim)
    timestep, guidance (B,), pooled_projections (B, pooled_dim) --time_text_embed--> temb (B, dim)
    cat(txt_ids, img_ids) (S, 3) --pos_embed--> cos, sin (S, D)
    double blocks: text and image streams, joint attention over S
    single blocks: one joint stream (B, S, dim), attention and MLP in parallel
    norm_out + proj_out on the image tokens -> (B, N, patch_size^2 * out_channels)
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections import namedtuple

import mindspore as ms
from mindspore import Tensor, nn, ops

from ..adapters.peft_mixin import PeftAdapterMixin
from ..backend import AttentionChoice, expand_as, merge_heads, over_token_chunks, policy, split_heads
from ..configuration_utils import register_to_config
from ..modeling_utils import ModelMixin
from .activations import gelu_tanh
from .attention import AttentionBackendMixin, scaled_dot_product_attention
from .cache_utils import CacheMixin
from .embeddings import (
    CombinedTimestepGuidanceTextProjEmbeddings,
    CombinedTimestepTextProjEmbeddings,
    FluxPosEmbed,
    apply_rotary_emb,
    rotate_pairs_matrix,
)
from .normalization import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    LayerNorm,
    RMSNorm,
    modulate,
)
from .single_file import load_bfl_transformer

logger = logging.getLogger(__name__)

Transformer2DModelOutput = namedtuple("Transformer2DModelOutput", ["sample"])

_FP16_MAX = 65504.0


def _clip_fp16(x: Tensor) -> Tensor:
    # Residual sums overflow fp16 in late blocks; diffusers clamps them the same way.
    return ops.clamp(x, -_FP16_MAX, _FP16_MAX) if x.dtype == ms.float16 else x


def _gated(gate: Tensor, x: Tensor) -> Tensor:
    """A block's residual branch x (B, S, dim) scaled by its per-sample gate (B, dim)."""
    return expand_as(gate[:, None], x) * x


def _is_batch_vector(x: Tensor, batch: int) -> bool:
    """A scalar, (1,) or (batch,): the shapes diffusers accepts for timestep and guidance."""
    return x.ndim == 0 or (x.ndim == 1 and x.shape[0] in (1, batch))


class GELU(nn.Cell):
    """proj -> tanh-approximated GELU (diffusers' "gelu-approximate")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Dense(dim_in, dim_out)

    def construct(self, x: Tensor) -> Tensor:
        return gelu_tanh(self.proj(x))


class FeedForward(nn.Cell):
    """dim -> 4 dim -> dim. Index 1 is diffusers' dropout slot, kept so the names are net.0 / net.2."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.CellList([GELU(dim, dim * mult), nn.Identity(), nn.Dense(dim * mult, dim)])

    def construct(self, x: Tensor) -> Tensor:
        return over_token_chunks(self._forward, x)  # in chunks of tokens on the CPU (backend.layout)

    def _forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class FluxAttention(AttentionChoice, nn.Cell):
    """Multi-head attention with RMS-normed q/k and rotary positions.

    Double blocks (`added_kv_proj_dim` set) project the text stream with add_*_proj, attend over
    [text; image] and return (image out, text out). Single blocks (`pre_only`) attend over the
    joint stream and return the attention output before any projection. The kernel (`self.backend`)
    is the device policy's choice.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, added_kv_proj_dim: int | None = None,
                 pre_only: bool = False, eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.scale = head_dim**-0.5
        self.rotate_pairs = rotate_pairs_matrix(head_dim)
        inner = heads * head_dim
        self.to_q = nn.Dense(dim, inner)
        self.to_k = nn.Dense(dim, inner)
        self.to_v = nn.Dense(dim, inner)
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.pre_only = pre_only
        if not pre_only:
            self.to_out = nn.CellList([nn.Dense(inner, dim), nn.Identity()])
        self.has_context = added_kv_proj_dim is not None
        if self.has_context:
            self.add_q_proj = nn.Dense(added_kv_proj_dim, inner)
            self.add_k_proj = nn.Dense(added_kv_proj_dim, inner)
            self.add_v_proj = nn.Dense(added_kv_proj_dim, inner)
            self.norm_added_q = RMSNorm(head_dim, eps)
            self.norm_added_k = RMSNorm(head_dim, eps)
            self.to_add_out = nn.Dense(inner, dim)
        self.follow_policy()

    def _split_heads(self, x: Tensor, proj: nn.Cell, norm: nn.Cell | None) -> Tensor:
        """(B, S, dim) -> (B, H, S, D), RMS-normed per head when `norm` is given."""
        h = split_heads(proj(x), self.head_dim)
        return norm(h) if norm is not None else h

    def construct(self, hidden_states: Tensor, encoder_hidden_states: Tensor | None, cos: Tensor, sin: Tensor):
        q = self._split_heads(hidden_states, self.to_q, self.norm_q)
        k = self._split_heads(hidden_states, self.to_k, self.norm_k)
        v = self._split_heads(hidden_states, self.to_v, None)
        if self.has_context:  # text tokens come first in the joint sequence
            q = ops.cat((self._split_heads(encoder_hidden_states, self.add_q_proj, self.norm_added_q), q), 2)
            k = ops.cat((self._split_heads(encoder_hidden_states, self.add_k_proj, self.norm_added_k), k), 2)
            v = ops.cat((self._split_heads(encoder_hidden_states, self.add_v_proj, None), v), 2)
        # The softmax scale goes into q's rotation tables, (S, D), instead of the (B, H, S, S) scores.
        q = apply_rotary_emb(q, cos * self.scale, sin * self.scale, self.rotate_pairs)
        k = apply_rotary_emb(k, cos, sin, self.rotate_pairs)
        out = merge_heads(scaled_dot_product_attention(q, k, v, self.backend, scale=1.0))  # (B, S, H * D)
        if self.pre_only:
            return out
        text_len = encoder_hidden_states.shape[1] if self.has_context else 0
        img_out = self.to_out[0](out[:, text_len:])
        if not self.has_context:
            return img_out
        return img_out, self.to_add_out(out[:, :text_len])


def _reused_on_ascend(init):
    """Wrap a block's __init__ in mindspore.lazy_inline on Ascend: graph mode then compiles the block class
    once and calls it 19 / 38 times, instead of unrolling all 57 blocks into one graph. MindSpore 2.7.1
    documents lazy_inline for Ascend only, and its CPU backend rejects the reused graphs (measured:
    "Input[0] must be a Primitive ValueNode", bench/bench_compile.py), so elsewhere blocks stay inlined:
    the device policy decides (DevicePolicy.lazy_inline)."""
    lazy = ms.lazy_inline(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        (lazy if policy().lazy_inline else init)(self, *args, **kwargs)

    return __init__


class _ReusableBlock(nn.Cell):
    """A block whose compiled graph lazy_inline shares among instances with equal `cell_init_args`.

    MindSpore's parser keys the shared graph by that string, fixed at construction; LoRA layers added later
    may differ between blocks (rank_pattern, targets that hit some blocks only), so their layout joins the
    key whenever it is read. Without lazy_inline (not Ascend) the attribute does not exist, as before."""

    @property
    def cell_init_args(self) -> str:
        base = self._cell_init_args  # AttributeError unless lazy_inline set it
        layout = [(name, [(a, tuple(cell.lora_A[a].weight.shape)) for a in cell.lora_A.keys()])
                  for name, cell in self.cells_and_names() if hasattr(cell, "lora_A")]
        return base + (str(layout) if layout else "")

    @cell_init_args.setter
    def cell_init_args(self, value: str) -> None:
        self._cell_init_args = value


class FluxTransformerBlock(_ReusableBlock):
    """Double-stream block: text and image keep separate weights and meet in joint attention."""

    @_reused_on_ascend
    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, added_kv_proj_dim=dim, eps=eps)
        self.norm2 = LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ff = FeedForward(dim)
        self.norm2_context = LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ff_context = FeedForward(dim)

    def construct(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor, cos: Tensor,
                  sin: Tensor):
        x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, temb)
        attn_out, context_attn_out = self.attn(x, c, cos, sin)

        hidden_states = hidden_states + _gated(gate_msa, attn_out)
        x = modulate(self.norm2(hidden_states), scale_mlp, shift_mlp)
        hidden_states = hidden_states + _gated(gate_mlp, self.ff(x))

        encoder_hidden_states = encoder_hidden_states + _gated(c_gate_msa, context_attn_out)
        c = modulate(self.norm2_context(encoder_hidden_states), c_scale_mlp, c_shift_mlp)
        encoder_hidden_states = encoder_hidden_states + _gated(c_gate_mlp, self.ff_context(c))
        return _clip_fp16(encoder_hidden_states), hidden_states


class FluxSingleTransformerBlock(_ReusableBlock):
    """Single-stream block on the joint [text; image] sequence: attention and MLP side by side,
    then one output projection of their concatenation."""

    @_reused_on_ascend
    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Dense(dim, self.mlp_hidden_dim)
        self.proj_out = nn.Dense(dim + self.mlp_hidden_dim, dim)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, pre_only=True)

    def construct(self, hidden_states: Tensor, temb: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x, gate = self.norm(hidden_states, temb)
        attn = self.attn(x, None, cos, sin)
        # MLP and output projection are token-wise: in chunks of tokens on the CPU (backend.layout)
        hidden_states = hidden_states + _gated(gate, over_token_chunks(self._mlp_and_out, x, attn))
        return _clip_fp16(hidden_states)

    def _mlp_and_out(self, x: Tensor, attn: Tensor) -> Tensor:
        return self.proj_out(ops.cat((attn, gelu_tanh(self.proj_mlp(x))), -1))


class FluxTransformer2DModel(CacheMixin, AttentionBackendMixin, PeftAdapterMixin, ModelMixin):
    """The FLUX.1 transformer. Defaults are FLUX.1-dev's / schnell's (guidance_embeds differs).
    `enable_cache(FirstBlockCacheConfig(...))` skips steps; see cache_utils.py."""

    _checkpointed_block_lists = ("transformer_blocks", "single_transformer_blocks")
    _cache_output_class = Transformer2DModelOutput

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, ...] = (16, 56, 56),
    ):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"axes_dims_rope {list(axes_dims_rope)} must sum to attention_head_dim "
                             f"{attention_head_dim}")
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        self.guidance_embeds = guidance_embeds
        self.num_rope_axes = len(axes_dims_rope)
        dim = self.inner_dim

        self.pos_embed = FluxPosEmbed(10000, list(axes_dims_rope))
        if guidance_embeds:
            self.time_text_embed = CombinedTimestepGuidanceTextProjEmbeddings(dim, pooled_projection_dim)
        else:
            self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, pooled_projection_dim)
        self.context_embedder = nn.Dense(joint_attention_dim, dim)
        self.x_embedder = nn.Dense(in_channels, dim)
        self.transformer_blocks = nn.CellList(
            [FluxTransformerBlock(dim, num_attention_heads, attention_head_dim)
             for _ in range(num_layers)])
        self.single_transformer_blocks = nn.CellList(
            [FluxSingleTransformerBlock(dim, num_attention_heads, attention_head_dim)
             for _ in range(num_single_layers)])
        self.norm_out = AdaLayerNormContinuous(dim, dim, eps=1e-6)
        self.proj_out = nn.Dense(dim, patch_size * patch_size * self.out_channels)

    @classmethod
    def from_single_file(cls, path: str, config: dict | str | None = None, mindspore_dtype=None, **overrides):
        """Load an original black-forest-labs checkpoint (e.g. flux1-dev.safetensors); see single_file.py."""
        return load_bfl_transformer(cls, path, config=config, mindspore_dtype=mindspore_dtype, **overrides)

    # `joint_attention_kwargs={"scale": s}` scales the LoRA layers for this call only. The scale is
    # applied here, outside `construct`, so a new value needs no graph recompilation.
    def __call__(self, *args, **kwargs):
        bound = inspect.signature(self.construct).bind(*args, **kwargs)
        attention_kwargs = bound.arguments.pop("joint_attention_kwargs", None) or {}
        for name in ("img_ids", "txt_ids"):
            ids = bound.arguments.get(name)
            if ids is not None and ids.ndim == 3:
                logger.warning("Passing 3-D `%s` is deprecated (as in diffusers): pass it as (seq_len, 3)", name)
        unknown = sorted(set(attention_kwargs) - {"scale"})
        if unknown:
            logger.warning("joint_attention_kwargs %s are not used and will be ignored", unknown)
        scale = attention_kwargs.get("scale", 1.0)
        # With a step cache (enable_cache) the forward runs as two compiled parts; see cache_utils.py.
        forward = self._cached_forward if self.is_cache_enabled else super().__call__
        if scale == 1.0:
            return forward(**bound.arguments)
        previous = self.set_lora_scale(scale)
        try:
            return forward(**bound.arguments)
        finally:
            self.set_lora_scale(previous)

    def _check_inputs(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                      guidance):
        cfg = self.config
        if hidden_states is None or hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(f"`hidden_states` must be (batch, image_seq_len, {cfg.in_channels}); got "
                             f"{None if hidden_states is None else hidden_states.shape}")
        batch, seq_len = hidden_states.shape[0], hidden_states.shape[1]
        context, context_dim = encoder_hidden_states, cfg.joint_attention_dim
        if context is None or context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != context_dim:
            raise ValueError(f"`encoder_hidden_states` must be ({batch}, text_seq_len, {context_dim}); "
                             f"got {None if context is None else context.shape}")
        if pooled_projections is None or pooled_projections.shape != (batch, cfg.pooled_projection_dim):
            raise ValueError(f"`pooled_projections` must be ({batch}, {cfg.pooled_projection_dim}); got "
                             f"{None if pooled_projections is None else pooled_projections.shape}")
        if timestep is None or not _is_batch_vector(timestep, batch):
            raise ValueError(f"`timestep` must be a scalar or ({batch},); got "
                             f"{None if timestep is None else timestep.shape}")
        for name, ids, length in (("img_ids", img_ids, seq_len), ("txt_ids", txt_ids, encoder_hidden_states.shape[1])):
            if ids is None or ids.ndim not in (2, 3) or ids.shape[-2] != length or ids.shape[-1] != self.num_rope_axes:
                raise ValueError(f"`{name}` must be ({length}, {self.num_rope_axes}); got "
                                 f"{None if ids is None else ids.shape}")
        if self.guidance_embeds and guidance is None:
            raise ValueError("`guidance` is required: this transformer has guidance_embeds=True (FLUX.1-dev)")
        if not self.guidance_embeds and guidance is not None:
            raise ValueError("`guidance` must be None: this transformer has guidance_embeds=False (FLUX.1-schnell)")
        if guidance is not None and not _is_batch_vector(guidance, batch):
            raise ValueError(f"`guidance` must be a scalar or ({batch},); got {guidance.shape}")

    def construct(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor = None,
        pooled_projections: Tensor = None,
        timestep: Tensor = None,
        img_ids: Tensor = None,
        txt_ids: Tensor = None,
        guidance: Tensor | None = None,
        joint_attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ):
        self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                           guidance)
        hidden_states, encoder_hidden_states, temb, cos, sin = self._embed_inputs(
            hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance)
        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb, cos, sin)
        hidden_states = self._single_blocks(encoder_hidden_states, hidden_states, temb, cos, sin)

        output = self.proj_out(self.norm_out(hidden_states, temb))
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def _embed_inputs(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                      guidance):
        """Everything before the first block: (hidden_states, encoder_hidden_states, temb, cos, sin)."""
        dtype = self.x_embedder.weight.dtype
        batch = hidden_states.shape[0]
        hidden_states = self.x_embedder(hidden_states.astype(dtype))
        encoder_hidden_states = self.context_embedder(encoder_hidden_states.astype(dtype))
        pooled_projections = pooled_projections.astype(dtype)

        timestep = ops.broadcast_to(timestep.astype(dtype).reshape(-1), (batch,)) * 1000
        if guidance is None:
            temb = self.time_text_embed(timestep, pooled_projections)
        else:
            guidance = ops.broadcast_to(guidance.astype(dtype).reshape(-1), (batch,)) * 1000
            temb = self.time_text_embed(timestep, guidance, pooled_projections)

        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        cos, sin = self.pos_embed(ops.cat((txt_ids, img_ids), 0))
        return hidden_states, encoder_hidden_states, temb, cos, sin

    def _single_blocks(self, encoder_hidden_states, hidden_states, temb, cos, sin):
        """The single blocks; returns the image tokens. They share one joint sequence, so it is
        concatenated once, not per block."""
        text_len = encoder_hidden_states.shape[1]
        joint = ops.cat((encoder_hidden_states, hidden_states), 1)
        for block in self.single_transformer_blocks:
            joint = block(joint, temb, cos, sin)
        return joint[:, text_len:]
