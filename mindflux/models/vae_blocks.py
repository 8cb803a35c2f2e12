"""The building blocks of AutoencoderKL's encoder and decoder, with diffusers' parameter names.

Encoder: conv_in -> down_blocks (resnets, then a stride-2 conv except in the last block) ->
mid_block (resnet, single-head self-attention, resnet) -> conv_norm_out -> SiLU -> conv_out
giving 2 * latent_channels (mean and log-variance). The decoder mirrors it with nearest-neighbour
2x upsampling followed by a conv, and one more resnet per block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mindspore import Tensor, nn, ops

from ..backend import AttentionChoice
from .attention import scaled_dot_product_attention
from .normalization import GroupNorm

_ACTIVATIONS = {"silu": ops.silu, "swish": ops.silu}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"act_fn {name!r} is not supported (supported: {sorted(_ACTIVATIONS)}; FLUX uses 'silu')")
    return _ACTIVATIONS[name]


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
           padding: int | tuple[int, int, int, int] = 0) -> nn.Conv2d:
    """torch.nn.Conv2d's layout: `weight` (out, in, k, k) and `bias`, explicit zero padding (one int, or
    (top, bottom, left, right))."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad", padding=padding,
                     has_bias=True)


class ResnetBlock2D(nn.Cell):
    """norm -> act -> conv, twice, plus the input (through a 1x1 conv when the channel count changes).
    No timestep embedding: the VAE never has one."""

    def __init__(self, in_channels: int, out_channels: int | None = None, groups: int = 32, eps: float = 1e-6,
                 act_fn: str = "silu", output_scale_factor: float = 1.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.act = activation(act_fn)
        self.output_scale_factor = output_scale_factor

    def construct(self, x: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Cell):
    """Stride-2 3x3 conv. With padding 0 (the encoder's setting) diffusers pads one pixel on the right
    and bottom only, so odd and even sizes both halve; here the conv pads asymmetrically itself.
    (A separate ops.pad before the conv gives the same numbers, but its backward after another conv
    hangs MindSpore 2.7.1's CPU graph runtime on the 17th call.)"""

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        pads = (0, 1, 0, 1) if padding == 0 else padding  # (top, bottom, left, right)
        self.conv = conv2d(channels, out_channels or channels, 3, stride=2, padding=pads)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample2D(nn.Cell):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = conv2d(channels, out_channels or channels, 3, padding=1)

    def construct(self, x: Tensor) -> Tensor:
        # Broadcast + reshape is exact nearest 2x and has kernels for every dtype on every backend
        # (the CPU resize kernel has no bf16 version).
        b, c, h, w = x.shape
        x = ops.broadcast_to(x[:, :, :, None, :, None], (b, c, h, 2, w, 2)).reshape(b, c, 2 * h, 2 * w)
        return self.conv(x)


class Attention(AttentionChoice, nn.Cell):
    """diffusers' Attention as the VAE mid-block builds it: group-norm, self-attention over the H*W
    pixels, output projection, plus the residual, divided by `rescale_output_factor`."""

    def __init__(self, query_dim: int, heads: int = 1, dim_head: int = 64, norm_num_groups: int = 32,
                 eps: float = 1e-6, rescale_output_factor: float = 1.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.head_dim = heads, dim_head
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = GroupNorm(norm_num_groups, query_dim, eps)
        self.to_q = nn.Dense(query_dim, inner)
        self.to_k = nn.Dense(query_dim, inner)
        self.to_v = nn.Dense(query_dim, inner)
        # index 1 is diffusers' dropout slot, kept so the projection is named to_out.0
        self.to_out = nn.CellList([nn.Dense(inner, query_dim), nn.Identity()])
        self.follow_policy()

    def _heads(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.reshape(b, s, self.heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(0, 2, 1)  # (B, H*W, C)
        q, k, v = self._heads(self.to_q(tokens)), self._heads(self.to_k(tokens)), self._heads(self.to_v(tokens))
        # The policy's kernel; an fp32 VAE (diffusers' default) takes the math path even on Ascend.
        out = scaled_dot_product_attention(q, k, v, self.backend)  # (B, heads, H*W, D)
        out = out.transpose(0, 2, 1, 3).reshape(b, h * w, self.heads * self.head_dim)
        out = self.to_out[0](out).transpose(0, 2, 1).reshape(b, c, h, w)
        out = out + x
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


class UNetMidBlock2D(nn.Cell):
    """resnet, then (attention, resnet) per layer. Without attention the `attentions` list is empty,
    which matches diffusers' state dict (its list holds Nones)."""

    def __init__(self, in_channels: int, groups: int = 32, eps: float = 1e-6, act_fn: str = "silu",
                 add_attention: bool = True, attention_head_dim: int | None = None, num_layers: int = 1):
        super().__init__()
        head_dim = attention_head_dim or in_channels
        self.add_attention = add_attention
        self.resnets = nn.CellList([ResnetBlock2D(in_channels, in_channels, groups, eps, act_fn)
                                    for _ in range(num_layers + 1)])
        self.attentions = nn.CellList(
            [Attention(in_channels, in_channels // head_dim, head_dim, groups, eps) for _ in range(num_layers)]
            if add_attention else [])

    def construct(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for i in range(len(self.resnets) - 1):
            if self.add_attention:
                x = self.attentions[i](x)
            x = self.resnets[i + 1](x)
        return x


class DownEncoderBlock2D(nn.Cell):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int = 1, groups: int = 32,
                 eps: float = 1e-6, act_fn: str = "silu", add_downsample: bool = True, downsample_padding: int = 1):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, eps,
                                                  act_fn) for i in range(num_layers)])
        self.downsamplers = (nn.CellList([Downsample2D(out_channels, out_channels, downsample_padding)])
                             if add_downsample else None)

    def construct(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Cell):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int = 1, groups: int = 32,
                 eps: float = 1e-6, act_fn: str = "silu", add_upsample: bool = True):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, eps,
                                                  act_fn) for i in range(num_layers)])
        self.upsamplers = nn.CellList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def construct(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


def _check_block_types(key: str, types: Sequence[str], supported: str, count: int) -> None:
    unknown = sorted({t for t in types if t != supported})
    if unknown:
        raise ValueError(f"{key} {unknown} are not supported; AutoencoderKL here builds only {supported}")
    if len(types) != count:
        raise ValueError(f"{key} has {len(types)} entries but block_out_channels has {count}")


class Encoder(nn.Cell):
    """(B, in_channels, H, W) image -> (B, 2 * out_channels, H / 2^(n-1), W / 2^(n-1)) moments."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: Sequence[str] = ("DownEncoderBlock2D",), block_out_channels: Sequence[int] = (64,),
                 layers_per_block: int = 2, norm_num_groups: int = 32, act_fn: str = "silu", double_z: bool = True,
                 mid_block_add_attention: bool = True):
        super().__init__()
        _check_block_types("down_block_types", down_block_types, "DownEncoderBlock2D", len(block_out_channels))
        self.conv_in = conv2d(in_channels, block_out_channels[0], 3, padding=1)
        blocks, channels = [], block_out_channels[0]
        for i, out_ch in enumerate(block_out_channels):
            blocks.append(DownEncoderBlock2D(channels, out_ch, layers_per_block, norm_num_groups, 1e-6, act_fn,
                                             add_downsample=i < len(block_out_channels) - 1, downsample_padding=0))
            channels = out_ch
        self.down_blocks = nn.CellList(blocks)
        self.mid_block = UNetMidBlock2D(channels, norm_num_groups, 1e-6, act_fn, mid_block_add_attention, channels)
        self.conv_norm_out = GroupNorm(norm_num_groups, channels, 1e-6)
        self.act = activation(act_fn)
        self.conv_out = conv2d(channels, 2 * out_channels if double_z else out_channels, 3, padding=1)

    def construct(self, x: Tensor) -> Tensor:
        x = self.conv_in(x.astype(self.conv_in.weight.dtype))
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nn.Cell):
    """(B, in_channels, h, w) latents -> (B, out_channels, h * 2^(n-1), w * 2^(n-1)) image."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 up_block_types: Sequence[str] = ("UpDecoderBlock2D",), block_out_channels: Sequence[int] = (64,),
                 layers_per_block: int = 2, norm_num_groups: int = 32, act_fn: str = "silu",
                 mid_block_add_attention: bool = True):
        super().__init__()
        _check_block_types("up_block_types", up_block_types, "UpDecoderBlock2D", len(block_out_channels))
        reversed_channels = list(reversed(block_out_channels))
        channels = reversed_channels[0]
        self.conv_in = conv2d(in_channels, channels, 3, padding=1)
        self.mid_block = UNetMidBlock2D(channels, norm_num_groups, 1e-6, act_fn, mid_block_add_attention, channels)
        blocks = []
        for i, out_ch in enumerate(reversed_channels):
            blocks.append(UpDecoderBlock2D(channels, out_ch, layers_per_block + 1, norm_num_groups, 1e-6, act_fn,
                                           add_upsample=i < len(reversed_channels) - 1))
            channels = out_ch
        self.up_blocks = nn.CellList(blocks)
        self.conv_norm_out = GroupNorm(norm_num_groups, channels, 1e-6)
        self.act = activation(act_fn)
        self.conv_out = conv2d(channels, out_channels, 3, padding=1)

    def construct(self, z: Tensor) -> Tensor:
        x = self.conv_in(z.astype(self.conv_in.weight.dtype))
        x = self.mid_block(x)
        # diffusers runs the up blocks in their own dtype (they may differ from the mid block's)
        x = x.astype(self.up_blocks[0].resnets[0].conv1.weight.dtype)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


__all__ = ["Attention", "Decoder", "DownEncoderBlock2D", "Downsample2D", "Encoder", "ResnetBlock2D",
           "UNetMidBlock2D", "UpDecoderBlock2D", "Upsample2D"]
