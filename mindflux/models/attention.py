"""Attention for the models: the kernel the device policy picks (math or Ascend's flash), overridable per model."""

from __future__ import annotations

from ..backend import scaled_dot_product_attention
from ..backend import set_attention_backend as _set_attention_backend


class AttentionBackendMixin:
    """`set_attention_backend` / `reset_attention_backend`, as diffusers' ModelMixin has them."""

    def set_attention_backend(self, backend: str) -> None:
        """Use `backend` ("math", or "flash" on Atlas A2; diffusers' "native" / "_native_npu" too) in every
        attention layer instead of the device policy's choice. Raises where the kernel does not exist."""
        _set_attention_backend(self, backend)

    def reset_attention_backend(self) -> None:
        """Follow the device policy's choice again."""
        _set_attention_backend(self, None)


__all__ = ["AttentionBackendMixin", "scaled_dot_product_attention"]
