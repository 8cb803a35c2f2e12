"""Step caches for the FLUX transformer: at a step whose input has barely changed since the last
fully computed step, skip the remaining blocks and reuse the residual they added then.

    FirstBlockCacheConfig(threshold)   diffusers' FirstBlockCache, same name and rule: the signal is
        the residual the first double block adds to the image tokens; a step is computed when
        mean|r - r_last| / mean|r_last| > threshold, with r_last the residual of the last computed
        step. Skipped: image tokens after block 0 + the cached residual of blocks 1..end.
    TeaCacheConfig(threshold)          TeaCache4FLUX: the signal is block 0's timestep-modulated
        input (norm1(x, temb)), compared with the previous step's; the relative L1 change is
        rescaled by a polynomial fitted on FLUX.1 and accumulated; a step is skipped while the sum
        stays under the threshold. The first and last steps are always computed. Skipped: the
        embedded image tokens + the cached residual of all blocks.

`transformer.enable_cache(config)` / `disable_cache()` as in diffusers. The pipeline resets the
cache at the start of each call (`reset_cache`) and keeps the conditional and the negative (true
CFG) passes apart with `cache_context("cond" / "uncond")`.

Graph mode: the forward runs as two compiled Cells, compiled once per shape, not per step. `_Head`
(embeddings, the signal, its change, and the output a skipped step would give) runs at every
step; `_Tail` (the remaining blocks and the output) only at computed steps. The decision is taken
in Python between the two, from one scalar, as diffusers does with `.item()`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

logger = logging.getLogger(__name__)

# TeaCache4FLUX's rescale polynomial (ali-vilab/TeaCache, teacache_flux.py), highest power first:
# fitted on FLUX.1-dev from the modulated-input change to the output change.
FLUX_TEACACHE_COEFFICIENTS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)


@dataclass
class FirstBlockCacheConfig:
    """diffusers' FirstBlockCacheConfig: compute all blocks when the first block's residual changed by
    more than `threshold` (relative mean absolute change) since the last computed step."""

    threshold: float = 0.05

    def __post_init__(self):
        if not self.threshold >= 0:
            raise ValueError(f"FirstBlockCacheConfig threshold must be >= 0; got {self.threshold}")

    def __str__(self) -> str:
        return f"fbcache:{self.threshold:g}"


@dataclass
class TeaCacheConfig:
    """TeaCache for FLUX: skip while the accumulated, rescaled change of block 0's modulated input stays
    under `threshold` (TeaCache4FLUX's rel_l1_thresh: 0.25 ~1.5x, 0.4 ~1.8x, 0.6 ~2.0x on FLUX.1-dev)."""

    threshold: float = 0.4
    coefficients: tuple[float, ...] = field(default=FLUX_TEACACHE_COEFFICIENTS)

    def __post_init__(self):
        if not self.threshold >= 0:
            raise ValueError(f"TeaCacheConfig threshold must be >= 0; got {self.threshold}")
        self.coefficients = tuple(float(c) for c in self.coefficients)

    def __str__(self) -> str:
        return f"teacache:{self.threshold:g}"


CACHE_KINDS = {"fbcache": FirstBlockCacheConfig, "teacache": TeaCacheConfig}


def parse_cache_config(spec: str) -> FirstBlockCacheConfig | TeaCacheConfig:
    """"fbcache:0.12" / "teacache:0.4" (a bare kind takes its default threshold) -> a config."""
    kind, _, value = spec.partition(":")
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache {spec!r}: the kind must be one of {', '.join(CACHE_KINDS)} (e.g. fbcache:0.12)")
    if not value:
        return CACHE_KINDS[kind]()
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"cache {spec!r}: the threshold {value!r} is not a number") from None
    return CACHE_KINDS[kind](threshold=threshold)


class _ContextState:
    """What one cache context (cond / uncond) keeps between steps."""

    def __init__(self):
        self.previous_signal: Tensor | None = None  # FBCache: of the last computed step; TeaCache: of the last step
        self.cached_residual: Tensor | None = None
        self.accumulated = 0.0
        self.step = 0
        self.skipped: list[int] = []


def should_compute(config: FirstBlockCacheConfig | TeaCacheConfig, state: _ContextState, change: float,
                   num_inference_steps: int | None) -> bool:
    """The decision at step `state.step`, given the signal's relative change from the previous one
    (ignored when there is no previous signal). Updates TeaCache's accumulated distance."""
    if state.previous_signal is None or state.cached_residual is None:
        state.accumulated = 0.0
        return True
    if isinstance(config, FirstBlockCacheConfig):
        return change > config.threshold
    last = num_inference_steps is not None and state.step >= num_inference_steps - 1
    if state.step == 0 or last:
        state.accumulated = 0.0
        return True
    state.accumulated += float(np.polyval(config.coefficients, change))
    if state.accumulated < config.threshold:
        return False
    state.accumulated = 0.0
    return True


def _relative_l1(signal: Tensor, previous: Tensor) -> Tensor:
    # In fp32: a bf16 mean over a million values would round the ratio the decision depends on.
    signal, previous = signal.astype(ms.float32), previous.astype(ms.float32)
    return ops.abs(signal - previous).mean() / ops.abs(previous).mean()


class _Head(nn.Cell):
    """Embeddings, the change signal and its relative change, and the output of a skipped step."""

    def __init__(self, transformer, first_block: bool):
        super().__init__(auto_prefix=False)  # the transformer's parameters keep their names
        self.transformer = transformer
        self.first_block = first_block

    def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance, previous_signal, cached_residual):
        t = self.transformer
        hidden_states, encoder_hidden_states, temb, cos, sin = t._embed_inputs(
            hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance)
        if self.first_block:  # FBCache: block 0 runs here; its residual on the image tokens is the signal
            encoder_out, hidden_out = t.transformer_blocks[0](hidden_states, encoder_hidden_states, temb, cos, sin)
            signal = hidden_out - hidden_states
            hidden_states, encoder_hidden_states = hidden_out, encoder_out
        else:  # TeaCache: block 0's timestep-modulated input
            signal = t.transformer_blocks[0].norm1(hidden_states, temb)[0]
        change = _relative_l1(signal, previous_signal)
        skipped = t.proj_out(t.norm_out(hidden_states + cached_residual, temb))
        return hidden_states, encoder_hidden_states, temb, cos, sin, signal, change, skipped


class _Tail(nn.Cell):
    """The blocks after the head, the output, and the residual they added to the image tokens."""

    def __init__(self, transformer, start: int):
        super().__init__(auto_prefix=False)
        self.transformer = transformer
        self.blocks = nn.CellList(list(transformer.transformer_blocks)[start:], auto_prefix=False)

    def construct(self, hidden_states, encoder_hidden_states, temb, cos, sin):
        t = self.transformer
        start = hidden_states
        for block in self.blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb, cos, sin)
        hidden_states = t._single_blocks(encoder_hidden_states, hidden_states, temb, cos, sin)
        return t.proj_out(t.norm_out(hidden_states, temb)), hidden_states - start


class _CacheRunner:
    """The compiled parts and the per-context state of one enabled cache (a plain object, so the
    transformer's Cell tree, and its parameter names, do not change)."""

    def __init__(self, parts: tuple[_Head, _Tail], config):
        self.config = config
        self.head, self.tail = parts
        self.states: dict[str, _ContextState] = {}
        self.context = "cond"
        self.num_inference_steps: int | None = None


class CacheMixin:
    """enable_cache / disable_cache / cache_context, as diffusers' CacheMixin, for the FLUX transformer."""

    _cache_runner: _CacheRunner | None = None
    _cache_parts: dict | None = None  # kind -> (_Head, _Tail): enabling again reuses their compiled graphs
    _cache_output_class = None  # the model's output named tuple (sample=...)

    @property
    def is_cache_enabled(self) -> bool:
        return self._cache_runner is not None

    @property
    def cache_config(self):
        return None if self._cache_runner is None else self._cache_runner.config

    def enable_cache(self, config: FirstBlockCacheConfig | TeaCacheConfig) -> None:
        if self.is_cache_enabled:
            raise ValueError(f"Caching has already been enabled with {type(self.cache_config).__name__}; call "
                             "disable_cache() before enabling another")
        if not isinstance(config, (FirstBlockCacheConfig, TeaCacheConfig)):
            raise ValueError(f"Cache config {type(config).__name__} is not supported; use FirstBlockCacheConfig "
                             "or TeaCacheConfig")
        if len(self.transformer_blocks) < 1:
            raise ValueError("a step cache needs at least one double block (num_layers >= 1)")
        first_block = isinstance(config, FirstBlockCacheConfig)
        if self._cache_parts is None:
            self._cache_parts = {}
        if first_block not in self._cache_parts:
            self._cache_parts[first_block] = (_Head(self, first_block), _Tail(self, 1 if first_block else 0))
        self._cache_runner = _CacheRunner(self._cache_parts[first_block], config)

    def disable_cache(self) -> None:
        if self._cache_runner is None:
            logger.warning("Caching techniques have not been enabled, so there's nothing to disable.")
            return
        self._cache_runner = None

    def reset_cache(self, num_inference_steps: int | None = None) -> None:
        """Forget every context's cached tensors (a new image starts); TeaCache computes the last of
        `num_inference_steps` steps. The pipelines call this at the start of each call."""
        if self._cache_runner is not None:
            self._cache_runner.states = {}
            self._cache_runner.num_inference_steps = num_inference_steps

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        """Calls inside use (and update) the cache state named `name`, e.g. "cond" and "uncond"."""
        runner = self._cache_runner
        if runner is None:
            yield
            return
        previous, runner.context = runner.context, name
        try:
            yield
        finally:
            runner.context = previous

    @property
    def cache_skipped_steps(self) -> dict[str, list[int]]:
        """Per context, the steps (0-based) skipped since the last reset_cache."""
        runner = self._cache_runner
        return {} if runner is None else {name: list(s.skipped) for name, s in runner.states.items()}

    def _cached_forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                        img_ids=None, txt_ids=None, guidance=None, return_dict=True):
        self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                           guidance)
        runner = self._cache_runner
        state = runner.states.setdefault(runner.context, _ContextState())
        shape = (hidden_states.shape[0], hidden_states.shape[1], self.inner_dim)
        if state.previous_signal is not None and tuple(state.previous_signal.shape) != shape:
            state = runner.states[runner.context] = _ContextState()  # another batch or resolution: start over
        first = state.previous_signal is None or state.cached_residual is None  # both are set at step 0
        zeros = ops.zeros(shape, self.x_embedder.weight.dtype) if first else None  # same graph inputs at step 0
        hidden, encoder, temb, cos, sin, signal, change, skipped = runner.head(
            hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
            zeros if first else state.previous_signal, zeros if first else state.cached_residual)
        compute = should_compute(runner.config, state, 0.0 if first else float(change.asnumpy()),
                                 runner.num_inference_steps)
        if compute:
            output, state.cached_residual = runner.tail(hidden, encoder, temb, cos, sin)
        else:
            output = skipped
            state.skipped.append(state.step)
        if compute or isinstance(runner.config, TeaCacheConfig):
            state.previous_signal = signal
        state.step += 1
        return self._cache_output_class(sample=output) if return_dict else (output,)


__all__ = ["CacheMixin", "FirstBlockCacheConfig", "TeaCacheConfig", "parse_cache_config",
           "FLUX_TEACACHE_COEFFICIENTS"]
