"""The attention kernels: the portable math path (hand-written backward) and Ascend's fused flash kernel."""

from __future__ import annotations

import math

import mindspore as ms
from mindspore import Tensor, nn, ops

from .layout import in_order

# (B, H, S, D) x (B, H, S, D) -> (B, H, S, S): transpose_b reads k as stored; an explicit
# transpose would be a copy on the CPU (measured 17 ms vs 38 ms for 1152 tokens x 4 heads).
_scores = ops.BatchMatMul(transpose_b=True)
_weighted_sum = ops.BatchMatMul()
_transposed_weighted_sum = ops.BatchMatMul(transpose_a=True)

BACKENDS = ("math", "flash")

# Where the (B, H, S, S) scores would hold more than MAX_WHOLE_SCORES elements (64 MB in fp32), the math
# path builds them for QUERY_CHUNK queries at a time, one chunk after another, so they are never whole
# (24 heads x 4608^2 x 4 B = 2 GB per attention at 1024^2). Both from measurements at FLUX.1-dev width
# (docs/performance.md: 256 queries peaked 0.3 GB below 512 at 1024^2, at no measurable time cost); smaller
# calls (the tests, the bench config, FLUX.1 at 256^2) run in one piece as before.
QUERY_CHUNK = 256
MAX_WHOLE_SCORES = 16 * 2**20


class _MathAttention(nn.Cell):
    """softmax(q k^T) v with a hand-written backward.

    Autodiff's softmax backward reduces dP * P over the (S, S) scores; the same row sums are
    sum(dO * O) over the head dimension (S, D), S / D times less work (the flash-attention
    identity). On the CPU this saved about 17 ms per attention call at 1152 tokens x 4 heads.
    """

    def construct(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        scores = _scores(query, key)
        if scores.dtype != ms.float32:
            probs = ops.softmax(scores.astype(ms.float32), -1).astype(query.dtype)
        else:
            probs = ops.softmax(scores, -1)
        return _weighted_sum(probs, value), probs

    def bprop(self, query, key, value, out, dout):
        out_value, probs = out
        d_out = dout[0]
        d_value = _transposed_weighted_sum(probs, d_out)
        d_probs = _scores(d_out, value)
        # rowsum(dP * P) == rowsum(dO * O), computed in fp32
        row = (d_out.astype(ms.float32) * out_value.astype(ms.float32)).sum(-1, keepdims=True)
        d_scores = (probs.astype(ms.float32) * (d_probs.astype(ms.float32) - row)).astype(query.dtype)
        return _weighted_sum(d_scores, key), _transposed_weighted_sum(d_scores, query), d_value


_math_attention = _MathAttention()


def flash_attention(query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
    """Ascend's fused FlashAttentionScore on (B, H, S, D) fp16/bf16 inputs (Atlas A2 only)."""
    return ops.flash_attention_score(query, key, value, query.shape[1], input_layout="BNSD", scalar_value=scale)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, backend: str = "math",
                                 scale: float | None = None) -> Tensor:
    """softmax(scale * q k^T) v for (B, H, S, D) inputs, no mask (FLUX attends to every token).

    `backend` is what the device policy chose ("flash" is used for fp16/bf16 only: the fused kernel
    takes nothing else). `scale` defaults to 1/sqrt(D); callers that folded it into q pass 1.0.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if backend == "flash" and query.dtype != ms.float32:
        return flash_attention(query, key, value, scale)
    if scale != 1.0:
        query = query * scale  # (B, H, S, D) is cheaper to scale than the (B, H, S, S) scores
    return _chunked_math_attention(query, key, value)


def _chunked_math_attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """The math path over chunks of QUERY_CHUNK queries where the whole scores would be large: a row's
    softmax needs every key but no other query, so chunks are independent. Each chunk's backward is
    _MathAttention's own; autodiff sums the key and value gradients over chunks and concatenates the
    query gradients (split's backward)."""
    batch, heads, queries = query.shape[:3]
    keys = key.shape[2]
    # A dynamic-shape graph (the tiled VAE's) knows its lengths only at run time: split needs them at compile
    # time, so such calls run in one piece.
    dynamic = not (ops.isconstant(queries) and ops.isconstant(keys))
    if dynamic or queries <= QUERY_CHUNK or batch * heads * queries * keys <= MAX_WHOLE_SCORES:
        return _math_attention(query, key, value)[0]
    outs = ()
    for part in ops.split(query, QUERY_CHUNK, 2):
        part = in_order(part, outs[-1]) if outs else part
        outs = outs + (_math_attention(part, key, value)[0],)
    return ops.concat(outs, 2)
