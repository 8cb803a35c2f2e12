"""Data movement whose cheapest form depends on the device: broadcasting, moving attention heads, token chunks.

MindSpore 2.7.1's CPU kernels for a broadcasting binary op (x * y with y of shape (B, 1, C)) and for Transpose
keep a table of per-element indices (about 16 and 8 bytes per output element) for as long as the kernel lives:
in graph mode that is the compiled graph's life, one table per op. At FLUX.1-dev width and 1024² those tables
were about 5 GB of a 10.3 GB forward (docs/performance.md). `ops.broadcast_to` followed by a same-shape op, and
split/stack, move the same data without them. Where the policy has no `index_tables` (GPU, Ascend) the
implicit forms stay: they need no extra copy there.

The flags are module globals, read when a graph is traced (like the attention's QUERY_CHUNK) and kept current
by the policy listener, so models call these as plain functions.
"""

from __future__ import annotations

from collections.abc import Callable

from mindspore import Tensor, ops

from .policy import on_policy_change, policy

_INDEX_TABLES = False       # the policy's index_tables
_FEED_FORWARD_CHUNK = 0     # the policy's feed_forward_chunk (0: whole sequences)


def _follow_policy() -> None:
    global _INDEX_TABLES, _FEED_FORWARD_CHUNK
    current = policy()
    _INDEX_TABLES, _FEED_FORWARD_CHUNK = current.index_tables, current.feed_forward_chunk


def expand_as(y: Tensor, x: Tensor) -> Tensor:
    """`y` as the operand of an elementwise op with `x` (which has the full shape): broadcast to x's shape where
    the device's broadcasting kernels keep index tables, else `y` unchanged (the op broadcasts it)."""
    return ops.broadcast_to(y, x.shape) if _INDEX_TABLES else y


def split_heads(x: Tensor, head_dim: int) -> Tensor:
    """(B, S, H * D) -> (B, H, S, D)."""
    if _INDEX_TABLES:
        return ops.stack(ops.split(x, head_dim, -1), 1)
    b, s, _ = x.shape
    return x.reshape(b, s, -1, head_dim).transpose(0, 2, 1, 3)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, S, D) -> (B, S, H * D)."""
    if _INDEX_TABLES:
        return ops.cat(ops.unstack(x, 1), -1)
    b, h, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def in_order(first: Tensor, after: Tensor) -> Tensor:
    """`first`, but not before `after` is computed. A graph otherwise runs independent chunks in any order
    (measured: all nine attention chunks' scores at once), so chunks would not bound the memory."""
    return ops.depend(first, after)


def over_token_chunks(fn: Callable[..., Tensor], x: Tensor, other: Tensor | None = None) -> Tensor:
    """fn(x) (or fn(x, other)) for a token-wise `fn` on (B, S, ...) inputs, computed for the policy's
    feed_forward_chunk tokens at a time, in order, where S is longer (and known when the graph is traced): the
    CPU graph then never holds a whole (B, S, 4 * dim) MLP hidden state and its GELU temporaries."""
    tokens = x.shape[1]
    chunk = _FEED_FORWARD_CHUNK
    if not chunk or not ops.isconstant(tokens) or tokens <= chunk:
        return fn(x) if other is None else fn(x, other)
    parts = ops.split(x, chunk, 1)
    others = ops.split(other, chunk, 1) if other is not None else parts
    outs = ()
    for i in range(len(parts)):
        part = in_order(parts[i], outs[-1]) if outs else parts[i]
        outs = outs + ((fn(part) if other is None else fn(part, others[i])),)
    return ops.cat(outs, 1)


_follow_policy()
on_policy_change(_follow_policy)
