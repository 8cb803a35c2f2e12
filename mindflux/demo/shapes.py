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
# Never in the pretraining data: the concept the DreamBooth demo teaches (mindflux/demo/ring).
NOVEL_SHAPE = "ring"
RING_INNER = 0.5  # inner / outer diameter
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
    elif spec.shape == NOVEL_SHAPE:
        draw.ellipse(box, fill=colour)
        inner = half * RING_INNER
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=_rgb(spec.background))
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; known: {', '.join(SHAPES)}")
    return image.resize((image_size, image_size), Image.LANCZOS)


def _rgb(name: str) -> tuple[int, int, int]:
    return BACKGROUND_RGB.get(name) or COLOURS[name]


def random_placement(rng: np.random.Generator) -> tuple[float, float, float]:
    """(size, cx, cy): 45-65% of the side, centred within +-12% of the middle (always fully inside)."""
    size = float(rng.uniform(0.45, 0.65))
    cx, cy = (float(0.5 + rng.uniform(-0.12, 0.12)) for _ in range(2))
    return size, cx, cy


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
        size, cx, cy = random_placement(rng)
        specs.append(ShapeSpec(shapes[rng.integers(len(shapes))], colour, background, cx, cy, size))
    return specs


@dataclass(frozen=True)
class Reading:
    shape: str
    colour: str
    background: str
    fill_ratio: float
    area: float  # shape pixels / all pixels


def _shape_mask(image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixels, background RGB, shape mask): the background is the median border colour, the shape
    every pixel that differs from it by more than 60 in some channel."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    return pixels, background_rgb, np.abs(pixels - background_rgb).max(-1) > 60


def classify(image: Image.Image | np.ndarray) -> Reading:
    """Read shape, colour and background back from an image (see the module docstring)."""
    pixels, background_rgb, mask = _shape_mask(image)
    background = _nearest(background_rgb, {**BACKGROUND_RGB, **COLOURS})
    area = float(mask.mean())
    if area < 0.01:
        return Reading("none", "none", background, 0.0, area)
    colour = _nearest(np.median(pixels[mask], axis=0), COLOURS)
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = float(mask.sum() / box)
    shape = min(_FILL, key=lambda s: abs(_FILL[s] - fill))
    return Reading(shape, colour, background, fill, area)


def hole_ratio(image: Image.Image | np.ndarray) -> float:
    """How much of the middle of the drawn shape is background: ~1 for a ring, ~0 for a filled circle,
    square or triangle. Measured in a disc of 0.2x the shape's bounding box around the box centre, so
    it does not depend on where the shape is or how big it is."""
    _, _, mask = _shape_mask(image)
    if mask.mean() < 0.01:
        return 0.0
    rows, cols = np.nonzero(mask)
    cy, cx = (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2
    radius = 0.2 * max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    y, x = np.mgrid[:mask.shape[0], :mask.shape[1]]
    middle = (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    return float(1.0 - mask[middle].mean())


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((np.asarray(palette[name], np.float32) - rgb) ** 2)))
