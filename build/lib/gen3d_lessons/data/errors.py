"""One error type for every data problem, with the file and what is wrong in its message."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data: a missing file, a wrong layout, a corrupt volume, a bad checksum ...

    The message always starts with the path it is about, then says what is wrong, e.g.
    ``DataError("data/brain/imagesTr/brain_003.nii.gz: contains 12 NaN voxels")``.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")
