"""A procedural dataset of flat shapes, and a classifier that reads shape and colour back.

Every image is one filled shape in a named colour on a plain background, e.g. "a red circle on a
white background". The same seed always gives the same images. The classifier inverts the
rendering without learning: the background is the colour of the border pixels, the shape is
every pixel that differs from it, its colour is the nearest named colour to their median, and
the shape is told apart by how much of its bounding box it fills (square ~1, circle ~pi/4,
triangle ~1/2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUNDS = ("white", "black", "gray")
BACKGROUND_RGB = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
# fill ratio of the bounding box, used to tell shapes apart
_FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    background: str
    cx: float  # centre, as a fraction of the image size
    cy: float
    size: float  # side / diameter, as a fraction of the image size

    @property
    def caption(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} on a {self.background} background"


def render(spec: ShapeSpec, image_size: int = 64) -> Image.Image:
    """Draw one shape, anti-aliased by drawing at 4x and downsampling."""
    scale = 4
    n = image_size * scale
    image = Image.new("RGB", (n, n), _rgb(spec.background))
    draw = ImageDraw.Draw(image)
    half = spec.size * n / 2
    cx, cy = spec.cx * n, spec.cy * n
    box = (cx - half, cy - half, cx + half, cy + half)
    colour = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif spec.shape == "square":
        draw.rectangle(box, fill=colour)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; known: {', '.join(SHAPES)}")
    return image.resize((image_size, image_size), Image.LANCZOS)


def _rgb(name: str) -> tuple[int, int, int]:
    return BACKGROUND_RGB.get(name) or COLOURS[name]


def sample_specs(count: int, seed: int, shapes=SHAPES, colours=None) -> list[ShapeSpec]:
    """`count` random specs; the shape colour always differs from the background."""
    rng = np.random.default_rng(seed)
    colours = list(colours or COLOURS)
    specs = []
    while len(specs) < count:
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        colour = colours[rng.integers(len(colours))]
        if colour == background:
            continue
        size = float(rng.uniform(0.35, 0.65))
        cx, cy = (float(rng.uniform(size / 2 + 0.05, 1 - size / 2 - 0.05)) for _ in range(2))
        specs.append(ShapeSpec(shapes[rng.integers(len(shapes))], colour, background, cx, cy, size))
    return specs


@dataclass(frozen=True)
class Reading:
    shape: str
    colour: str
    background: str
    fill_ratio: float
    area: float  # shape pixels / all pixels


def classify(image: Image.Image | np.ndarray) -> Reading:
    """Read shape, colour and background back from an image (see the module docstring)."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    background = _nearest(background_rgb, {**BACKGROUND_RGB, **COLOURS})
    mask = np.abs(pixels - background_rgb).max(-1) > 60
    area = float(mask.mean())
    if area < 0.01:
        return Reading("none", "none", background, 0.0, area)
    colour = _nearest(np.median(pixels[mask], axis=0), COLOURS)
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = float(mask.sum() / box)
    shape = min(_FILL, key=lambda s: abs(_FILL[s] - fill))
    return Reading(shape, colour, background, fill, area)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((np.asarray(palette[name], np.float32) - rgb) ** 2)))
