#!/usr/bin/env python
"""Download the wheels the GPU check needs on a machine without a package index.

    python tools/gpu_wheels.py            # into .gpu_wheels/ (ignored by git)
    python tools/gpu_wheels.py --list     # only say what would be downloaded
    bash tools/gpu_check.sh [ARGS]        # on the GPU machine: install them, run the check

The GPU machine this is made for has CPython 3.12 on x86-64 Linux with torch,
torchvision, numpy, Pillow, PyYAML, tqdm, tabulate, portalocker, cloudpickle,
matplotlib, tensorboard, onnx, onnxruntime, opencv-python-headless and pytest
installed, and cannot reach a package index: the rest of what the project and
Detectron2 import travels as wheels in the working tree (``tools/gpu_check.sh``
installs them with ``pip install --no-index --no-deps``). Wheels with compiled
code are downloaded for that Python and platform; the two pure-Python packages
published only as source (fvcore, antlr4-python3-runtime) are built here into
``py3-none-any`` wheels. Detectron2 itself is not on any index: a prebuilt
wheel for that Python and torch (``detectron2-*-cp312-*.whl``) is copied in from
``$DETECTRON2_WHEEL`` or ``../shared/wheels`` next to the clone when there is
one; without it the check skips its Detectron2 rows with the reason.

Nothing here is needed to install or test the project on a CPU.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / ".gpu_wheels"
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")

# (requirement, how): "binary" is downloaded for the target Python / platform; "build" is a
# pure-Python source release built into a py3-none-any wheel here.
WHEELS = (
    ("fvcore==0.1.5.post20221221", "build"),  # the torchvision front-end's config, schedulers, checkpointer
    ("iopath==0.1.9", "binary"),  # fvcore's file I/O (Detectron2 wants < 0.1.10)
    ("yacs==0.1.8", "binary"),  # fvcore's CfgNode base
    ("termcolor==3.3.0", "binary"),  # fvcore / Detectron2 logging
    ("pycocotools==2.0.11", "binary"),  # COCO evaluation (compiled)
    ("omegaconf==2.3.0", "binary"),  # Detectron2's LazyConfig (imported by detectron2.config)
    ("antlr4-python3-runtime==4.9.3", "build"),  # omegaconf's parser (it pins 4.9.*)
)
DETECTRON2_PATTERN = "detectron2-*-cp312-cp312-linux_x86_64.whl"
SIZE_LIMIT_MIB = 64  # what may travel with the working tree in one command


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def download_binary(requirement: str, dest: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip("download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
        "--implementation", "cp", *platforms, "-d", str(dest), requirement)


def build_pure(requirement: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pip("wheel", "--no-deps", "--no-binary", requirement.split("==")[0], "-w", tmp, requirement)
        for wheel in Path(tmp).glob("*.whl"):
            if not wheel.name.endswith("-none-any.whl"):
                raise SystemExit(f"{wheel.name} is not a pure-Python wheel: it would not run on another Python")
            shutil.copy2(wheel, dest / wheel.name)


def find_detectron2_wheel():
    candidates = [os.environ.get("DETECTRON2_WHEEL", "")]
    for folder in (REPO.parent / "shared" / "wheels", REPO.parent.parent / "shared" / "wheels"):
        candidates += sorted(glob.glob(str(folder / DETECTRON2_PATTERN)))
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DIR, help="folder for the wheels (default .gpu_wheels)")
    parser.add_argument("--list", action="store_true", help="print what would be fetched, fetch nothing")
    args = parser.parse_args(argv)

    detectron2 = find_detectron2_wheel()
    if args.list:
        for requirement, how in WHEELS:
            print(f"{requirement:40s} {'wheel for CPython 3.12 on manylinux x86-64' if how == 'binary' else 'built here from source: py3-none-any'}")
        print(f"{'detectron2 (prebuilt, cp312)':40s} {detectron2 or 'not found: set DETECTRON2_WHEEL'}")
        return

    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):  # one version of each: two would stop the install
        old.unlink()
    for requirement, how in WHEELS:
        (download_binary if how == "binary" else build_pure)(requirement, args.dest)
    if detectron2 is not None:
        shutil.copy2(detectron2, args.dest / detectron2.name)
    else:
        print("no Detectron2 cp312 wheel found (DETECTRON2_WHEEL, ../shared/wheels): the check will skip its "
              "Detectron2 rows", file=sys.stderr)

    wheels = sorted(args.dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels) / 2**20
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {args.dest}")
    if total > SIZE_LIMIT_MIB:
        raise SystemExit(f"the wheels take {total:.0f} MiB: more than the {SIZE_LIMIT_MIB} MiB that travel in one command")


if __name__ == "__main__":
    main()
