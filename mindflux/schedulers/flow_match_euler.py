"""FlowMatchEulerDiscreteScheduler: FLUX's Euler sampler for rectified flow, with diffusers' config and API.

A flow-matching sample at noise level sigma is x_sigma = (1 - sigma) * x_0 + sigma * noise and the
transformer predicts the velocity noise - x_0, so one Euler step is x + (sigma_next - sigma) * v.
The schedule is computed on the host in numpy with diffusers' exact float32 / float64 sequence
(so the arrays agree bit for bit) and kept as MindSpore fp32 tensors in `timesteps` / `sigmas`.
It is plain Python over MindSpore ops, never compiled, so it runs the same in graph and PyNative.
"""

from __future__ import annotations

import logging
import math
import os
from collections import namedtuple
from collections.abc import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor

from ..configuration_utils import ConfigMixin, register_to_config, resolve_folder
from ..hub import resolve_model
from ..safetensors_io import bf16_bits_to_float32, float32_to_bf16_bits

logger = logging.getLogger(__name__)

FlowMatchEulerDiscreteSchedulerOutput = namedtuple("FlowMatchEulerDiscreteSchedulerOutput", ["prev_sample"])

_HALF = (ms.float16, ms.bfloat16)


def _to_numpy(values) -> np.ndarray:
    return values.asnumpy() if isinstance(values, Tensor) else np.asarray(values)


def _round_to(value: np.ndarray, dtype: ms.Type) -> np.ndarray:
    """float32 values rounded to a half dtype and back (round to nearest even, as a cast does)."""
    value = np.asarray(value, np.float32)
    if dtype == ms.bfloat16:
        return bf16_bits_to_float32(float32_to_bf16_bits(value))
    return value.astype(np.float16).astype(np.float32)


def _rounded(x: Tensor, dtype: ms.Type) -> Tensor:
    """An fp32 tensor rounded to `dtype` and back: one half-precision op's result, computed in fp32
    (the CPU backend has no bf16 arithmetic kernels)."""
    return x.astype(dtype).astype(ms.float32)


class FlowMatchEulerDiscreteScheduler(ConfigMixin):
    """Euler steps along the flow-matching ODE, sigma from 1 (noise) to 0 (image).

    FLUX.1-dev: shift 3.0 with `use_dynamic_shifting` (the pipeline passes mu from the image size,
    see mindflux.latents.calculate_shift); FLUX.1-schnell: shift 1.0, no dynamic shifting.
    Options FLUX does not use and this port does not implement (use_beta_sigmas,
    stochastic_sampling) are accepted at their defaults and refused otherwise.
    """

    config_name = "scheduler_config.json"
    _accepted_class_names = ("FlowMatchEulerDiscreteScheduler",)
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int | None = 256,
        max_image_seq_len: int | None = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        for key, value in (("use_beta_sigmas", use_beta_sigmas), ("stochastic_sampling", stochastic_sampling)):
            if value:
                raise ValueError(f"{key}={value!r} is not supported by mindflux's FlowMatchEulerDiscreteScheduler "
                                 "(FLUX does not use it); leave it at its default")
        if sum(bool(v) for v in (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)) > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear'; got {time_shift_type!r}")
        if shift_terminal is not None and not 0 <= shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in [0, 1); got {shift_terminal}")

        # The training schedule, in float32 as diffusers computes it with torch.
        train = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        sigmas = train / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self._shift = shift
        self._set_schedule(sigmas * num_train_timesteps, sigmas)
        self.num_inference_steps: int | None = None
        self.sigma_min = float(sigmas[-1])
        self.sigma_max = float(sigmas[0])

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, *,
                        revision: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, model_source: str | None = None, **overrides):
        """Read `scheduler_config.json` from a folder or a Hub repo id (see mindflux.hub), e.g. a FLUX
        repo with subfolder="scheduler"."""
        root = resolve_model(pretrained_model_name_or_path, subfolder, revision=revision, cache_dir=cache_dir,
                             local_files_only=local_files_only, token=token, model_source=model_source)
        folder = resolve_folder(root, subfolder)
        return cls.from_config(cls.load_config(folder), **overrides)

    def save_pretrained(self, save_directory: str) -> None:
        self.save_config(os.fspath(save_directory))

    # ---- state --------------------------------------------------------------------------------
    def _set_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        self._timesteps_np = np.asarray(timesteps, np.float32)
        self._sigmas_np = np.asarray(sigmas, np.float32)
        self.timesteps = Tensor(self._timesteps_np)
        self.sigmas = Tensor(self._sigmas_np)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def shift(self) -> float:
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    @property
    def step_index(self) -> int | None:
        """Index of the current timestep; it advances by one with every `step`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first timestep, set by img2img-style pipelines with `set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---- schedule -----------------------------------------------------------------------------
    def _sigma_to_t(self, sigma: float) -> float:
        return sigma * self.config.num_train_timesteps

    def time_shift(self, mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
        """Resolution-dependent shift of the sigmas t: exp(mu) (or mu, "linear") against (1/t - 1)^sigma."""
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def stretch_shift_to_terminal(self, t: np.ndarray) -> np.ndarray:
        """Rescale 1 - t so the last sigma lands exactly on `shift_terminal`."""
        one_minus = 1 - t
        scale = one_minus[-1] / (1 - self.config.shift_terminal)
        return 1 - (one_minus / scale)

    def _ends(self, sigmas: np.ndarray) -> tuple[float, float]:
        return float(sigmas[-1]), float(sigmas[0])

    def _convert_to_karras(self, in_sigmas: np.ndarray, num_inference_steps: int) -> np.ndarray:
        sigma_min, sigma_max = self._ends(in_sigmas)
        rho = 7.0  # Karras et al. (2022)
        ramp = np.linspace(0, 1, num_inference_steps)
        low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (high + ramp * (low - high)) ** rho

    def _convert_to_exponential(self, in_sigmas: np.ndarray, num_inference_steps: int) -> np.ndarray:
        sigma_min, sigma_max = self._ends(in_sigmas)
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      sigmas: Sequence[float] | np.ndarray | Tensor | None = None, mu: float | None = None,
                      timesteps: Sequence[float] | np.ndarray | Tensor | None = None) -> None:
        """Build the sampling schedule: `timesteps` (N,) and `sigmas` (N + 1,), ending at 0 (1 if inverted).

        Without `sigmas`, N timesteps are spaced linearly between the training schedule's ends;
        FluxPipeline passes sigmas = linspace(1, 1/N, N) and `mu`. With `use_dynamic_shifting`, `mu`
        is required. `device` is accepted for diffusers compatibility and unused.
        """
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True` "
                             "(mindflux.latents.calculate_shift gives it for an image size)")
        sigmas = None if sigmas is None else _to_numpy(sigmas)
        timesteps = None if timesteps is None else _to_numpy(timesteps)
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("`sigmas` and `timesteps` should have the same length")
        if num_inference_steps is not None:
            if any(v is not None and len(v) != num_inference_steps for v in (sigmas, timesteps)):
                raise ValueError("`sigmas` and `timesteps` should have the same length as num_inference_steps, "
                                 "if `num_inference_steps` is provided")
        elif sigmas is None and timesteps is None:
            raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
        else:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        self.num_inference_steps = num_inference_steps

        # The dtypes below follow diffusers: linspace in float64, given values cast to float32.
        timesteps_given = timesteps is not None
        if timesteps_given:
            timesteps = timesteps.astype(np.float32)
        if sigmas is None:
            if timesteps is None:
                timesteps = np.linspace(self._sigma_to_t(self.sigma_max), self._sigma_to_t(self.sigma_min),
                                        num_inference_steps)
            sigmas = timesteps / cfg.num_train_timesteps
        else:
            sigmas = sigmas.astype(np.float32)
            num_inference_steps = len(sigmas)

        if cfg.use_dynamic_shifting:
            sigmas = self.time_shift(mu, 1.0, sigmas)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if cfg.shift_terminal:
            sigmas = self.stretch_shift_to_terminal(sigmas)
        if cfg.use_karras_sigmas:
            sigmas = self._convert_to_karras(sigmas, num_inference_steps)
        elif cfg.use_exponential_sigmas:
            sigmas = self._convert_to_exponential(sigmas, num_inference_steps)

        sigmas = np.asarray(sigmas).astype(np.float32)
        timesteps = timesteps.astype(np.float32) if timesteps_given else sigmas * np.float32(cfg.num_train_timesteps)
        if cfg.invert_sigmas:
            sigmas = 1.0 - sigmas
            timesteps = sigmas * np.float32(cfg.num_train_timesteps)
            sigmas = np.concatenate([sigmas, np.ones(1, np.float32)])
        else:
            sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        self._set_schedule(timesteps, sigmas)

    # ---- lookup -------------------------------------------------------------------------------
    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of `timestep` in the schedule; the second match if it occurs twice (so an
        img2img run that starts mid-schedule does not skip a sigma), as diffusers."""
        schedule = self._timesteps_np if schedule_timesteps is None else _to_numpy(schedule_timesteps)
        value = _to_numpy(timestep).astype(schedule.dtype).reshape(-1)
        if value.size != 1:
            raise ValueError(f"expected one timestep; got {value.size}")
        indices = np.flatnonzero(schedule == value[0])
        if indices.size == 0:
            raise ValueError(f"timestep {float(value[0])} is not in the schedule; pass one of `scheduler.timesteps`")
        return int(indices[1] if indices.size > 1 else indices[0])

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self.begin_index is None else self._begin_index

    # ---- sampling -----------------------------------------------------------------------------
    def scale_noise(self, sample: Tensor, timestep, noise: Tensor) -> Tensor:
        """Forward process: sigma * noise + (1 - sigma) * sample, one sigma per timestep (per batch
        item), in the sample's dtype."""
        t = _to_numpy(timestep).reshape(-1)
        if self.begin_index is None:
            indices = [self.index_for_timestep(v) for v in t]
        else:
            indices = [self.step_index if self.step_index is not None else self.begin_index] * t.size
        sigma = self._sigmas_np[indices].reshape((-1,) + (1,) * (sample.ndim - 1))
        dtype = sample.dtype
        if dtype not in _HALF:
            return Tensor(sigma).astype(dtype) * noise + (1.0 - Tensor(sigma).astype(dtype)) * sample
        # Half precision, op by op as torch rounds it, computed in fp32 (no bf16 CPU kernels).
        sigma = _round_to(sigma, dtype)
        scaled_noise = _rounded(Tensor(sigma) * noise.astype(ms.float32), dtype)
        scaled_sample = _rounded(Tensor(_round_to(1.0 - sigma, dtype)) * sample.astype(ms.float32), dtype)
        return (scaled_noise + scaled_sample).astype(dtype)

    def step(self, model_output: Tensor, timestep, sample: Tensor, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, per_token_timesteps=None,
             return_dict: bool = True):
        """One Euler step from `timestep` to the next: sample + (sigma_next - sigma) * model_output.

        Computed in fp32 and returned in model_output's dtype (diffusers casts to that dtype, which
        in FluxPipeline is also the latents'). `s_churn`, `s_tmin`, `s_tmax`, `s_noise` and
        `generator` are accepted and unused, as in diffusers.
        """
        if isinstance(timestep, (int, np.integer)) or (
                isinstance(timestep, Tensor) and timestep.dtype in (ms.int32, ms.int64)):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             "`FlowMatchEulerDiscreteScheduler.step()` is not supported. Make sure to pass one of "
                             "the `scheduler.timesteps` as a timestep.")
        if per_token_timesteps is not None:
            raise ValueError("per_token_timesteps is not supported by mindflux's FlowMatchEulerDiscreteScheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self._step_index + 1 >= len(self._sigmas_np):
            raise IndexError(f"step {self._step_index} is past the end of a {self.num_inference_steps}-step schedule;"
                             " call set_timesteps again")
        sigma, sigma_next = self._sigmas_np[self._step_index], self._sigmas_np[self._step_index + 1]
        dt = sigma_next - sigma  # float32, as diffusers' 0-d tensors
        dtype = model_output.dtype
        sample = sample.astype(ms.float32)
        if dtype in _HALF:
            # torch multiplies a half model_output by dt in its dtype: dt is rounded first, then the product.
            product = _rounded(model_output.astype(ms.float32) * float(_round_to(dt, dtype)), dtype)
        else:
            product = model_output.astype(ms.float32) * float(dt)
        prev_sample = (sample + product).astype(dtype)
        self._step_index += 1
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)


__all__ = ["FlowMatchEulerDiscreteScheduler", "FlowMatchEulerDiscreteSchedulerOutput"]
