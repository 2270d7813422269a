"""Anchors: Detectron2's ``DefaultAnchorGenerator`` on torchvision's ``AnchorGenerator`` interface.

Three differences from torchvision's generator, all to make a YAML file give
the same anchors on both front-ends:

* cell anchors are not rounded to whole pixels (torchvision rounds
  ``(-w/2, -h/2, w/2, h/2)``; Detectron2 does not);
* each level's stride is the backbone's (8, 16, ..., 128), not
  ``padded image size // feature size``, which torchvision uses and which is
  wrong for P6/P7 whenever the padded image is not a multiple of 128 (e.g. a
  288-pixel side gives P6 a "stride" of 57 instead of 64);
* ``MODEL.ANCHOR_GENERATOR.OFFSET``: anchor centres at (offset + i) * stride.

Anchors are ordered as in both libraries: level, then location (row-major),
then cell anchor. Within a location the cell anchors follow torchvision's
order (aspect ratio major, size minor; Detectron2's is size major) -- it only
decides which head output channel is which anchor.
"""
import math
from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator as _TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

__all__ = ["AnchorGenerator", "anchor_params_from_cfg", "build_anchor_generator"]

# With ``cache``: anchors kept for at most this many feature-map sizes (the least recently used go first).
MAX_CACHED_SIZES = 16


class AnchorGenerator(_TVAnchorGenerator):
    """torchvision's ``AnchorGenerator`` with Detectron2's geometry (see the module doc).

    ``sizes[l]`` / ``aspect_ratios[l]`` (height / width) per level, ``strides[l]``
    the level's stride in pixels, ``offset`` in [0, 1). ``cache`` (off by default):
    reuse the anchors of feature maps of sizes seen before (up to
    ``MAX_CACHED_SIZES`` of them) rather than regenerate them every forward; the
    values are the same, the tensor is shared between calls (do not modify it in place).
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int],
        offset: float = 0.0,
        cache: bool = False,
    ):
        if not (len(sizes) == len(aspect_ratios) == len(strides)):
            raise ValueError(
                f"need one entry per level: {len(sizes)} sizes, {len(aspect_ratios)} aspect ratios, "
                f"{len(strides)} strides"
            )
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"offset must lie in [0, 1), got {offset}")
        super().__init__(
            tuple(tuple(float(s) for s in level) for level in sizes),
            tuple(tuple(float(a) for a in level) for level in aspect_ratios),
        )
        self.strides = tuple(int(s) for s in strides)
        self.offset = float(offset)
        # ``cache``: keep the anchors of each (feature-map sizes, dtype, device) instead of
        # regenerating them every forward; the tensors returned are the same values.
        self.cache = bool(cache)
        self._cached: "OrderedDict[tuple, Tensor]" = OrderedDict()

    def generate_anchors(
        self,
        scales: List[float],
        aspect_ratios: List[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),
    ) -> Tensor:
        """Zero-centred cell anchors, as torchvision's but without rounding."""
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def grid_anchors_per_level(self, grid_sizes: Sequence[Tuple[int, int]]) -> List[Tensor]:
        """(H_l * W_l * A, 4) anchors of each level."""
        anchors = []
        for (height, width), stride, cell in zip(grid_sizes, self.strides, self.cell_anchors):
            device, dtype = cell.device, cell.dtype
            shifts_x = (torch.arange(width, device=device, dtype=dtype) + self.offset) * stride
            shifts_y = (torch.arange(height, device=device, dtype=dtype) + self.offset) * stride
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            anchors.append((shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4))
        return anchors

    def forward(self, image_list: ImageList, feature_maps: List[Tensor]) -> List[Tensor]:
        """One (sum_l H_l * W_l * A, 4) tensor per image (the same tensor for every image)."""
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"got {len(feature_maps)} feature maps for {len(self.strides)} anchor levels")
        # float32 at least, as Detectron2's anchors: under autocast the features are float16 /
        # bfloat16, which cannot hold coordinates of a large image to the pixel.
        dtype, device = torch.promote_types(feature_maps[0].dtype, torch.float32), feature_maps[0].device
        grid_sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        # A trace (export) or a compiled graph must compute the anchors from the sizes, not
        # hold a constant from the cache.
        use_cache = self.cache and not (
            torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
        )
        key = (tuple((int(h), int(w)) for h, w in grid_sizes), dtype, device) if use_cache else None
        if use_cache and key in self._cached:
            self._cached.move_to_end(key)
            anchors = self._cached[key]
        else:
            self.set_cell_anchors(dtype, device)
            anchors = torch.cat(self.grid_anchors_per_level(grid_sizes))
            if use_cache:
                self._cached[key] = anchors
                if len(self._cached) > MAX_CACHED_SIZES:  # many input sizes: keep the recently used
                    self._cached.popitem(last=False)
        return [anchors for _ in image_list.image_sizes]


def _broadcast(values, num_levels: int, key: str) -> List[List[float]]:
    """Detectron2's rule: a list of lists, either one per level or one for all levels."""
    if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, (list, tuple)) for v in values):
        raise ValueError(f"{key} must be a list of lists (one list per level, or one for all), got {values!r}")
    if len(values) == 1:
        values = list(values) * num_levels
    if len(values) != num_levels:
        raise ValueError(f"{key} has {len(values)} lists but there are {num_levels} feature levels")
    return [[float(x) for x in v] for v in values]


def anchor_params_from_cfg(cfg, strides: Sequence[int]):
    """(sizes, aspect_ratios, offset) per level from ``MODEL.ANCHOR_GENERATOR``, validated."""
    node = cfg.MODEL.ANCHOR_GENERATOR
    if node.NAME != "DefaultAnchorGenerator":
        raise ValueError(
            f"MODEL.ANCHOR_GENERATOR.NAME={node.NAME!r} is not supported by the torchvision front-end; "
            "supported: 'DefaultAnchorGenerator'"
        )
    sizes = _broadcast(node.SIZES, len(strides), "MODEL.ANCHOR_GENERATOR.SIZES")
    ratios = _broadcast(node.ASPECT_RATIOS, len(strides), "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")
    for key, levels in (("SIZES", sizes), ("ASPECT_RATIOS", ratios)):
        if any(not (x > 0 and math.isfinite(x)) for level in levels for x in level):
            raise ValueError(f"MODEL.ANCHOR_GENERATOR.{key} must be positive, got {levels}")
    per_location = {len(s) * len(r) for s, r in zip(sizes, ratios)}
    if len(per_location) != 1:
        raise ValueError(
            "MODEL.ANCHOR_GENERATOR.SIZES / ASPECT_RATIOS: every level needs the same number of anchors "
            f"per location (RetinaNet shares its head across levels), got sizes {sizes} and aspect "
            f"ratios {ratios}"
        )
    if not 0.0 <= node.OFFSET < 1.0:
        raise ValueError(f"MODEL.ANCHOR_GENERATOR.OFFSET must lie in [0, 1), got {node.OFFSET}")
    return sizes, ratios, float(node.OFFSET)


def build_anchor_generator(cfg, strides: Sequence[int]) -> AnchorGenerator:
    """The anchor generator of the levels with these ``strides`` (``MODEL.RETINANET.IN_FEATURES``)."""
    sizes, ratios, offset = anchor_params_from_cfg(cfg, strides)
    return AnchorGenerator(sizes, ratios, strides, offset)
