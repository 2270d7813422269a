"""``python -m iou_aware_retinanet {train,eval,predict} ...``: the torchvision front-end's command line
(:mod:`iou_aware_retinanet.tv.cli`)."""
from .tv.cli import main

if __name__ == "__main__":
    main()
