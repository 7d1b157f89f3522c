"""The book's datasets: generated phantoms (brain, heart) cached under ``data/``, and readers.

Nothing is downloaded. ``ensure_dataset("brain")`` makes the cohort the first time (seconds) and
reuses it afterwards; the same readers open real MSD / ACDC folders (see ``datasets.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import DataError

# The datasets `make data` writes (the CLI of data_scripts/ with these arguments).
DEFAULTS = {
    "brain": dict(n=64, size=64, seed=0),
    "heart": dict(n=64, size=64, seed=0, frames=16),
}


def data_root() -> Path:
    """Where datasets are cached: $GEN3D_DATA, else ``data/`` in the repository (found from the cwd)."""
    if os.environ.get("GEN3D_DATA"):
        return Path(os.environ["GEN3D_DATA"])
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").exists() and (folder / "gen3d_lessons").is_dir():
            return folder / "data"
    return here / "data"


def dataset_dir(kind: str, **params) -> Path:
    """The cache folder of a dataset: ``data/brain`` for the defaults, else a name with its parameters."""
    if kind not in DEFAULTS:
        raise ValueError(f"unknown dataset {kind!r}: expected one of {sorted(DEFAULTS)}")
    full = {**DEFAULTS[kind], **params}
    if full == DEFAULTS[kind]:
        return data_root() / kind
    tag = "-".join(f"{k}{v}" for k, v in sorted(full.items()))
    return data_root() / f"{kind}-{tag}"


def ensure_dataset(kind: str, **params) -> Path:
    """Return the folder of the dataset, generating it first if it is not complete on disk."""
    full = {**DEFAULTS.get(kind, {}), **params}
    out = dataset_dir(kind, **params)
    meta = out / "dataset.json"
    if meta.exists():
        try:
            info = json.loads(meta.read_text())
            if info.get("numTraining", 0) + info.get("numTest", 0) == full["n"] and (out / "manifest.csv").exists():
                return out
        except json.JSONDecodeError as err:
            raise DataError(meta, f"not valid JSON ({err}); delete the folder to regenerate it") from err
    if kind == "brain":
        from .brain import make_brain_dataset
        return make_brain_dataset(out, n=full["n"], size=full["size"], seed=full["seed"])
    from .heart import make_heart_dataset
    return make_heart_dataset(out, n=full["n"], size=full["size"], frames=full["frames"], seed=full["seed"])
