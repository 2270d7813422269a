"""Recipe search: short training probes of the CPU-scale detector, AP against wall time.

    python -m iou_aware_retinanet.studies.recipe                       # every probe of PROBES
    python -m iou_aware_retinanet.studies.recipe --probes x_v128_lr04 x_v128nc_lr04   # some of them
    python -m iou_aware_retinanet.studies.recipe --shard 0/2 --threads 1 &   # two processes side by side
    python -m iou_aware_retinanet.studies.recipe --shard 1/2 --threads 1
    python -m iou_aware_retinanet.studies.recipe --probe my_try SOLVER.BASE_LR 0.05   # an ad-hoc probe

Every probe is the main job's config (``configs/Shapes/iou_aware_retinanet.yaml``)
with ``KEY VALUE`` overrides: a short schedule (2,000 iterations) and the
lever under test, on a *data variant* (a
:class:`~iou_aware_retinanet.data.synthetic.ShapesSpec` generated once under
the datasets root and named through ``DATASETS.COCO_INSTANCES``, or a
built-in name). The probes are grouped in three rounds and a last probe of
the loss normalizer (docs/recipe_search.md).

Each probe trains, evaluates once on its validation split and writes
``OUTPUT_DIR/recipe/<probe>/result.json``; a rerun reuses every result it
finds (delete the folder to rerun a probe), so a killed search continues
where it stopped. Wall time counts training and evaluation, not data
generation (done once, before the clock). The table is printed and written
to ``recipe.md`` / ``recipe.json``.
"""
import argparse
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..data import builtin
from ..data.synthetic import ShapesSpec, generate_shapes_dataset
from ..tv.cli import setup_logging
from ..tv.config import get_cfg
from ..tv.engine import train
from ..tv.evaluation import atomic_write_json

logger = logging.getLogger("iou_aware_retinanet.studies.recipe")

MAIN_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "Shapes" / "iou_aware_retinanet.yaml"


@dataclass(frozen=True)
class DataVariant:
    """Training / validation data of a probe: built-in names, or a spec generated on demand."""

    train: str
    val: str
    spec: Optional[ShapesSpec] = None  # None: ``train`` / ``val`` are built-in dataset names
    num_train: int = 0
    num_val: int = 0


DATA = OrderedDict(
    [
        ("shapes", DataVariant("shapes_train", "shapes_val")),
        ("shapes_hard", DataVariant("shapes_hard_train", "shapes_hard_val")),
        ("v128", DataVariant("v128_train", "v128_val", ShapesSpec(image_size=128, max_objects=5, min_object_size=12.0,
            min_clutter=0, max_clutter=3, min_visible_fraction=0.75), 2000, 300)),
        ("v128_noclutter", DataVariant("v128nc_train", "v128nc_val", ShapesSpec(image_size=128, max_objects=5, min_object_size=12.0,
            min_clutter=0, max_clutter=0, min_visible_fraction=0.75, min_contrast=60.0), 2000, 300)),
        ("v128_easy", DataVariant("v128e_train", "v128e_val", ShapesSpec(image_size=128, max_objects=4, min_object_size=16.0,
            min_clutter=0, max_clutter=2, min_visible_fraction=0.85), 2000, 300)),
        ("v128_nc8", DataVariant("v128nc8_train", "v128nc8_val", ShapesSpec(image_size=128, max_objects=8, min_object_size=12.0,
            min_clutter=0, max_clutter=0, min_visible_fraction=0.75, min_contrast=60.0), 2000, 300)),
        ("v128s", DataVariant("v128s_train", "v128s_val", ShapesSpec(image_size=128, max_objects=6, min_object_size=16.0,
            min_clutter=0, max_clutter=0, min_visible_fraction=0.75, min_contrast=60.0), 2000, 300)),
    ]
)


@dataclass(frozen=True)
class Probe:
    name: str
    what: str  # one line for the table
    opts: Tuple[str, ...] = ()
    data: str = "shapes"


def _p(name: str, what: str, *opts, data: str = "shapes") -> Probe:
    return Probe(name, what, tuple(str(o) for o in opts), data)


# Every probe: 2,000 iterations of 8 images at 128 px (steps at 1,400 and
# 1,800, 200 warmup iterations), the main job's model, one DataVariant; each
# row sets the learning rate and everything else it changes explicitly, so
# the rows keep their meaning when the main config moves on.
S128 = ("INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", 128, "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 128)
SCH2K = ("SOLVER.MAX_ITER", 2000, "SOLVER.STEPS", "(1400, 1800)", "SOLVER.WARMUP_ITERS", 200, "SOLVER.CHECKPOINT_PERIOD", 2000,
         "SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR")
# Rounds 1-3 use torchvision's per-image loss normalizer (the Shapes configs use Detectron2's).
TV_NORM = ("MODEL.RETINANET.LOSS_NORMALIZER", "per_image")
SHORT = S128 + SCH2K + TV_NORM
LR01, LR04, LR08 = ("SOLVER.BASE_LR", 0.01), ("SOLVER.BASE_LR", 0.04), ("SOLVER.BASE_LR", 0.08)
COSINE = ("SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR")
P3_P5 = ("MODEL.RETINANET.IN_FEATURES", "['p3','p4','p5']",
         "MODEL.ANCHOR_GENERATOR.SIZES", "[[16, 20.16, 25.40], [32, 40.32, 50.80], [64, 80.63, 101.59]]")
WIDE = ("MODEL.RESNETS.STEM_OUT_CHANNELS", 32, "MODEL.RESNETS.RES2_OUT_CHANNELS", 32, "MODEL.RESNETS.DEPTH", 10)

PROBES: List[Probe] = [
    # Round 1: the recipe on 128 px data with 0-3 distractors.
    _p("x_v128_lr01", "LR 0.01", *SHORT, *LR01, data="v128"),
    _p("x_v128_lr04", "LR 0.04", *SHORT, *LR04, data="v128"),
    _p("x_v128_lr08", "LR 0.08", *SHORT, *LR08, data="v128"),
    _p("x_v128_lr04_giou", "LR 0.04, GIoU box loss", *SHORT, *LR04, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "giou", data="v128"),
    _p("x_v128_lr04_head4", "LR 0.04, 4 head convs (not 2)", *SHORT, *LR04, "MODEL.RETINANET.NUM_CONVS", 4, data="v128"),
    _p("x_v128_lr04_w32d10", "LR 0.04, 2x wider, shallower backbone", *SHORT, *LR04, *WIDE, data="v128"),
    # Round 2: the data.
    _p("x_v128e_lr04", "LR 0.04; 0-2 distractors, objects from 16 px, 85 % visible", *SHORT, *LR04, data="v128_easy"),
    _p("x_v128nc_lr04", "LR 0.04; no distractors, contrast 60", *SHORT, *LR04, data="v128_noclutter"),
    _p("x_v128nc8_lr04", "LR 0.04; no distractors, up to 8 objects", *SHORT, *LR04, data="v128_nc8"),
    # Round 3: the recipe again, on data without distractors.
    _p("x_v128nc_lr08", "LR 0.08; no distractors", *SHORT, *LR08, data="v128_noclutter"),
    _p("x_v128nc_cos", "LR 0.04, cosine schedule; no distractors", *SHORT, *LR04, *COSINE, data="v128_noclutter"),
    _p("x_v128nc_p35", "LR 0.04, P3-P5 only (3 levels); no distractors", *SHORT, *LR04, *P3_P5, data="v128_noclutter"),
    # The loss normalizer: Detectron2's, 3,000 iterations on the standard data (the same schedule
    # with torchvision's per-image normalizer: docs/results.md, "The Detectron2 path").
    _p("x_shapes_3k_d2norm", "3,000 iterations, Detectron2's loss normalizer", *S128,
       "SOLVER.MAX_ITER", 3000, "SOLVER.STEPS", "(2100, 2700)", "SOLVER.WARMUP_ITERS", 300, "SOLVER.CHECKPOINT_PERIOD", 1000,
       "SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", *LR04, "MODEL.RETINANET.LOSS_NORMALIZER", "batch_ema", data="shapes"),
]


def _variant_opts(variant: DataVariant, root: str) -> List[str]:
    """Overrides that point DATASETS at ``variant`` (generated here if it is a spec)."""
    if variant.spec is None:
        builtin.ensure_generated([variant.train, variant.val])
        return ["DATASETS.TRAIN", f"('{variant.train}',)", "DATASETS.TEST", f"('{variant.val}',)"]
    instances = []
    for split, num, seed in ((variant.train, variant.num_train, 0), (variant.val, variant.num_val, 1)):
        json_file, image_dir = generate_shapes_dataset(root, split, num, seed, spec=variant.spec, name=variant.train.rsplit("_", 1)[0])
        instances.append([split, json_file, image_dir])
    return [
        "DATASETS.COCO_INSTANCES", repr(instances),
        "DATASETS.TRAIN", f"('{variant.train}',)", "DATASETS.TEST", f"('{variant.val}',)",
    ]  # fmt: skip


def probe_cfg(probe: Probe, output_dir: Path, config_file: Path = MAIN_CONFIG):
    if probe.data not in DATA:
        raise ValueError(f"probe {probe.name!r}: unknown data variant {probe.data!r}; known: {', '.join(DATA)}")
    cfg = get_cfg()
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(_variant_opts(DATA[probe.data], builtin.datasets_root()))
    cfg.merge_from_list(list(probe.opts))
    cfg.merge_from_list(["OUTPUT_DIR", str(output_dir / probe.name), "TEST.EVAL_PERIOD", 0])
    cfg.freeze()
    return cfg


def run_probe(probe: Probe, output_dir: Path, config_file: Path = MAIN_CONFIG) -> Dict:
    """Train and evaluate ``probe`` (or reuse its result.json)."""
    result_file = output_dir / probe.name / "result.json"
    if result_file.is_file():
        with open(result_file, "r", encoding="utf-8") as f:
            return json.load(f)
    cfg = probe_cfg(probe, output_dir, config_file)
    logger.info("Probe %s: %s %s", probe.name, probe.what, " ".join(probe.opts))
    start = time.perf_counter()
    results = train(cfg, resume=True)  # a probe killed half-way continues
    wall = time.perf_counter() - start
    metrics = next(iter(results.values()))["bbox"]
    result = {
        "probe": probe.name,
        "what": probe.what,
        "data": probe.data,
        "opts": list(probe.opts),
        "iterations": cfg.SOLVER.MAX_ITER,
        "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
        "threads": torch.get_num_threads(),
        "wall_s": round(wall, 1),
        "metrics": {k: round(float(v), 2) for k, v in metrics.items()},
    }
    atomic_write_json(str(result_file), result)
    return result


def table(results: Sequence[Dict]) -> str:
    lines = [
        "| probe | what | data | iters x batch | threads | wall min | AP | AP50 | AP75 | APs | APm | APl |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    described = {p.name: p.what for p in PROBES}
    for r in results:
        m = r["metrics"]
        r = {**r, "what": described.get(r["probe"], r["what"])}
        lines.append(
            f"| {r['probe']} | {r['what']} | {r['data']} | {r['iterations']} x {r['ims_per_batch']} | {r['threads']} "
            f"| {r['wall_s'] / 60:.1f} | {m['AP']:.1f} | {m['AP50']:.1f} | {m['AP75']:.1f} "
            f"| {m.get('APs', float('nan')):.1f} | {m.get('APm', float('nan')):.1f} | {m.get('APl', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", nargs="+", metavar="NAME", help="run these probes of PROBES (default: all)")
    parser.add_argument("--shard", default="0/1", metavar="I/N", help="run every N-th probe from the I-th (default 0/1)")
    parser.add_argument("--probe", nargs="+", metavar=("NAME", "KEY VALUE"), help="an ad-hoc probe: a name and overrides")
    parser.add_argument("--data", default="shapes", choices=list(DATA), help="data variant of --probe")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output-dir", default="output/recipe", type=Path)
    parser.add_argument("--config-file", default=MAIN_CONFIG, type=Path, help="the config every probe starts from")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = get_parser().parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        probes = [Probe(args.probe[0], "ad hoc: " + " ".join(args.probe[1:]), tuple(args.probe[1:]), args.data)]
    else:
        known = {p.name: p for p in PROBES}
        unknown = [n for n in args.probes or () if n not in known]
        if unknown:
            raise SystemExit(f"unknown probes {unknown}; known: {', '.join(known)}")
        probes = [known[n] for n in args.probes] if args.probes else list(PROBES)
    index, count = (int(v) for v in args.shard.split("/"))
    probes = probes[index::count]
    results = [run_probe(p, args.output_dir, args.config_file) for p in probes]
    # The table holds every probe with a result on disk, in PROBES order, whoever ran it.
    everything = []
    for p in list(PROBES) + [p for p in probes if p not in PROBES]:
        result_file = args.output_dir / p.name / "result.json"
        if result_file.is_file():
            with open(result_file, "r", encoding="utf-8") as f:
                everything.append(json.load(f))
    text = table(everything)
    print(text)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(args.output_dir / "recipe.md", "w", encoding="utf-8") as f:
        f.write(text + "\n")
    atomic_write_json(str(args.output_dir / "recipe.json"), everything)
    return results



if __name__ == "__main__":
    main()
