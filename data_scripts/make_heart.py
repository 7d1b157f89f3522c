"""Generate the procedural cardiac cine dataset (3D+t short-axis bSSFP, ACDC-like classes).

    python data_scripts/make_heart.py --out data/heart --n 64 --size 64 --frames 16 --seed 0

Writes an MSD-layout folder (dataset.json, manifest.csv, imagesTr/labelsTr, imagesTs/labelsTs):
image = the 4D cine (X, Y, Z, T), label = the ED labels, ``<id>_es`` = the ES labels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout, uninstalled

from gen3d_lessons.data import write_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/heart"), help="output folder")
    parser.add_argument("--n", type=int, default=64, help="number of subjects (classes round-robin)")
    parser.add_argument("--size", type=int, default=64, help="voxels per edge of the cubic grid")
    parser.add_argument("--frames", type=int, default=16, help="frames over one cardiac cycle")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of subjects in the test split")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:      # atomic, and refuses a folder that holds anything but a dataset gen3d wrote
        out = write_dataset("heart", args.out, force=True, n=args.n, size=args.size, frames=args.frames,
                            seed=args.seed, test_fraction=args.test_fraction, progress=True)
    except (ValueError, OSError) as error:       # bad arguments, a foreign or unwritable folder: one line
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"{args.n} heart subjects ({args.size}^3 x {args.frames} frames) in "
          f"{time.perf_counter() - start:.1f} s -> {out}")
    return out


if __name__ == "__main__":
    main()
