"""Learning curve of a training run: the AP of its periodic evaluations against the iteration.

    python -m iou_aware_retinanet.studies.learning_curve output/shapes/iou_aware_retinanet \\
        [--out docs/learning_curve.png]

Reads ``OUTPUT_DIR/metrics.json`` (the lines with ``bbox/AP`` that the
engine writes every ``TEST.EVAL_PERIOD`` iterations and after the last one),
prints the table and, with ``--out``, plots AP / AP50 / AP75 and the training
loss (needs matplotlib: the ``analysis`` extra).
"""
import argparse
import os
from typing import Dict, List, Optional, Sequence

from ..tv.evaluation import CURVE_METRICS, curve_table, evaluation_points, read_metrics

def plot_curve(records: Sequence[Dict], points: Sequence[Dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ap, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    for metric in CURVE_METRICS:
        ax_ap.plot([p["iteration"] for p in points], [p[metric] for p in points], marker="o", label=metric)
    ax_ap.set_xlabel("iteration")
    ax_ap.set_ylabel("COCO box AP (%)")
    ax_ap.set_ylim(0, 100)
    ax_ap.grid(alpha=0.3)
    ax_ap.legend()
    ax_ap.set_title(title or "validation AP")
    losses = [r for r in records if "total_loss" in r]
    for key in ("total_loss", "loss_cls", "loss_box_reg", "loss_iou", "loss_iou_minus_entropy"):
        if losses and key in losses[0]:
            ax_loss.plot([r["iteration"] + 1 for r in losses], [r[key] for r in losses], label=key, lw=1)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss (window median)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_loss.set_title("training losses")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    parser = argparse.ArgumentParser(description="AP of the periodic evaluations of a training run against the iteration.")
    parser.add_argument("output_dir", help="OUTPUT_DIR of the run")
    parser.add_argument("--dataset", default=None, help="test dataset (default: the first)")
    parser.add_argument("--out", default=None, help="write the plot here (PNG)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    records = read_metrics(args.output_dir)
    points = evaluation_points(records, args.dataset)
    if not points:
        raise SystemExit(f"no evaluation in {args.output_dir}/metrics.json (set TEST.EVAL_PERIOD)")
    print(curve_table(points))
    if args.out:
        plot_curve(records, points, args.out, args.title)
        print(f"wrote {args.out}")
    return points


if __name__ == "__main__":
    main()
