"""Image helpers shared by the pipelines and training: load, resize, normalise, binarise masks, pack masks.

Numbers follow diffusers' VaeImageProcessor (FLUX pipelines build it with vae_scale_factor 16):
PIL images are resized with Lanczos, numpy arrays and Tensors with nearest-neighbour; pixels go
to float32 in [0, 1], then to [-1, 1] for the VAE; masks go to greyscale and then to {0, 1}
(>= 0.5 is 1). Everything here runs on the host (numpy), so it can fail early with a clear
message, before any model work.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from mindspore import Tensor

ImageInput = Any  # a path, PIL image, (H, W, C) / (B, H, W, C) numpy array in [0, 1], (B, C, H, W) Tensor, or a list


def load_image(path: str | os.PathLike, name: str | None = "image", *, alpha_over_white: bool = False):
    """A PIL RGB image read from `path`, EXIF orientation applied; ValueError naming `name` and the file.

    16-bit greyscale is scaled to 8 bits by its depth (PIL's own convert clips it to white). Transparency is
    dropped as diffusers' load_image drops it, or with `alpha_over_white` composited over white (training's
    choice: a cut-out subject should not show whatever colour hides under its transparent pixels)."""
    from PIL import Image, UnidentifiedImageError
    from PIL.ImageOps import exif_transpose

    try:
        with Image.open(path) as opened:
            image = exif_transpose(opened)
            if image.mode.startswith("I"):
                image = _high_bit_depth_to_8bit(image)
            if alpha_over_white and image.mode in ("RGBA", "LA", "P", "PA"):
                rgba = image.convert("RGBA")
                image = Image.new("RGB", rgba.size, (255, 255, 255))
                image.paste(rgba, mask=rgba.getchannel("A"))
            else:
                image = image.convert("RGB")
            image.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        prefix = f"`{name}`: " if name else ""
        raise ValueError(f"{prefix}cannot read image file {path}: {err}") from None
    return image


def _high_bit_depth_to_8bit(image):
    """16-bit (or 32-bit integer) greyscale scaled by its bit depth to 8-bit "L"."""
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or values.max(initial=0) <= 65535:
        depth_max = 65535.0  # PNG/TIFF 16-bit greyscale (Pillow may open it as "I")
    else:
        depth_max = float(2**32 - 1)
    return Image.fromarray(np.clip(np.round(values / depth_max * 255.0), 0, 255).astype(np.uint8), mode="L")


def _is_pil(image) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(image, Image.Image)


def as_image_list(image: ImageInput, name: str) -> list:
    """`image` as a list of PIL images or of (B, H, W, C) float arrays in [0, 1]; paths are read here."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError(f"`{name}` is an empty list")
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            out.append(load_image(item, name))
        elif _is_pil(item):
            out.append(item)
        elif isinstance(item, Tensor):  # (B, C, H, W) or (C, H, W) in [0, 1], diffusers' layout for tensors
            array = item.asnumpy().astype(np.float32)
            array = array[None] if array.ndim == 3 else array
            out.append(array.transpose(0, 2, 3, 1))
        elif isinstance(item, np.ndarray):
            array = item.astype(np.float32)
            if array.ndim == 2:
                array = array[None, ..., None]
            elif array.ndim == 3:
                array = array[..., None] if array.shape[-1] not in (1, 3, 4) else array[None]
            if array.ndim != 4:
                raise ValueError(f"`{name}`: a numpy image must be (H, W, C) or (B, H, W, C); got {item.shape}")
            out.append(array)
        else:
            raise ValueError(f"`{name}` must be a file path, PIL image, numpy array or MindSpore Tensor (or a list of "
                             f"them); got {type(item).__name__}")
    if not all(_is_pil(i) for i in out) and any(_is_pil(i) for i in out):
        raise ValueError(f"`{name}`: do not mix PIL images and arrays in one list")
    return out


def image_size(image: ImageInput, name: str = "image") -> tuple[int, int]:
    """(height, width) of the first image of `image` (as given, before any resize)."""
    first = as_image_list(image, name)[0]
    return (first.height, first.width) if _is_pil(first) else tuple(first.shape[1:3])


def check_mask_size(image: ImageInput | None, mask_image: ImageInput) -> None:
    """A ValueError unless `mask_image` has the size of `image` (when there is one), naming both sizes."""
    if image is None:
        return
    image_hw, mask_hw = image_size(image, "image"), image_size(mask_image, "mask_image")
    if image_hw != mask_hw:
        raise ValueError(f"`mask_image` is {mask_hw} (height, width) but `image` is {image_hw}; they must be the "
                         "same size")


def default_height_width(image: ImageInput, height: int | None, width: int | None,
                         multiple: int = 16) -> tuple[int, int]:
    """The image's own size where height / width are not given, rounded down to a multiple of `multiple`."""
    h, w = image_size(image)
    height, width = height or h, width or w
    return height - height % multiple, width - width % multiple


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, C, h, w) -> (B, C, height, width) by nearest neighbour, source index floor(i * h / height) as torch's
    interpolate(mode="nearest")."""
    h, w = array.shape[-2:]
    rows = np.minimum(np.floor(np.arange(height, dtype=np.float32) * np.float32(h / height)).astype(int), h - 1)
    cols = np.minimum(np.floor(np.arange(width, dtype=np.float32) * np.float32(w / width)).astype(int), w - 1)
    return array[..., rows[:, None], cols[None, :]]


def _resize_fill(image, width: int, height: int):
    """Fit the image inside width x height keeping its aspect ratio, centre it, and fill the borders by
    stretching its edge rows / columns (diffusers' resize_mode="fill")."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return out


def _resize_crop(image, width: int, height: int):
    """Cover width x height keeping the aspect ratio, centred, the excess cut (diffusers' resize_mode="crop")."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def resize(image, height: int, width: int, resize_mode: str = "default"):
    """A PIL image resized with Lanczos ("default": to exactly width x height; "fill" / "crop": keeping the
    aspect ratio), or a (B, H, W, C) array by nearest neighbour."""
    if _is_pil(image):
        from PIL import Image

        if resize_mode == "fill":
            return _resize_fill(image, width, height)
        if resize_mode == "crop":
            return _resize_crop(image, width, height)
        return image.resize((width, height), resample=Image.LANCZOS)
    if resize_mode != "default":
        raise ValueError(f"resize_mode {resize_mode!r} needs PIL images")
    return resize_nearest(image.transpose(0, 3, 1, 2), height, width).transpose(0, 2, 3, 1)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] -> [-1, 1], the VAE's input range."""
    return np.float32(2.0) * pixels - np.float32(1.0)


def resize_and_crop(image, height: int, width: int, center_crop: bool, rng: np.random.Generator) -> np.ndarray:
    """Scale (bilinear) so the PIL image covers height x width, then crop to it: (height, width, 3) uint8.

    For a square target this is the diffusers training scripts' Resize(shorter side) + CenterCrop / RandomCrop;
    a random crop's offsets are drawn from `rng`."""
    from PIL import Image

    w, h = image.size
    # the binding side becomes exact, the other is rounded down as torchvision's Resize(int) does
    if height * w >= width * h:
        size = (max(width, int(height * w / h)), height)
    else:
        size = (width, max(height, int(width * h / w)))
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)
    w, h = image.size
    if center_crop:
        top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    else:
        top, left = int(rng.integers(0, h - height + 1)), int(rng.integers(0, w - width + 1))
    return np.asarray(image.crop((left, top, left + width, top + height)), np.uint8)


def to_pixels(image: np.ndarray, flip: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1] (as preprocess does), mirrored left-right if `flip`."""
    if flip:
        image = image[:, ::-1]
    return normalize(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0))


def binarize(mask: np.ndarray) -> np.ndarray:
    """A mask in [0, 1] -> {0, 1}: 1 (repaint) where >= 0.5."""
    return (mask >= 0.5).astype(np.float32)


def preprocess(image: ImageInput, height: int | None = None, width: int | None = None, *, name: str = "image",
               mask: bool = False, resize_mode: str = "default",
               crops_coords: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Images -> (B, 3, H, W) float32 in [-1, 1] for the VAE; with `mask`, (B, 1, H, W) in {0, 1}.

    height / width default to the image's size; both are rounded down to a multiple of 16."""
    items = as_image_list(image, name)
    height, width = default_height_width(items[0], height, width)
    if height < 16 or width < 16:
        raise ValueError(f"`{name}` is smaller than 16 pixels on a side ({height} x {width} after rounding)")
    if _is_pil(items[0]):
        if crops_coords is not None:
            items = [i.crop(crops_coords) for i in items]
        items = [resize(i, height, width, resize_mode) for i in items]
        items = [i.convert("L") if mask else i.convert("RGB") for i in items]
        arrays = [np.asarray(i, np.float32)[None] / np.float32(255.0) for i in items]
        arrays = [a[..., None] if a.ndim == 3 else a for a in arrays]
    else:
        arrays = [resize(a, height, width) for a in items]
        if mask:  # diffusers expects masks as arrays already single-channel; take the first channel of others
            arrays = [a[..., :1] for a in arrays]
    pixels = np.concatenate(arrays).transpose(0, 3, 1, 2).astype(np.float32)
    if mask:
        return binarize(pixels)
    if pixels.shape[1] != 3:
        raise ValueError(f"`{name}` must have 3 colour channels; got {pixels.shape[1]}")
    return normalize(pixels) if pixels.min() >= 0 else pixels  # [-1, 1] input is taken as already normalised


def crop_region(mask, width: int, height: int, pad: int = 0) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the box around the mask's non-zero pixels, `pad` pixels wider, grown to the
    width : height aspect ratio inside the mask image (diffusers' get_crop_region, for padding_mask_crop)."""
    array = np.asarray(mask.convert("L"))
    rows, cols = np.flatnonzero(array.any(axis=1)), np.flatnonzero(array.any(axis=0))
    h, w = array.shape
    if rows.size == 0:  # an empty mask: the whole image
        rows, cols = np.array([0, h - 1]), np.array([0, w - 1])
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, diff: int, size: int) -> tuple[int, int]:
    """Widen [lo, hi) by `diff` around its centre, shifted back inside [0, size)."""
    lo, hi = lo - diff // 2, hi + diff - diff // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def apply_overlay(mask, init_image, image, crop_coords: tuple[int, int, int, int] | None = None):
    """The generated `image` pasted back into the original `init_image`, which shows wherever the mask is 0."""
    from PIL import Image, ImageOps

    width, height = init_image.width, init_image.height
    kept = Image.new("RGBa", (width, height))
    kept.paste(init_image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    kept = kept.convert("RGBA")
    if crop_coords is not None:
        x, y, x2, y2 = crop_coords
        base = Image.new("RGBA", (width, height))
        base.paste(_resize_crop(image, x2 - x, y2 - y), (x, y))
        image = base.convert("RGB")
    image = image.convert("RGBA")
    image.alpha_composite(kept)
    return image.convert("RGB")


def pack_mask(mask: np.ndarray, vae_scale_factor: int = 8) -> np.ndarray:
    """A pixel mask (B, 1, H, W) -> (B, N, 4 * f^2) tokens, f = vae_scale_factor: each f x f pixel block becomes f^2
    channels of its latent pixel, then 2x2 latent pixels one token (FLUX.1-Fill's mask channels)."""
    b, _, height, width = mask.shape
    f = vae_scale_factor
    h, w = height // f, width // f
    blocks = mask[:, 0, :h * f, :w * f].reshape(b, h, f, w, f).transpose(0, 2, 4, 1, 3).reshape(b, f * f, h, w)
    return pack_array(blocks)


def pack_array(latents: np.ndarray) -> np.ndarray:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C) on the host, the same layout as mindflux.latents.pack_latents."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(x.reshape(b, (h // 2) * (w // 2), c * 4))


def tile_batch(array, batch: int, name: str):
    """Rows repeated as a whole ([a, b] -> [a, b, a, b]) up to `batch`, as diffusers repeats images and masks."""
    rows = array.shape[0]
    if rows == batch:
        return array
    if batch % rows:
        raise ValueError(f"cannot repeat {rows} `{name}` images to a batch of {batch} (not a divisor)")
    reps = batch // rows
    if isinstance(array, np.ndarray):
        return np.concatenate([array] * reps)
    from mindspore import ops

    return ops.concat([array] * reps, 0)


__all__ = ["apply_overlay", "as_image_list", "binarize", "check_mask_size", "crop_region", "default_height_width",
           "image_size", "load_image", "normalize", "pack_array", "pack_mask", "preprocess", "resize",
           "resize_and_crop", "resize_nearest", "tile_batch", "to_pixels"]
