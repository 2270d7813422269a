# The YAML configs' SOLVER keys as a LazyConfig optimizer and LR multiplier.
import torch
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params

# SOLVER.BASE_LR / MOMENTUM / WEIGHT_DECAY / WEIGHT_DECAY_NORM. params.model is set to
# the model before the optimizer is instantiated (lazyconfig_train_net.py does it).
optimizer = L(torch.optim.SGD)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
)


def lr_multiplier(steps, max_iter, warmup_iters=1000, gamma=0.1, warmup_factor=0.001):
    """SOLVER.STEPS / MAX_ITER / WARMUP_ITERS / GAMMA / WARMUP_FACTOR: linear warmup,
    then the LR times gamma at each step."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[gamma**k for k in range(len(steps) + 1)], milestones=list(steps), num_updates=max_iter
        ),
        warmup_length=min(warmup_iters / max_iter, 1.0),
        warmup_method="linear",
        warmup_factor=warmup_factor,
    )
