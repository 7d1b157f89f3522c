"""Generate the synthetic brain cohort in the MSD layout.

    python data_scripts/make_brain.py --out data/brain --n 64 --size 64 --seed 0

Runs from the repository root without installing the package. See gen3d_lessons/data/brain.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # let "python data_scripts/make_brain.py" find the library uninstalled
    sys.path.insert(0, str(ROOT))

from gen3d_lessons.data import write_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic brain dataset (4 MR contrasts, labels, "
                                                 "low-dose copies) in the Medical Segmentation Decathlon layout.")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/brain")
    parser.add_argument("--n", type=int, default=64, help="number of subjects (default 64)")
    parser.add_argument("--size", type=int, default=64, help="edge of the cubic grid in voxels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="share of subjects in imagesTs (default 0.2)")
    parser.add_argument("--lesion-fraction", type=float, default=0.3,
                        help="chance that a subject has lesions (default 0.3)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    try:      # atomic, and refuses a folder that holds anything but a dataset gen3d wrote
        out = write_dataset("brain", args.out, force=True, n=args.n, size=args.size, seed=args.seed,
                            test_fraction=args.test_fraction, lesion_fraction=args.lesion_fraction)
    except (ValueError, OSError) as err:   # bad arguments, a foreign or unwritable folder: one clear line
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"wrote {args.n} brains of {args.size}^3 to {out.resolve()} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
