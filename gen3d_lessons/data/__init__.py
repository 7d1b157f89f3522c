"""The book's datasets: generated phantoms (brain, heart) cached under ``data/``, and readers.

Nothing is downloaded. ``ensure_dataset("brain")`` makes the cohort the first time (seconds) and
reuses it afterwards; the same readers open real MSD / ACDC folders (see ``datasets.py``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


def _complete(out: Path, n: int) -> bool:
    """Whether ``out`` holds a finished dataset of ``n`` subjects (dataset.json and manifest)."""
    meta = out / "dataset.json"
    if not meta.exists():
        return False
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError as err:
        raise DataError(meta, f"not valid JSON ({err}); delete the folder to regenerate it") from err
    return info.get("numTraining", 0) + info.get("numTest", 0) == n and (out / "manifest.csv").exists()


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out``'s cache entry: two chapters (or test workers) asking for
    the same dataset at the same moment make it once, and the second one waits and reuses it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_dataset(kind: str, out: str | Path, *, force: bool = False, progress: bool = True, **params) -> Path:
    """Generate a phantom dataset into ``out``, atomically.

    The subjects are written into a temporary sibling folder that is renamed to ``out`` at the
    end, so an interrupted run never leaves a folder that looks finished. An existing complete
    dataset is kept unless ``force``.
    """
    if kind not in DEFAULTS:
        raise ValueError(f"unknown dataset {kind!r}: expected one of {sorted(DEFAULTS)}")
    full = {**DEFAULTS[kind], **params}
    out = Path(out)
    with _lock(out):
        if not force and _complete(out, full["n"]):
            return out
        tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        if kind == "brain":
            from .brain import make_brain_dataset
            make_brain_dataset(tmp, n=full["n"], size=full["size"], seed=full["seed"], progress=progress)
        else:
            from .heart import make_heart_dataset
            make_heart_dataset(tmp, n=full["n"], size=full["size"], frames=full["frames"], seed=full["seed"],
                               progress=progress)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    return out


def ensure_dataset(kind: str, **params) -> Path:
    """Return the folder of the dataset, generating it first if it is not complete on disk."""
    out = dataset_dir(kind, **params)
    full = {**DEFAULTS[kind], **params}
    if _complete(out, full["n"]):
        return out
    return write_dataset(kind, out, **params)
