"""A built-in, deterministic COCO-format detection dataset: textured shapes on clutter.

It lets a small IoU-aware RetinaNet train and evaluate on a CPU in minutes,
with nothing to download, while keeping *accurate box placement* non-trivial:

* classes ``rectangle`` (may be slightly rotated, so "rectangle-like"),
  ``ellipse``, ``triangle`` and ``cross``, each with a random colour and a
  textured fill (noise, gradients, stripes or speckle);
* box sizes (sqrt of the box area) log-uniform from ``min_object_size`` (8 px)
  to ``max_object_fraction`` (80 %) of the shorter image side, aspect ratios
  log-uniform in [1/3, 3];
* soft edges: each pixel of an object is blended in proportion to the
  fraction of it the shape covers (exact anti-aliasing, vertices on a
  1/16 px grid), and the alpha mask is often blurred a little;
* cluttered backgrounds: colour gradients, low-frequency colour noise,
  per-pixel noise and distractors that belong to no class (lines, curves,
  jagged blobs, shape outlines), drawn with the same colour distribution as
  the objects;
* partial occlusion: objects are drawn in order and a later object may hide
  part of an earlier one. A placement is rejected when it would leave any
  object with less than ``min_visible_fraction`` (50 %) of its pixels
  visible, so every annotated object is recognizable. The box annotates the
  *full* object extent (the amodal box, as COCO annotates people behind a
  table), so the detector has to infer hidden edges from the visible shape.
  Each annotation also carries its ``visible_fraction`` (ignored by COCO
  tools).
* a few percent of the images (``empty_fraction``) hold no object at all.

Objects lie entirely inside the image, so boxes never need clipping (they are
still clipped, as a guard). Box coordinates follow COCO / Detectron2: pixel
``i`` covers [i, i + 1), and the box is the exact extent of the drawn polygon
(objects are not drawn with OpenCV's anti-aliased fill, which grows shapes by
about 0.7 px per side).
The ``area`` of an annotation is the area of the full object's polygon (COCO
semantics: the object's area, not the box's); COCOeval uses it for the
small / medium / large split.

Determinism: image ``i`` of a split is drawn from its own
``numpy.random.Generator`` seeded from (dataset seed, split name, i), so the
images can be generated in parallel, in any order, and are byte-identical
across runs and machines with the same numpy / OpenCV / libpng versions.
What could depend on the CPU is kept out: the geometry is quantized to
1/16 px and uses Python's ``math`` for trigonometry (not numpy's SIMD
kernels), OpenCV only draws, blurs and resizes 8-bit images (integer /
bit-exact code), and the float arithmetic left is element-wise.

Layout written by :func:`generate_shapes_dataset`::

    <root>/<name>/<split>/000000.png ...
    <root>/<name>/annotations/instances_<split>.json

The json is written last, atomically, and records the generator version and
every parameter in its ``info`` block: a killed generation leaves no json and
is redone; a complete copy with the same parameters is reused.

    python -m iou_aware_retinanet.data.synthetic --out /tmp/shapes --num-images 1000
"""
import argparse
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..atomic import atomic_write

logger = logging.getLogger("iou_aware_retinanet.data")

# Bump whenever a change alters the generated images or annotations: the
# version is part of the parameters compared before reusing a copy on disk.
GENERATOR_VERSION = "1.0"

SHAPE_CLASSES = ("rectangle", "ellipse", "triangle", "cross")

# Geometry is quantized to 1/2**SHIFT px (also OpenCV's fixed-point drawing unit).
_SHIFT = 4
_SCALE = 1 << _SHIFT
# Scanlines per pixel row when rasterizing objects.
_SUBROWS = 8
# Pixels of the rasterized mask that count as "object" for visibility.
_MASK_ON = 128
_PLACEMENT_ATTEMPTS = 10
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]  # noise barely compresses: favour speed


@dataclass(frozen=True)
class ShapesSpec:
    """How the images of a shapes dataset look. Every field is recorded in the json."""

    image_size: Tuple[int, int] = (256, 256)  # (height, width); an int means square
    classes: Tuple[str, ...] = SHAPE_CLASSES
    min_objects: int = 1
    max_objects: int = 8
    empty_fraction: float = 0.03  # share of images with no object
    min_object_size: float = 8.0  # sqrt(box area), pixels
    max_object_fraction: float = 0.8  # sqrt(box area) / shorter image side
    max_aspect_ratio: float = 3.0  # box width / height within [1/r, r]
    min_visible_fraction: float = 0.5
    min_clutter: int = 4
    max_clutter: int = 14
    min_contrast: float = 40.0  # min RGB distance between an object's mean colour and what it covers

    def __post_init__(self):
        # Tuples, so that equal specs compare and hash equal whatever was passed.
        size = self.image_size
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "classes", tuple(self.classes))
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise ValueError(f"image_size must be (height, width), each >= 32, got {self.image_size}")
        unknown = [c for c in self.classes if c not in SHAPE_CLASSES]
        if unknown or not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(
                f"classes must be distinct names among {SHAPE_CLASSES}, got {self.classes}"
            )
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0.0 <= self.empty_fraction <= 1.0:
            raise ValueError(f"empty_fraction must lie in [0, 1], got {self.empty_fraction}")
        if not 0.0 < self.max_object_fraction <= 1.0:
            raise ValueError(f"max_object_fraction must lie in (0, 1], got {self.max_object_fraction}")
        if not 2.0 <= self.min_object_size <= self.max_object_fraction * min(self.image_size):
            raise ValueError(
                f"need 2 <= min_object_size <= max_object_fraction * shorter side, got "
                f"{self.min_object_size} and {self.max_object_fraction} * {min(self.image_size)}"
            )
        if self.max_aspect_ratio < 1.0:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if not 0.0 <= self.min_visible_fraction <= 1.0:
            raise ValueError(f"min_visible_fraction must lie in [0, 1], got {self.min_visible_fraction}")
        if not 0 <= self.min_clutter <= self.max_clutter:
            raise ValueError(f"need 0 <= min_clutter <= max_clutter, got {self.min_clutter}, {self.max_clutter}")

    @property
    def height(self) -> int:
        return self.image_size[0]

    @property
    def width(self) -> int:
        return self.image_size[1]


# Named difficulties (see the module docstring). The field defaults of
# ShapesSpec are the "hard" variant.
SHAPES_PRESETS: Dict[str, ShapesSpec] = {
    # Learnable by a small model from scratch in minutes, yet boxes are not
    # trivially placed: soft and blurred edges, tilted rectangles, amodal boxes
    # of partly hidden objects, textures; no distractors.
    "standard": ShapesSpec(
        image_size=(128, 128),
        max_objects=6,
        min_object_size=16.0,
        min_clutter=0,
        max_clutter=0,
        min_visible_fraction=0.75,
        min_contrast=60.0,
    ),
    # 256 px, 8 px objects, heavy clutter, 50 % occlusion.
    "hard": ShapesSpec(),
}


def shapes_preset(name: str) -> ShapesSpec:
    """The :class:`ShapesSpec` of a named difficulty (``SHAPES_PRESETS``)."""
    if name not in SHAPES_PRESETS:
        raise ValueError(f"unknown shapes difficulty {name!r}; known: {', '.join(SHAPES_PRESETS)}")
    return SHAPES_PRESETS[name]


@dataclass(frozen=True)
class ShapeObject:
    """One annotated object of a generated image."""

    class_index: int  # into ShapesSpec.classes
    bbox: Tuple[float, float, float, float]  # COCO (x, y, w, h) of the full object
    area: float  # polygon area of the full object
    visible_fraction: float


# --------------------------------------------------------------------------- seeding


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of every other image.

    The split name enters through CRC32 because Python's ``hash`` of a str
    changes from one interpreter run to the next.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    split_key = zlib.crc32(split.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([int(seed), split_key, int(index)]))


# --------------------------------------------------------------------------- geometry


def _unit_polygon(kind: str, rng: np.random.Generator) -> np.ndarray:
    """(P, 2) float64 vertices of a shape, scaled so its bounding box is [0, 1]^2."""
    if kind == "rectangle":
        # Half the rectangles are tilted by up to 15 degrees: the box must
        # then enclose corners, not follow edges.
        angle = rng.uniform(-15.0, 15.0) if rng.random() < 0.5 else 0.0
        points = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]
    elif kind == "ellipse":
        minor = rng.uniform(0.4, 1.0)
        angle = rng.uniform(0.0, 180.0)
        points = [(math.cos(t), minor * math.sin(t)) for t in _ELLIPSE_ANGLES]
    elif kind == "triangle":
        angle = 0.0
        points = _random_triangle(rng)
    elif kind == "cross":
        angle = rng.uniform(-10.0, 10.0) if rng.random() < 0.5 else 0.0
        points = _cross_outline(rng)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return _normalize_to_unit_box(_rotate(points, angle))


_ELLIPSE_ANGLES = tuple(2.0 * math.pi * k / 64 for k in range(64))


def _rotate(points: Sequence[Tuple[float, float]], degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([(c * x - s * y, s * x + c * y) for x, y in points], dtype=np.float64)


def _normalize_to_unit_box(points: np.ndarray) -> np.ndarray:
    low = points.min(axis=0)
    return (points - low) / (points.max(axis=0) - low)


def _random_triangle(rng: np.random.Generator) -> List[Tuple[float, float]]:
    """Three vertices whose smallest angle is at least 20 degrees (no slivers)."""
    while True:
        pts = rng.uniform(0.0, 1.0, size=(3, 2))
        if _min_angle_degrees(pts) >= 20.0:
            return [tuple(p) for p in pts]


def _min_angle_degrees(pts: np.ndarray) -> float:
    angles = []
    for i in range(3):
        a, b, c = pts[i], pts[(i + 1) % 3], pts[(i + 2) % 3]
        u, v = b - a, c - a
        norm = math.hypot(*u) * math.hypot(*v)
        if norm == 0.0:
            return 0.0
        cosine = max(-1.0, min(1.0, float(u @ v) / norm))
        angles.append(math.degrees(math.acos(cosine)))
    return min(angles)


def _cross_outline(rng: np.random.Generator) -> List[Tuple[float, float]]:
    """A plus sign with arms of random thickness, its centre off-centre by up to 15 %."""
    tx, ty = rng.uniform(0.22, 0.45, size=2)  # thickness of the vertical / horizontal bar
    cx, cy = rng.uniform(0.35, 0.65, size=2)
    x0, x1 = cx - tx / 2, cx + tx / 2
    y0, y1 = cy - ty / 2, cy + ty / 2
    return [
        (x0, 0.0), (x1, 0.0), (x1, y0), (1.0, y0), (1.0, y1), (x1, y1),
        (x1, 1.0), (x0, 1.0), (x0, y1), (0.0, y1), (0.0, y0), (x0, y0),
    ]  # fmt: skip


def _sample_box_size(spec: ShapesSpec, rng: np.random.Generator) -> Tuple[float, float]:
    """Box (width, height): log-uniform size and aspect ratio, fitted inside the image."""
    max_size = spec.max_object_fraction * min(spec.image_size)
    size = math.exp(rng.uniform(math.log(spec.min_object_size), math.log(max_size)))
    log_r = math.log(spec.max_aspect_ratio)
    ratio = math.exp(rng.uniform(-log_r, log_r))
    w, h = size * math.sqrt(ratio), size / math.sqrt(ratio)
    shrink = min(1.0, 0.95 * spec.width / w, 0.95 * spec.height / h)
    return w * shrink, h * shrink


def _place_polygon(unit_polygon: np.ndarray, x: float, y: float, w: float, h: float) -> np.ndarray:
    """The unit polygon stretched onto the box (x, y, w, h), in pixels.

    Vertices are rounded to 1/16 px: the box and area computed from them are
    then exact binary fractions, identical on every machine.
    """
    points = np.stack([x + unit_polygon[:, 0] * w, y + unit_polygon[:, 1] * h], axis=1)
    return _quantize(points)


def _quantize(points: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(points, dtype=np.float64) * _SCALE) / _SCALE


def _coco_bbox(points: np.ndarray, width: int, height: int) -> Tuple[float, float, float, float]:
    """COCO (x, y, w, h) of a polygon, clipped to the image."""
    x0 = max(0.0, float(points[:, 0].min()))
    y0 = max(0.0, float(points[:, 1].min()))
    x1 = min(float(width), float(points[:, 0].max()))
    y1 = min(float(height), float(points[:, 1].max()))
    return (x0, y0, x1 - x0, y1 - y0)


def _polygon_area(points: np.ndarray) -> float:
    """Shoelace area in pixels (exact: the coordinates are multiples of 1/16)."""
    x = np.rint(points[:, 0] * _SCALE).astype(np.int64)
    y = np.rint(points[:, 1] * _SCALE).astype(np.int64)
    twice = abs(int((x * np.roll(y, -1) - np.roll(x, -1) * y).sum()))
    return twice / (2.0 * _SCALE * _SCALE)


def _fixed(points: np.ndarray) -> np.ndarray:
    """Pixel coordinates (COCO: pixel i spans [i, i + 1)) to OpenCV's fixed point
    (pixel centres on integers, 1/16 px units), for drawing distractors."""
    return np.rint((np.asarray(points, dtype=np.float64) - 0.5) * _SCALE).astype(np.int32)


# --------------------------------------------------------------------------- rasterizing and painting


@dataclass
class _Region:
    """A rectangle of the image and the soft mask of a shape inside it."""

    x0: int
    y0: int
    mask: np.ndarray  # uint8 (h, w)

    @property
    def slices(self) -> Tuple[slice, slice]:
        h, w = self.mask.shape
        return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)


def _region_around(points: np.ndarray, pad: int, width: int, height: int) -> Tuple[int, int, int, int]:
    """Integer pixel rectangle (x0, y0, x1, y1) holding ``points`` plus ``pad``, inside the image."""
    x0 = min(max(0, math.floor(points[:, 0].min()) - pad), width - 1)
    y0 = min(max(0, math.floor(points[:, 1].min()) - pad), height - 1)
    x1 = min(width, math.ceil(points[:, 0].max()) + pad)
    y1 = min(height, math.ceil(points[:, 1].max()) + pad)
    # A shape entirely off the image still gets a (blank) 1-pixel region.
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def _coverage(points: np.ndarray, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """Fraction of each pixel of a region that a polygon covers: float64 (height, width).

    OpenCV's anti-aliased fill grows shapes by about 0.7 px on every side,
    which would make every box too small; this rasterizer has no such bias.
    Each pixel row is cut into _SUBROWS scanlines; on a scanline the polygon
    is a set of spans (even-odd rule) and a pixel gets the exact length of
    span inside it. Only element-wise arithmetic and sorting: deterministic.
    """
    ys = y0 + (np.arange(height * _SUBROWS, dtype=np.float64) + 0.5) / _SUBROWS
    xa, ya = points[:, 0], points[:, 1]
    xb, yb = np.roll(xa, -1), np.roll(ya, -1)
    scan = ys[:, None]
    # Half-open rule: an edge crosses a scanline when exactly one end lies at or above it.
    crosses = (ya <= scan) != (yb <= scan)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = np.where(crosses, xa + (scan - ya) / (yb - ya) * (xb - xa), np.inf)
    xs.sort(axis=1)
    num_crossings = int(crosses.sum(axis=1).max())  # even: every span has two ends
    spans = xs[:, :num_crossings].reshape(len(ys), -1, 2)  # (scanlines, spans, start/end); inf pads
    left_edges = x0 + np.arange(width, dtype=np.float64)
    start = np.clip(spans[..., 0, None] - left_edges, 0.0, 1.0)
    end = np.clip(spans[..., 1, None] - left_edges, 0.0, 1.0)
    per_scanline = (end - start).sum(axis=1)  # (scanlines, width)
    return per_scanline.reshape(height, _SUBROWS, width).mean(axis=1)


def _fill_region(points: np.ndarray, width: int, height: int, blur_sigma: float) -> _Region:
    """Anti-aliased filled polygon, optionally softened (8-bit blur: bit-exact in OpenCV)."""
    x0, y0, x1, y1 = _region_around(points, 3, width, height)
    coverage = _coverage(points, x0, y0, x1 - x0, y1 - y0)
    mask = np.rint(coverage * 255.0).astype(np.uint8)
    if blur_sigma > 0:
        mask = cv2.GaussianBlur(mask, (0, 0), blur_sigma)
    return _Region(x0, y0, mask)


def _stroke_region(points: np.ndarray, closed: bool, thickness: int, width: int, height: int) -> _Region:
    """Anti-aliased polyline of the given thickness (distractors only: OpenCV's drawing suffices)."""
    x0, y0, x1, y1 = _region_around(points, thickness + 2, width, height)
    mask = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    offset = np.array([x0 * _SCALE, y0 * _SCALE], dtype=np.int32)
    cv2.polylines(mask, [_fixed(points) - offset], closed, 255, thickness, cv2.LINE_AA, _SHIFT)
    return _Region(x0, y0, mask)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, size=3).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency colour noise in [0, 255]: a coarse random grid, bilinearly upsampled."""
    coarse = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)


def _ramp(height: int, width: int, degrees: float) -> np.ndarray:
    """(h, w) float32 in [0, 1] that grows along a direction."""
    c = np.float32(math.cos(math.radians(degrees)))
    s = np.float32(math.sin(math.radians(degrees)))
    proj = np.arange(width, dtype=np.float32)[None, :] * c + np.arange(height, dtype=np.float32)[:, None] * s
    low, high = proj.min(), proj.max()
    return (proj - low) / max(high - low, np.float32(1.0))


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(h, w, 3) float32 fill: random colour plus one of several textures, plus pixel noise."""
    base = _random_colour(rng)
    kind = rng.integers(0, 4)
    if kind == 0:  # plain
        fill = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    elif kind == 1:  # gradient towards a second colour
        t = _ramp(height, width, rng.uniform(0.0, 360.0))
        fill = base + (_random_colour(rng) - base) * (rng.uniform(0.3, 1.0) * t)[..., None]
    elif kind == 2:  # stripes in a nearby colour
        period = rng.uniform(3.0, 12.0)
        t = _ramp(height, width, rng.uniform(0.0, 180.0)) * np.float32(max(height, width) * 1.5 / period)
        other = np.clip(base + rng.uniform(-70.0, 70.0, size=3), 0, 255).astype(np.float32)
        fill = np.where((np.floor(t).astype(np.int64) % 2 == 0)[..., None], base, other)
    else:  # speckle: smooth blotches around the colour
        amount = np.float32(rng.uniform(0.15, 0.45))
        fill = base * (1 - amount) + _smooth_noise(rng, height, width, int(rng.integers(3, 9))) * amount
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * np.float32(rng.uniform(2.0, 18.0))
    return fill.astype(np.float32) + noise


def _paint(canvas: np.ndarray, region: _Region, fill: np.ndarray) -> None:
    """Alpha-blend ``fill`` into ``canvas`` through the region's mask, in place."""
    alpha = region.mask.astype(np.float32)[..., None] * np.float32(1.0 / 255.0)
    rows, cols = region.slices
    canvas[rows, cols] = canvas[rows, cols] * (1.0 - alpha) + fill * alpha


# --------------------------------------------------------------------------- background and clutter


def _background(spec: ShapesSpec, rng: np.random.Generator) -> np.ndarray:
    """Colour gradient mixed with low-frequency colour noise: float32 (H, W, 3)."""
    h, w = spec.image_size
    c1, c2 = _random_colour(rng), _random_colour(rng)
    t = _ramp(h, w, rng.uniform(0.0, 360.0))[..., None]
    canvas = c1 + (c2 - c1) * t
    mix = np.float32(rng.uniform(0.1, 0.5))
    blotches = _smooth_noise(rng, h, w, int(rng.integers(3, 13)))
    return (canvas * (1 - mix) + blotches * mix).astype(np.float32)


def _draw_clutter(canvas: np.ndarray, spec: ShapesSpec, rng: np.random.Generator) -> None:
    """Distractors of no class: lines, curves, jagged blobs and shape outlines."""
    h, w = spec.image_size
    for _ in range(int(rng.integers(spec.min_clutter, spec.max_clutter + 1))):
        kind = rng.integers(0, 4)
        if kind == 0:  # straight line, often across the image
            pts = rng.uniform((-0.1 * w, -0.1 * h), (1.1 * w, 1.1 * h), size=(2, 2))
            region = _stroke_region(pts, False, int(rng.integers(1, 4)), w, h)
        elif kind == 1:  # wandering curve
            start = rng.uniform((0, 0), (w, h))
            steps = rng.normal(0.0, 0.08 * min(h, w), size=(int(rng.integers(4, 9)), 2))
            region = _stroke_region(start + np.cumsum(steps, axis=0), False, int(rng.integers(1, 3)), w, h)
        elif kind == 2:  # star-shaped blob
            region = _fill_region(_quantize(_blob(spec, rng)), w, h, blur_sigma=0.0)
        else:  # outline of a shape: close to the classes, yet no object
            shape = SHAPE_CLASSES[int(rng.integers(0, len(SHAPE_CLASSES)))]
            bw, bh = _sample_box_size(spec, rng)
            x, y = rng.uniform(0.0, w - bw), rng.uniform(0.0, h - bh)
            outline = _place_polygon(_unit_polygon(shape, rng), x, y, bw, bh)
            region = _stroke_region(outline, True, int(rng.integers(1, 3)), w, h)
        rows, cols = region.slices
        _paint(canvas, region, _texture(rng, rows.stop - rows.start, cols.stop - cols.start))


def _blob(spec: ShapesSpec, rng: np.random.Generator) -> np.ndarray:
    """A star / gear outline that no class resembles: alternating long and short spokes."""
    h, w = spec.image_size
    n = 2 * int(rng.integers(5, 9))
    radius = rng.uniform(4.0, 0.2 * min(h, w))
    centre = rng.uniform((0, 0), (w, h))
    long_spokes = rng.uniform(0.75, 1.0, size=n)
    short_spokes = rng.uniform(0.3, 0.6, size=n)
    radii = radius * np.where(np.arange(n) % 2 == 0, long_spokes, short_spokes)
    points = [
        (centre[0] + r * math.cos(2 * math.pi * k / n), centre[1] + r * math.sin(2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]
    return np.array(points, dtype=np.float64)


# --------------------------------------------------------------------------- objects


@dataclass
class _Placed:
    class_index: int
    polygon: np.ndarray  # (P, 2) pixel coordinates
    region: _Region
    solid: np.ndarray  # bool mask of the region: the pixels the object owns when drawn
    full_pixels: int


def _sample_object(spec: ShapesSpec, rng: np.random.Generator) -> Optional[_Placed]:
    """A random object of a random class, rasterized; None if it covers no pixel."""
    h, w = spec.image_size
    class_index = int(rng.integers(0, len(spec.classes)))
    bw, bh = _sample_box_size(spec, rng)
    x, y = rng.uniform(0.0, w - bw), rng.uniform(0.0, h - bh)
    polygon = _place_polygon(_unit_polygon(spec.classes[class_index], rng), x, y, bw, bh)
    blur = rng.uniform(0.4, 1.0) if rng.random() < 0.6 else 0.0
    region = _fill_region(polygon, w, h, blur)
    solid = region.mask >= _MASK_ON
    full_pixels = int(solid.sum())
    return _Placed(class_index, polygon, region, solid, full_pixels) if full_pixels > 0 else None


class _Occlusion:
    """Which object is on top at each pixel, to keep every object visible enough."""

    def __init__(self, image_size: Tuple[int, int], min_visible_fraction: float):
        self.owner = np.full(image_size, -1, dtype=np.int64)  # -1: no object
        self.min_visible_fraction = min_visible_fraction
        self.full_pixels: List[int] = []
        self.visible_pixels: List[int] = []

    def _hidden_by(self, candidate: _Placed) -> np.ndarray:
        """Visible pixels of each placed object that the candidate would cover."""
        covered = self.owner[candidate.region.slices][candidate.solid]
        return np.bincount(covered[covered >= 0], minlength=len(self.full_pixels))

    def accepts(self, candidate: _Placed) -> bool:
        hidden = self._hidden_by(candidate)
        return all(
            visible - hidden[i] >= self.min_visible_fraction * full
            for i, (visible, full) in enumerate(zip(self.visible_pixels, self.full_pixels))
        )

    def add(self, candidate: _Placed) -> None:
        hidden = self._hidden_by(candidate)
        for i in range(len(self.visible_pixels)):
            self.visible_pixels[i] -= int(hidden[i])
        self.owner[candidate.region.slices][candidate.solid] = len(self.full_pixels)
        self.full_pixels.append(candidate.full_pixels)
        self.visible_pixels.append(candidate.full_pixels)

    def visible_fraction(self, index: int) -> float:
        return self.visible_pixels[index] / self.full_pixels[index]


def _object_fill(canvas: np.ndarray, region: _Region, spec: ShapesSpec, rng: np.random.Generator) -> np.ndarray:
    """A texture whose mean colour differs from what the object covers.

    Without this, some objects would be invisible (same colour as the
    background), which teaches nothing; the threshold is low, so
    low-contrast objects remain.
    """
    rows, cols = region.slices
    solid = region.mask >= _MASK_ON
    under = canvas[rows, cols][solid].mean(axis=0, dtype=np.float64)
    for _ in range(5):
        fill = _texture(rng, rows.stop - rows.start, cols.stop - cols.start)
        difference = fill[solid].mean(axis=0, dtype=np.float64) - under
        # Plain arithmetic, not np.linalg.norm (BLAS): the same decision on every machine.
        if math.sqrt(float((difference * difference).sum())) >= spec.min_contrast:
            break
    return fill


def render_image(spec: ShapesSpec, rng: np.random.Generator) -> Tuple[np.ndarray, List[ShapeObject]]:
    """One image (uint8 (H, W, 3), BGR for OpenCV; colours are random anyway) and its objects."""
    h, w = spec.image_size
    canvas = _background(spec, rng)
    _draw_clutter(canvas, spec, rng)

    if rng.random() < spec.empty_fraction:
        num_objects = 0
    else:
        num_objects = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    occlusion = _Occlusion(spec.image_size, spec.min_visible_fraction)
    placed: List[_Placed] = []
    for _ in range(num_objects):
        # A placement that hides too much of an earlier object is retried a
        # few times, then the object is dropped.
        for _attempt in range(_PLACEMENT_ATTEMPTS):
            candidate = _sample_object(spec, rng)
            if candidate is not None and occlusion.accepts(candidate):
                occlusion.add(candidate)
                _paint(canvas, candidate.region, _object_fill(canvas, candidate.region, spec, rng))
                placed.append(candidate)
                break

    noise = rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(rng.uniform(1.0, 5.0))
    image = np.rint(np.clip(canvas + noise, 0.0, 255.0)).astype(np.uint8)
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 0.9))

    objects = [
        ShapeObject(
            class_index=obj.class_index,
            bbox=_coco_bbox(obj.polygon, w, h),
            area=_polygon_area(obj.polygon),
            visible_fraction=round(occlusion.visible_fraction(i), 4),
        )
        for i, obj in enumerate(placed)
    ]
    return image, objects


def generate_image(
    spec: ShapesSpec, seed: int, split: str, index: int
) -> Tuple[np.ndarray, List[ShapeObject]]:
    """Image ``index`` of ``split``: the same pixels and objects on every call."""
    return render_image(spec, image_rng(seed, split, index))


# --------------------------------------------------------------------------- writing a dataset


def image_file_name(index: int) -> str:
    return f"{index:06d}.png"


def _atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a private temporary file, then rename: readers (and other ranks
    generating the same file) never see a partial file."""
    with atomic_write(path, "wb", fsync=False) as f:
        f.write(data)


def _write_one(task: Tuple[ShapesSpec, int, str, int, str]) -> List[ShapeObject]:
    """Generate and save one image (a Pool worker: module-level, picklable)."""
    spec, seed, split, index, image_dir = task
    image, objects = generate_image(spec, seed, split, index)
    ok, png = cv2.imencode(".png", image, _PNG_PARAMS)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode image {index} of split {split!r} as PNG")
    _atomic_write_bytes(os.path.join(image_dir, image_file_name(index)), png.tobytes())
    return objects


def dataset_params(name: str, split: str, num_images: int, seed: int, spec: ShapesSpec) -> Dict:
    """Everything that determines the files, as stored in the json's ``info.params``.

    Round-tripped through json so that it compares equal to what is read back.
    """
    params = {
        "name": name,
        "split": split,
        "num_images": int(num_images),
        "seed": int(seed),
        "spec": dataclasses.asdict(spec),
    }
    return json.loads(json.dumps(params))


def dataset_paths(root: str, split: str, name: str = "shapes") -> Tuple[str, str]:
    """(json file, image folder) of a split, whether or not it exists yet."""
    base = os.path.join(os.path.expanduser(root), name)
    return os.path.join(base, "annotations", f"instances_{split}.json"), os.path.join(base, split)


def is_complete(json_path: str, image_dir: str, params: Dict) -> bool:
    """True when the json exists, was written by this generator version with
    ``params``, and all its images are on disk."""
    try:
        with open(json_path, "r", encoding="utf-8") as f:
            dataset = json.load(f)
    except (OSError, ValueError):
        return False
    info = dataset.get("info", {}) if isinstance(dataset, dict) else {}
    if info.get("version") != GENERATOR_VERSION or info.get("params") != params:
        return False
    return all(os.path.isfile(os.path.join(image_dir, img["file_name"])) for img in dataset.get("images", []))


def _coco_json(params: Dict, spec: ShapesSpec, objects_per_image: Sequence[List[ShapeObject]]) -> Dict:
    images, annotations = [], []
    for index, objects in enumerate(objects_per_image):
        image_id = index + 1
        images.append({"id": image_id, "file_name": image_file_name(index), "height": spec.height, "width": spec.width})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj.class_index + 1,
                    "bbox": list(obj.bbox),
                    "area": obj.area,
                    "iscrowd": 0,
                    "visible_fraction": obj.visible_fraction,
                }
            )
    return {
        "info": {
            "description": "Synthetic shapes (iou_aware_retinanet.data.synthetic)",
            "version": GENERATOR_VERSION,
            "params": params,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(spec.classes)
        ],
    }


def _default_num_workers(num_images: int) -> int:
    # Below ~64 images starting processes costs more than it saves.
    return 1 if num_images < 64 else min(4, os.cpu_count() or 1)


def generate_shapes_dataset(
    root: str,
    split: str,
    num_images: int,
    seed: int,
    spec: Optional[ShapesSpec] = None,
    name: str = "shapes",
    num_workers: Optional[int] = None,
    overwrite: bool = False,
) -> Tuple[str, str]:
    """Write a split of the shapes dataset in COCO format; return (json file, image folder).

    Does nothing but return the paths when a complete copy with the same
    parameters is already there (unless ``overwrite``). ``num_workers``
    processes render the images (default: up to 4 for 64 images or more, else
    1); the output does not depend on it.
    """
    spec = spec or ShapesSpec()
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if not split or os.sep in split or split in (".", "..", "annotations"):
        raise ValueError(f"invalid split name {split!r}")
    json_path, image_dir = dataset_paths(root, split, name)
    params = dataset_params(name, split, num_images, seed, spec)
    if not overwrite and is_complete(json_path, image_dir, params):
        logger.debug("Reusing %s", json_path)
        return json_path, image_dir
    if os.path.exists(json_path) and not overwrite:
        logger.info("%s was made with other parameters or is incomplete; regenerating it", json_path)

    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    workers = _default_num_workers(num_images) if num_workers is None else max(1, int(num_workers))
    logger.info("Generating %d images of %s/%s in %s with %d process(es)", num_images, name, split, image_dir, workers)
    start = time.perf_counter()
    tasks = [(spec, seed, split, index, image_dir) for index in range(num_images)]
    if workers == 1:
        objects_per_image = [_write_one(task) for task in tasks]
    else:
        with multiprocessing.get_context().Pool(workers) as pool:
            objects_per_image = pool.map(_write_one, tasks, chunksize=max(1, min(32, num_images // (4 * workers))))

    data = json.dumps(_coco_json(params, spec, objects_per_image))
    _atomic_write_bytes(json_path, data.encode("utf-8"))
    logger.info("Wrote %s (%d images) in %.1f s", json_path, num_images, time.perf_counter() - start)
    return json_path, image_dir


# --------------------------------------------------------------------------- fingerprint


def dataset_fingerprint(json_file: str, image_root: str, max_images: Optional[int] = None) -> str:
    """SHA-256 (hex) of a COCO-format dataset's decoded pixels and annotations.

    What a model trains on, and nothing else: the categories (id, name), then
    per image in id order (the first ``max_images``) its file name and size,
    the pixels as OpenCV decodes them (shape and bytes) and its annotations
    (every field but the ids, keys sorted). The json's ``info`` block, its
    layout and the PNG bytes do not enter, so the fingerprint changes when the
    data does (a new OpenCV or NumPy drawing other pixels, other boxes) and
    only then; the first k images of a split have the fingerprint of a k-image
    split of the same spec and seed (each image has its own random stream).
    """
    with open(json_file, "r", encoding="utf-8") as f:
        dataset = json.load(f)
    if max_images is not None and max_images < 0:
        raise ValueError(f"max_images must be >= 0 or None, got {max_images}")
    by_image: Dict[int, List[dict]] = {}
    for ann in dataset.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    digest = hashlib.sha256()

    def add_json(value) -> None:
        digest.update(json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8"))

    add_json(sorted([c["id"], c["name"]] for c in dataset.get("categories", [])))
    images = sorted(dataset.get("images", []), key=lambda im: im["id"])
    for image in images if max_images is None else images[:max_images]:
        path = os.path.join(image_root, image["file_name"])
        pixels = cv2.imread(path, cv2.IMREAD_COLOR)
        if pixels is None:
            raise FileNotFoundError(f"{json_file}: image {path} is missing or cannot be decoded")
        add_json([image["file_name"], image["height"], image["width"], list(pixels.shape), str(pixels.dtype)])
        digest.update(np.ascontiguousarray(pixels).tobytes())
        anns = sorted(by_image.get(image["id"], []), key=lambda a: a["id"])
        add_json([{k: v for k, v in a.items() if k not in ("id", "image_id")} for a in anns])
    return digest.hexdigest()


# --------------------------------------------------------------------------- command line


def _spec_from_args(args) -> ShapesSpec:
    spec = shapes_preset(args.difficulty)
    return spec if args.image_size is None else dataclasses.replace(spec, image_size=tuple(args.image_size))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Generate a split and print how long it took."""
    parser = argparse.ArgumentParser(description="Generate a split of the synthetic shapes dataset (COCO format).")
    parser.add_argument("--out", required=True, help="root folder; writes <out>/<name>/...")
    parser.add_argument("--name", default="shapes")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", default="standard", choices=list(SHAPES_PRESETS),
                        help="named spec (default: standard)")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                        help="override the difficulty's image size")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: up to 4)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if a complete copy exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    json_path, image_dir = generate_shapes_dataset(
        args.out,
        args.split,
        args.num_images,
        args.seed,
        spec=_spec_from_args(args),
        name=args.name,
        num_workers=args.workers,
        overwrite=args.overwrite,
    )
    elapsed = time.perf_counter() - start
    print(f"{args.num_images} images in {elapsed:.1f} s -> {json_path}, {image_dir}")
    print(f"data fingerprint (sha256 of decoded pixels and annotations): {dataset_fingerprint(json_path, image_dir)}")


if __name__ == "__main__":
    main()
