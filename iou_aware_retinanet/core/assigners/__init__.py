"""Label assigners behind one interface, built by name with ``build_assigner`` (from
options) or ``assigner_from_cfg`` (from a config, by the assigner's own ``from_cfg``)."""
from .base import (
    ASSIGNER_REGISTRY,
    BACKGROUND,
    IGNORE,
    AnchorSet,
    Assigner,
    Assignment,
    DegenerateBoxWarning,
    Predictions,
    assigner_class,
    assigner_from_cfg,
    available_assigners,
    build_assigner,
    register_assigner,
    resolve_conflicts,
)

# Importing the modules registers the assigners.
from .max_iou import MaxIoUAssigner
from .topk import TopKAssigner
from .atss import ATSSAssigner
from .noisy_anchor import NoisyAnchorAssigner
from .hambox import HAMBoxAssigner
from .task_aligned import TaskAlignedAssigner
