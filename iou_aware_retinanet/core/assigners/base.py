"""The one interface every label assigner implements.

An assigner looks at the anchors of one image, its ground truth and (for the
dynamic assigners) the detached predictions of the current forward pass, and
says for every anchor: which GT it learns from, or that it is background, or
that it is ignored. Dynamic assigners may add soft classification targets and
per-anchor loss weights; static ones leave them ``None`` and never see the
predictions, so they pay nothing for them.

Each assigner builds itself from a config (``from_cfg``, reading its own
``MODEL.ASSIGNER.<NAME>`` keys), so the config layer only looks up the name.
"""
import warnings
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Optional, Sequence, Tuple, Type

import torch
from fvcore.common.registry import Registry
from torch import Tensor

from ..boxes import DEFAULT_MAX_BLOCK_ELEMENTS, valid_box_mask

# Codes of ``Assignment.matched_gt`` for anchors that are not foreground
# (the convention of torchvision's Matcher).
BACKGROUND = -1
IGNORE = -2


class DegenerateBoxWarning(UserWarning):
    """Ground-truth boxes with non-positive width/height or non-finite coordinates were dropped."""


@dataclass(frozen=True)
class AnchorSet:
    """The anchors of one image, all FPN levels concatenated.

    Order inside a level does not matter to the assigners; ``num_per_level``
    says where each level starts, ``num_per_location`` how many anchors share a
    centre (ATSS takes k x that many candidates per level, as its official code).
    """

    boxes: Tensor  # (A, 4)
    num_per_level: Tuple[int, ...]
    num_per_location: int = 1

    def __post_init__(self):
        if self.boxes.dim() != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"anchors must be (A, 4), got {tuple(self.boxes.shape)}")
        if sum(self.num_per_level) != self.boxes.shape[0]:
            raise ValueError(
                f"num_per_level {tuple(self.num_per_level)} sums to {sum(self.num_per_level)}, "
                f"but there are {self.boxes.shape[0]} anchors"
            )
        if self.num_per_location < 1:
            raise ValueError(f"num_per_location must be >= 1, got {self.num_per_location}")

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def level_slices(self):
        start = 0
        for n in self.num_per_level:
            yield slice(start, start + n)
            start += n


@dataclass(frozen=True)
class Predictions:
    """Detached predictions of the current forward pass for one image."""

    cls_probs: Tensor  # (A, K) sigmoid class probabilities
    boxes: Tensor  # (A, 4) decoded (regressed) boxes
    ious: Optional[Tensor] = None  # (A,) IoU-branch predictions in [0, 1], when the model has one


@dataclass
class Assignment:
    """Per-anchor training targets of one image.

    labels:       (A,) int64, Detectron2's convention: -1 ignore, 0..K-1 the
                  foreground class, K background. (Subclasses' ``_match``
                  leaves it None; ``Assigner.__call__`` fills it in.)
    matched_gt:   (A,) int64 index of the GT a foreground anchor learns from;
                  BACKGROUND (-1) or IGNORE (-2) elsewhere.
    cls_targets:  (A,) float target of the foreground class of foreground
                  anchors (soft labels); None means 1.
    cls_weights:  (A,) float weight of each anchor's classification loss (all
                  K terms); None means 1.
    box_weights:  (A,) float weight of each foreground anchor's regression loss;
                  None means 1.

    How soft ``cls_targets`` are trained is the loss configuration's choice
    (``LossConfig.soft_target_loss``), not the assignment's.
    """

    labels: Optional[Tensor]
    matched_gt: Tensor
    cls_targets: Optional[Tensor] = None
    cls_weights: Optional[Tensor] = None
    box_weights: Optional[Tensor] = None

    @property
    def foreground(self) -> Tensor:
        return self.matched_gt >= 0

    @property
    def num_foreground(self) -> int:
        return int(self.foreground.sum())


class Assigner:
    """Base class: input checks, degenerate/empty GT handling, class labels.

    Subclasses implement ``_match`` on clean, non-empty ground truth and return
    an ``Assignment`` whose ``matched_gt`` indexes that clean GT (or is
    BACKGROUND / IGNORE), with ``labels`` left None, plus optional soft
    targets and weights, and ``from_cfg`` if they have options.
    """

    needs_predictions: ClassVar[bool] = False
    # The classification loss the assigner's soft targets are trained with in its
    # reference code: "focal" or "quality_focal" (see core.losses). Read once, by
    # the config layer, into ``LossConfig.soft_target_loss``.
    soft_target_loss: ClassVar[str] = "focal"

    def __init__(self, num_classes: int, max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.max_block_elements = int(max_block_elements)

    @classmethod
    def from_cfg(cls, cfg, num_classes: int) -> "Assigner":
        """The assigner with its options from a (Detectron2-style) config.

        Subclasses with options read their own ``cfg.MODEL.ASSIGNER.<NAME>``
        keys; this default suits an assigner without options.
        """
        return cls(num_classes)

    @torch.no_grad()
    def __call__(
        self,
        anchors: AnchorSet,
        gt_boxes: Tensor,
        gt_classes: Tensor,
        predictions: Optional[Predictions] = None,
    ) -> Assignment:
        gt_boxes, gt_classes, kept = self._clean_gt(gt_boxes, gt_classes)
        if self.needs_predictions:
            self._check_predictions(anchors, predictions)
        num_anchors = len(anchors)
        device = anchors.boxes.device
        if gt_boxes.shape[0] == 0:
            return Assignment(
                labels=torch.full((num_anchors,), self.num_classes, dtype=torch.long, device=device),
                matched_gt=torch.full((num_anchors,), BACKGROUND, dtype=torch.long, device=device),
            )

        result = self._match(anchors, gt_boxes, gt_classes, predictions)
        matched = result.matched_gt
        fg = matched >= 0
        labels = torch.full_like(matched, self.num_classes)
        labels[fg] = gt_classes[matched[fg]]
        labels[matched == IGNORE] = -1
        # Report GT indices in the caller's numbering (degenerate boxes removed above).
        matched = matched.clone()
        matched[fg] = kept[matched[fg]]
        return replace(result, labels=labels, matched_gt=matched)

    def _match(
        self,
        anchors: AnchorSet,
        gt_boxes: Tensor,
        gt_classes: Tensor,
        predictions: Optional[Predictions],
    ) -> Assignment:
        raise NotImplementedError

    def _clean_gt(self, gt_boxes: Tensor, gt_classes: Tensor):
        if gt_boxes.dim() != 2 or gt_boxes.shape[1] != 4:
            raise ValueError(f"gt_boxes must be (G, 4), got {tuple(gt_boxes.shape)}")
        if gt_classes.shape != gt_boxes.shape[:1]:
            raise ValueError(
                f"gt_classes {tuple(gt_classes.shape)} does not match gt_boxes {tuple(gt_boxes.shape)}"
            )
        gt_classes = gt_classes.long()
        if gt_classes.numel() and (gt_classes.min() < 0 or gt_classes.max() >= self.num_classes):
            raise ValueError(
                f"gt_classes must lie in [0, {self.num_classes}), got values in "
                f"[{int(gt_classes.min())}, {int(gt_classes.max())}]"
            )
        valid = valid_box_mask(gt_boxes)
        kept = torch.nonzero(valid).squeeze(1)
        if kept.numel() != gt_boxes.shape[0]:
            bad = gt_boxes[~valid]
            warnings.warn(
                f"{bad.shape[0]} ground-truth box(es) with non-positive width/height or "
                f"non-finite coordinates were dropped from label assignment, e.g. {bad[0].tolist()}",
                DegenerateBoxWarning,
                stacklevel=3,
            )
            gt_boxes, gt_classes = gt_boxes[kept], gt_classes[kept]
        return gt_boxes, gt_classes, kept

    @staticmethod
    def _check_predictions(anchors: AnchorSet, predictions: Optional[Predictions]):
        if predictions is None:
            raise ValueError("this assigner looks at the current predictions; pass predictions=")
        if predictions.boxes.shape != anchors.boxes.shape:
            raise ValueError(
                f"predicted boxes {tuple(predictions.boxes.shape)} do not match anchors "
                f"{tuple(anchors.boxes.shape)}"
            )
        if predictions.cls_probs.shape[0] != len(anchors):
            raise ValueError(
                f"predicted class probabilities {tuple(predictions.cls_probs.shape)} do not match "
                f"{len(anchors)} anchors"
            )


def resolve_conflicts(
    anchor_idx: Tensor, gt_idx: Tensor, quality: Tensor, num_anchors: int
) -> Tensor:
    """Give each anchor to the claiming GT with the highest ``quality``.

    ``anchor_idx``, ``gt_idx``, ``quality`` list (anchor, GT) claims. Returns
    (A,) matched GT per anchor, BACKGROUND where nobody claimed it. Exact ties
    go to the lower GT index, so the result does not depend on claim order.
    """
    matched = torch.full((num_anchors,), BACKGROUND, dtype=torch.long, device=anchor_idx.device)
    if anchor_idx.numel() == 0:
        return matched
    best = torch.full((num_anchors,), float("-inf"), dtype=quality.dtype, device=quality.device)
    best.scatter_reduce_(0, anchor_idx, quality, reduce="amax")
    is_best = quality == best[anchor_idx]
    # Among the best claims of an anchor take the smallest GT index.
    neg_gt = torch.full((num_anchors,), -(2**62), dtype=torch.long, device=anchor_idx.device)
    neg_gt.scatter_reduce_(0, anchor_idx[is_best], -gt_idx[is_best], reduce="amax")
    claimed = neg_gt > -(2**62)
    matched[claimed] = -neg_gt[claimed]
    return matched


class _AssignerRegistry(Registry):
    """fvcore's ``Registry`` (Detectron2's), keyed by the assigner's config name
    ("max_iou", ...) rather than its class name."""

    def register_as(self, name: str) -> Callable[[Type[Assigner]], Type[Assigner]]:
        def deco(cls: Type[Assigner]) -> Type[Assigner]:
            if name in self:
                raise ValueError(f"assigner {name!r} is already registered")
            self._do_register(name, cls)
            return cls

        return deco


ASSIGNER_REGISTRY = _AssignerRegistry("ASSIGNER")
ASSIGNER_REGISTRY.__doc__ = """Label assigners by name (``MODEL.ASSIGNER.NAME``); add your own with
``@register_assigner("my_name")`` on an :class:`Assigner` subclass."""


def register_assigner(name: str) -> Callable[[Type[Assigner]], Type[Assigner]]:
    """Class decorator: make an assigner buildable by ``name``."""
    return ASSIGNER_REGISTRY.register_as(name)


def available_assigners() -> Sequence[str]:
    return sorted(name for name, _ in ASSIGNER_REGISTRY)


def assigner_class(name: str) -> Type[Assigner]:
    """The assigner class registered as ``name``; an unknown name lists the valid ones."""
    if name not in ASSIGNER_REGISTRY:
        raise ValueError(
            f"unknown label assigner {name!r}; valid choices: {', '.join(available_assigners())}"
        )
    return ASSIGNER_REGISTRY.get(name)


def build_assigner(name: str, num_classes: int, **kwargs) -> Assigner:
    """Build a registered assigner; unknown names or options list the valid ones."""
    cls = assigner_class(name)
    try:
        return cls(num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for assigner {name!r}: {e}") from None


def assigner_from_cfg(name: str, cfg, num_classes: int) -> Assigner:
    """The registered assigner ``name``, built by its ``from_cfg`` from ``cfg``."""
    return assigner_class(name).from_cfg(cfg, num_classes)
