"""AutoencoderKL: the FLUX.1 VAE (and any diffusers AutoencoderKL of the same design), diffusers' API.

FLUX's config: 16 latent channels, block_out_channels [128, 256, 512, 512] (8x downsampling), no
quant convs, attention in the mid blocks, scaling_factor 0.3611 and shift_factor 0.1159 (applied
by the pipeline with mindflux.latents.normalize_latents / denormalize_latents, not here).

`encode` / `decode` run in Python around two compiled Cells, `encoder` and `decoder`, so slicing,
tiling and the latent distribution object need no graph support; in graph mode each distinct
input shape compiles its Cell once. Tiled calls compile one dynamic-shape graph for all their tiles
(the edge tiles are smaller than the others: up to four shapes otherwise). Padding the edge tiles to
one shape would change the result, since GroupNorm takes statistics over the whole tile.

Memory, from tensor sizes (batch 1, fp32; bf16 halves every number): a plain 1024x1024 decode
peaks at about 3 GiB of activations in the last up block (256 -> 128 channels at 1024^2) and
2 GiB in the mid-block attention on the math path (16384^2 scores plus their softmax). With
`enable_tiling(tile_sample_min_size=512)` every decoder call sees at most a 64^2 latent tile:
about 0.75 GiB of activations and 128 MiB of attention, plus ~30 MiB of decoded tiles and output.
`enable_slicing()` decodes one image of a batch at a time. FLUX's config sets sample_size 1024,
so, exactly as in diffusers, plain `enable_tiling()` only tiles images larger than 1024 pixels.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..configuration_utils import register_to_config
from ..latents import standard_normal
from ..modeling_utils import ModelMixin
from .attention import AttentionBackendMixin
from .vae_blocks import Decoder, Encoder, conv2d


class _AnyTileShape:
    """While tiling in graph mode, `cells` (encoder / decoder and their quant convs) take one dynamic-shape
    input (batch, channels, any height, any width): one compile serves every tile shape, with the same
    numbers (measured: identical output; first tiled decode 12.2 s instead of 26.7 s with four tile shapes,
    tiny VAE on the CPU). The cells' earlier input setting comes back afterwards, so untiled calls keep
    their static-shape graphs."""

    def __init__(self, dtype: ms.Type, *cells_and_channels):
        graph = ms.get_context("mode") == ms.GRAPH_MODE
        self.cells = [(c, n) for c, n in cells_and_channels if c is not None] if graph else []
        self.dtype = dtype

    def __enter__(self):
        self.saved = [c.get_inputs() for c, _ in self.cells]
        for cell, channels in self.cells:
            cell.set_inputs(Tensor(shape=[None, channels, None, None], dtype=self.dtype))

    def __exit__(self, *exc):
        for (cell, _), saved in zip(self.cells, self.saved):
            cell._dynamic_shape_inputs = saved  # set_inputs has no way back to static shapes


AutoencoderKLOutput = namedtuple("AutoencoderKLOutput", ["latent_dist"])
DecoderOutput = namedtuple("DecoderOutput", ["sample"])


class DiagonalGaussianDistribution:
    """The encoder's posterior: `parameters` (B, 2C, h, w) are C means then C log-variances."""

    def __init__(self, parameters: Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = ops.chunk(parameters, 2, 1)
        # the clamp keeps exp() finite for untrained or extreme inputs, as diffusers does
        self.logvar = ops.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = ops.zeros_like(self.mean)
        else:
            self.std = ops.exp(0.5 * self.logvar)
            self.var = ops.exp(self.logvar)

    def sample(self, generator: np.random.Generator | int | None = None) -> Tensor:
        """mean + std * noise, noise from `generator` (see `standard_normal`)."""
        noise = Tensor(standard_normal(self.mean.shape, generator))
        if self.mean.dtype != ms.float32:
            noise = noise.astype(self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """KL(self || other) summed over (C, h, w); `other` None is the standard normal."""
        if self.deterministic:
            return Tensor([0.0], ms.float32)
        if other is None:
            terms = ops.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (ops.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0
                     - self.logvar + other.logvar)
        return 0.5 * terms.sum(axis=(1, 2, 3))

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """Negative log-likelihood of `sample`, summed over `dims`."""
        if self.deterministic:
            return Tensor([0.0], ms.float32)
        terms = float(np.log(2.0 * np.pi)) + self.logvar + ops.square(sample - self.mean) / self.var
        return 0.5 * terms.sum(axis=tuple(dims))


def _blend_weights(extent: int, axis: int, dtype: ms.Type) -> tuple[Tensor, Tensor]:
    """(1 - y / extent, y / extent) for y < extent, shaped to broadcast along `axis` of (B, C, H, W).
    Each factor is rounded from float64, as a Python-float factor is in diffusers' blend."""
    y = np.arange(extent, dtype=np.float64) / extent
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    old, new = (Tensor((1 - y).astype(np.float32).reshape(shape)), Tensor(y.astype(np.float32).reshape(shape)))
    return (old, new) if dtype == ms.float32 else (old.astype(dtype), new.astype(dtype))


def _blend(a: Tensor, b: Tensor, extent: int, axis: int) -> Tensor:
    """`b` whose first `extent` rows (axis 2) or columns (axis 3) fade in from the last ones of `a`."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    old, new = _blend_weights(extent, axis, b.dtype)
    if axis == 2:
        mixed = a[:, :, a.shape[2] - extent:] * old + b[:, :, :extent] * new
        return ops.cat((mixed, b[:, :, extent:]), 2) if extent < b.shape[2] else mixed
    mixed = a[:, :, :, a.shape[3] - extent:] * old + b[:, :, :, :extent] * new
    return ops.cat((mixed, b[:, :, :, extent:]), 3) if extent < b.shape[3] else mixed


class AutoencoderKL(AttentionBackendMixin, ModelMixin):
    """A KL-regularised VAE: images <-> latents, with diffusers' constructor, names and methods."""

    _accepted_class_names = ("AutoencoderKL",)

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int | Sequence[int] = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        self.encoder = Encoder(in_channels, latent_channels, down_block_types, block_out_channels, layers_per_block,
                               norm_num_groups, act_fn, double_z=True, mid_block_add_attention=mid_block_add_attention)
        self.decoder = Decoder(latent_channels, out_channels, up_block_types, block_out_channels, layers_per_block,
                               norm_num_groups, act_fn, mid_block_add_attention=mid_block_add_attention)
        self.quant_conv = conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        self.use_slicing = False
        self.use_tiling = False
        self.spatial_scale = 2 ** (len(block_out_channels) - 1)
        size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_min_size = int(size)
        self.tile_latent_min_size = int(size / self.spatial_scale)
        self.tile_overlap_factor = 0.25

    # ---- slicing and tiling switches ----------------------------------------------------------
    def enable_tiling(self, use_tiling: bool = True, *, tile_sample_min_size: int | None = None,
                      tile_overlap_factor: float | None = None) -> None:
        """Encode / decode in overlapping tiles blended together, as diffusers does.

        The tile size defaults to the config's sample_size (1024 for FLUX). `tile_sample_min_size`
        (pixels; the latent tile follows) and `tile_overlap_factor` change it, like setting
        diffusers' attributes of the same names; 512 keeps a 1024^2 decode's activations under ~1 GiB.
        """
        self.use_tiling = use_tiling
        if tile_sample_min_size is not None:
            self.tile_sample_min_size = int(tile_sample_min_size)
            self.tile_latent_min_size = int(tile_sample_min_size / self.spatial_scale)
        if tile_overlap_factor is not None:
            self.tile_overlap_factor = float(tile_overlap_factor)

    def disable_tiling(self) -> None:
        self.enable_tiling(False)

    def enable_slicing(self) -> None:
        """Encode / decode a batch one image at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # ---- encoding -----------------------------------------------------------------------------
    def _check_input(self, x: Tensor, name: str, channels: int) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != channels:
            shape = x.shape if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"`{name}` must be a (batch, {channels}, height, width) Tensor; got {shape}")

    def _encode(self, x: Tensor) -> Tensor:
        if self.use_tiling and (x.shape[-1] > self.tile_sample_min_size or x.shape[-2] > self.tile_sample_min_size):
            return self._tiled_encode(x)
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def encode(self, x: Tensor, return_dict: bool = True):
        """Images (B, in_channels, H, W) in [-1, 1] -> AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)."""
        self._check_input(x, "x", self.config.in_channels)
        if self.use_slicing and x.shape[0] > 1:
            moments = ops.cat([self._encode(x[i:i + 1]) for i in range(x.shape[0])], 0)
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    # ---- decoding -----------------------------------------------------------------------------
    def _decode(self, z: Tensor) -> Tensor:
        if self.use_tiling and (z.shape[-1] > self.tile_latent_min_size or z.shape[-2] > self.tile_latent_min_size):
            return self.tiled_decode(z).sample
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, z: Tensor, return_dict: bool = True, generator=None):
        """Latents (B, latent_channels, h, w) -> DecoderOutput(sample=images). `generator` is unused,
        as in diffusers. FLUX latents from the transformer are first mapped back with
        mindflux.latents.denormalize_latents(z, scaling_factor, shift_factor)."""
        self._check_input(z, "z", self.config.latent_channels)
        if self.use_slicing and z.shape[0] > 1:
            decoded = ops.cat([self._decode(z[i:i + 1]) for i in range(z.shape[0])], 0)
        else:
            decoded = self._decode(z)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    # ---- tiling -------------------------------------------------------------------------------
    def blend_v(self, a: Tensor, b: Tensor, blend_extent: int) -> Tensor:
        return _blend(a, b, blend_extent, 2)

    def blend_h(self, a: Tensor, b: Tensor, blend_extent: int) -> Tensor:
        return _blend(a, b, blend_extent, 3)

    def _tiles(self, x: Tensor, tile: int, stride: int, run, blend_extent: int, keep: int) -> Tensor:
        """Run `run` on overlapping `tile`-sized windows every `stride` pixels, blend each tile into
        its upper and left neighbours (already blended, as diffusers' in-place blending leaves
        them) and keep the top-left `keep` x `keep` of each."""
        height, width = x.shape[2], x.shape[3]
        rows = [[run(x[:, :, i:min(i + tile, height), j:min(j + tile, width)]) for j in range(0, width, stride)]
                for i in range(0, height, stride)]
        out_rows = []
        for i, row in enumerate(rows):
            for j in range(len(row)):
                if i > 0:
                    row[j] = self.blend_v(rows[i - 1][j], row[j], blend_extent)
                if j > 0:
                    row[j] = self.blend_h(row[j - 1], row[j], blend_extent)
            out_rows.append(ops.cat([t[:, :, :keep, :keep] for t in row], 3))
        return ops.cat(out_rows, 2)

    def _tiled_encode(self, x: Tensor) -> Tensor:
        """Moments of `x` encoded tile by tile (not identical to an untiled encode: tiles see less context)."""
        def run(tile):
            moments = self.encoder(tile)
            return self.quant_conv(moments) if self.quant_conv is not None else moments

        stride = int(self.tile_sample_min_size * (1 - self.tile_overlap_factor))
        blend_extent = int(self.tile_latent_min_size * self.tile_overlap_factor)
        latent = self.config.latent_channels
        with _AnyTileShape(x.dtype, (self.encoder, x.shape[1]), (self.quant_conv, 2 * latent)):
            moments = self._tiles(x, self.tile_sample_min_size, stride, run, blend_extent,
                                  self.tile_latent_min_size - blend_extent)
        return moments

    def tiled_encode(self, x: Tensor, return_dict: bool = True):
        posterior = DiagonalGaussianDistribution(self._tiled_encode(x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def tiled_decode(self, z: Tensor, return_dict: bool = True):
        """Decode tile by tile; the decoder only ever sees tile_latent_min_size^2 latents."""
        def run(tile):
            return self.decoder(self.post_quant_conv(tile) if self.post_quant_conv is not None else tile)

        stride = int(self.tile_latent_min_size * (1 - self.tile_overlap_factor))
        blend_extent = int(self.tile_sample_min_size * self.tile_overlap_factor)
        with _AnyTileShape(z.dtype, (self.post_quant_conv, z.shape[1]), (self.decoder, z.shape[1])):
            decoded = self._tiles(z, self.tile_latent_min_size, stride, run, blend_extent,
                                  self.tile_sample_min_size - blend_extent)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, sample: Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: np.random.Generator | int | None = None):
        """Encode, take the posterior's mode (or a sample), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

    def construct(self, sample: Tensor, sample_posterior: bool = False, return_dict: bool = True, generator=None):
        return self.forward(sample, sample_posterior, return_dict, generator)

    # The whole-model call stays in Python (tiling, slicing, host noise); `encoder` and `decoder`
    # are the Cells that compile in graph mode.
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


__all__ = ["AutoencoderKL", "AutoencoderKLOutput", "DecoderOutput", "DiagonalGaussianDistribution"]
