"""One reader for the dataset folders of the book: ours, real MSD tasks, and ACDC.

``read_dataset(root)`` looks at the folder, decides which layout it is, lists its cases and checks
that the listed files are there (and match the manifest's checksums when asked):

    MSD    <root>/dataset.json + imagesTr/ labelsTr/ imagesTs/ [labelsTs/] [manifest.csv]
           (our phantoms, Task01_BrainTumour, Task02_Heart ...; see ``msd.py`` for our additions)
    ACDC   <root>/[training|testing/]patientNNN/Info.cfg, patientNNN_4d.nii.gz,
           patientNNN_frameNN.nii.gz and patientNNN_frameNN_gt.nii.gz at the ED and ES frames

``load_case(record)`` reads one case's volumes with checks, and ``VolumeDataset`` serves cases as
torch tensors ``(C, D, H, W)``, where D, H, W are the three array axes of the NIfTI file.
``stack_cases`` / ``stack_cine_phases`` read a whole split into one tensor for in-memory
batches (:mod:`gen3d_lessons.data.batches`).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .errors import DataError
from .io import Volume, load_nifti
from .nifti import sha256

SPLITS = ("train", "test")
MANIFEST_COLUMNS = ("id", "split", "key", "path", "sha256")
ACDC_LABELS = {0: "background", 1: "RV cavity", 2: "myocardium", 3: "LV cavity"}
_ACDC_ATTRIBUTE_NAMES = {"Group": "pathology", "Height": "height", "Weight": "weight", "NbFrame": "n_frames"}
_PATIENT_DIR = re.compile(r"patient\d+")
_INT = re.compile(r"[+-]?\d+")


@dataclass
class CaseRecord:
    """One case of a dataset: where its files are, and what is known about it.

    ``files`` maps a key to a file: MSD ``image``, ``label`` and extra keys (``lowdose``, ``es`` ...);
    ACDC ``image`` (the 4D cine), ``ed_image``, ``ed_label``, ``es_image``, ``es_label``.
    ``label_keys`` says which of them are label maps; ``labels`` is the dataset's label set,
    used to check their values (empty: no check).
    """

    id: str
    split: str                                   # "train" or "test"
    files: dict[str, Path]
    attributes: dict[str, Any] = field(default_factory=dict)
    label_keys: tuple[str, ...] = ("label",)
    labels: dict[int, str] = field(default_factory=dict, repr=False)


@dataclass
class DatasetIndex:
    """What ``read_dataset`` found: the layout, the label set and channel names, and the cases."""

    root: Path
    layout: Literal["msd", "acdc"]
    name: str
    labels: dict[int, str]       # {0: "background", 1: "edema", ...}
    modality: dict[int, str]     # channel index -> name, {0: "T1", 1: "T2", ...}
    cases: list[CaseRecord]

    def __len__(self) -> int:
        return len(self.cases)

    def split(self, name: str) -> list[CaseRecord]:
        """The cases of split ``name`` ("train" or "test"), in dataset order (may be empty)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}: expected one of {SPLITS}")
        return [c for c in self.cases if c.split == name]

    def case(self, case_id: str) -> CaseRecord:
        """The case with this id."""
        for c in self.cases:
            if c.id == case_id:
                return c
        raise KeyError(f"{self.root}: no case {case_id!r}")

    def attributes_table(self) -> pd.DataFrame:
        """One row per case, indexed by id: the split, then every attribute (missing ones as NaN)."""
        rows = [{"id": c.id, "split": c.split, **c.attributes} for c in self.cases]
        return pd.DataFrame(rows, columns=None if rows else ["id", "split"]).set_index("id")


# ----------------------------------------------------------------------------- reading an index

def read_dataset(root: str | Path, *, verify: Literal["once", "size", "sha256", "none"] = "once") -> DatasetIndex:
    """Detect the layout of ``root`` (MSD or ACDC), list its cases and check their files.

    ``verify="size"``: every listed file (dataset.json, Info.cfg frames, manifest.csv) exists and is
    non-empty; ``"once"`` (the default): also each file's manifest checksum, the first time the
    file is seen with its current size and modification time (remembered in the dataset's
    ``.gen3d-verified.json`` when gen3d wrote the dataset, else for this process), so a corrupted
    file is caught on first use at the cost of one pass; ``"sha256"``: every checksum, every time;
    ``"none"``: no file checks. Raises :class:`DataError` naming the folder or file and the problem.
    """
    if verify not in ("once", "size", "sha256", "none"):
        raise ValueError(f"verify must be 'once', 'size', 'sha256' or 'none', got {verify!r}")
    root = Path(root)
    if not root.exists():
        raise DataError(root, "dataset folder not found")
    if not root.is_dir():
        raise DataError(root, "is a file, expected a dataset folder")

    # 1. which layout?
    checksums: dict[Path, str] = {}
    if (root / "dataset.json").is_file():
        index, checksums = _read_msd(root)
    elif patients := _find_acdc_patients(root):
        index = _read_acdc(root, patients)
    else:
        raise DataError(root, _layout_problem(root))

    # 2. are the files there (and unchanged)?
    if verify != "none":
        _verify(index, checksums, check_sums=verify, root=root)
    return index


def _visible(path: Path) -> bool:
    """False for macOS resource forks ("._x.nii.gz"), .DS_Store and other hidden entries."""
    return not path.name.startswith(".")


def _layout_problem(root: Path) -> str:
    """Say which layouts were expected and what the folder holds instead."""
    entries = sorted(p for p in root.iterdir() if _visible(p))
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:8])
    found = "an empty folder" if not entries else shown + (f" ... ({len(entries)} entries)" if len(entries) > 8 else "")
    text = ("not a dataset folder in a layout I know. Expected MSD (dataset.json with imagesTr/, labelsTr/ ...) "
            f"or ACDC (patientNNN/ folders with Info.cfg, possibly under training/ and testing/); found {found}")
    nested = [p for p in entries if p.is_dir() and ((p / "dataset.json").is_file() or _find_acdc_patients(p))]
    if nested:
        text += f". A dataset is one level down: pass {nested[0]}"
    elif (root / "imagesTr").is_dir():
        text += ". There is an imagesTr/ folder but no dataset.json: the MSD layout needs it to list the cases"
    return text


def _parse_value(text: str) -> Any:
    """A CSV / Info.cfg value as Python: '' -> None, 'True'/'False' -> bool, '3' -> 3, '0.5' -> 0.5."""
    text = text.strip()
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    if _INT.fullmatch(text):
        return int(text)
    if "_" not in text:  # float() would accept '1_0'
        try:
            return float(text)
        except ValueError:
            pass
    return text


def _case_id(filename: str) -> str:
    """'BRATS_001.nii.gz' -> 'BRATS_001'."""
    for suffix in (".nii.gz", ".nii"):
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return filename


# MSD ---------------------------------------------------------------------------------------------

def _int_keyed(mapping: Any, what: str, source: Path) -> dict[int, str]:
    """dataset.json's {"0": "background", ...} as {0: "background", ...}."""
    if not isinstance(mapping, dict):
        raise DataError(source, f"'{what}' must be an object like {{\"0\": \"background\"}}, "
                                f"got {type(mapping).__name__}")
    out = {}
    for key, value in mapping.items():
        if not _INT.fullmatch(str(key).strip()):
            raise DataError(source, f"'{what}' key {key!r} is not an integer")
        out[int(key)] = str(value)
    return dict(sorted(out.items()))


def _msd_record(root: Path, entry: Any, split: str, where: str, source: Path) -> CaseRecord | None:
    """One "training"/"test" entry: real MSD test entries are plain strings, ours are objects."""
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        raise DataError(source, f"{where} must be a path or an object with an 'image' path, got {entry!r}")
    if Path(entry["image"]).name.startswith("._"):
        return None  # macOS resource-fork junk that some archives carry along
    files = {}
    for key, rel in entry.items():
        if not isinstance(rel, str):
            raise DataError(source, f"{where}: '{key}' must be a path string, got {rel!r}")
        files[key] = root / rel
    # label maps live in labelsTr/ or labelsTs/ (MSD's "label", our extras such as "es")
    label_keys = tuple(k for k, p in files.items() if k == "label" or p.parent.name.startswith("labels"))
    return CaseRecord(id=_case_id(files["image"].name), split=split, files=files, label_keys=label_keys)


def _read_manifest(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(path, f"not a readable CSV file ({err})") from err
    missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}: a manifest has "
                              f"{', '.join(MANIFEST_COLUMNS)}, then the case attributes")
    return rows


def _read_msd(root: Path) -> tuple[DatasetIndex, dict[Path, str]]:
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(meta_path, f"not valid JSON ({err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list):
        raise DataError(meta_path, "has no 'training' list: an MSD dataset.json lists its cases "
                                   "under 'training' (and 'test')")
    labels = _int_keyed(meta.get("labels", {}), "labels", meta_path)
    modality = _int_keyed(meta.get("modality", {}), "modality", meta_path)

    # 1. the cases, from dataset.json
    cases: list[CaseRecord] = []
    for split, list_name in (("train", "training"), ("test", "test")):
        entries = meta.get(list_name, [])
        if not isinstance(entries, list):
            raise DataError(meta_path, f"'{list_name}' must be a list, got {type(entries).__name__}")
        for n, entry in enumerate(entries):
            record = _msd_record(root, entry, split, f"'{list_name}' entry {n}", meta_path)
            if record is not None:
                record.labels = labels
                cases.append(record)
    seen: set[str] = set()
    for c in cases:
        if c.id in seen:
            raise DataError(meta_path, f"case id {c.id!r} is listed twice")
        seen.add(c.id)

    # 2. attributes and checksums, from manifest.csv (ours; real MSD has none)
    checksums: dict[Path, str] = {}
    manifest = root / "manifest.csv"
    if manifest.is_file():
        by_id = {c.id: c for c in cases}
        for row in _read_manifest(manifest):
            checksums[root / row["path"]] = row["sha256"].strip().lower()
            case = by_id.get(row["id"])
            if case is not None and not case.attributes:
                case.attributes = {k: _parse_value(v or "") for k, v in row.items()
                                   if k not in MANIFEST_COLUMNS and k is not None}

    index = DatasetIndex(root=root, layout="msd", name=str(meta.get("name", root.name)), labels=labels,
                         modality=modality, cases=cases)
    return index, checksums


# ACDC --------------------------------------------------------------------------------------------

def _find_acdc_patients(root: Path) -> list[tuple[Path, str]]:
    """patientNNN folders directly under root, or under training/ and testing/ (also in database/)."""
    found = []
    for base in (root, root / "database"):
        for folder, split in ((base, "train"), (base / "training", "train"), (base / "testing", "test")):
            if folder.is_dir():
                found += [(p, split) for p in sorted(folder.iterdir())
                          if p.is_dir() and _PATIENT_DIR.fullmatch(p.name)]
    return found


def _read_info_cfg(path: Path) -> dict[str, Any]:
    """Info.cfg ("ED: 1", "ES: 12", "Group: DCM", ...) as attributes with 0-based frame indices."""
    if not path.is_file():
        raise DataError(path, "missing: every ACDC patient folder needs an Info.cfg giving ED and ES")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise DataError(path, f"not a text file ({err})") from err
    values: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        if line.strip():
            key, sep, value = line.partition(":")
            if not sep:
                raise DataError(path, f"line {n} is not 'Key: value': {line!r}")
            values[key.strip()] = value.strip()
    missing = [k for k in ("ED", "ES") if k not in values]
    if missing:
        raise DataError(path, f"missing {' and '.join(missing)}: Info.cfg must give the end-diastole (ED) "
                              f"and end-systole (ES) frame numbers; found keys {sorted(values)}")
    attributes: dict[str, Any] = {}
    for key in ("ED", "ES"):
        frame = _parse_value(values.pop(key))
        if not isinstance(frame, int) or isinstance(frame, bool) or frame < 1:
            raise DataError(path, f"{key} must be a frame number >= 1, got {frame!r}")
        attributes[f"{key.lower()}_frame"] = frame - 1  # ACDC counts frames from 1; arrays from 0
    for key, value in values.items():
        attributes[_ACDC_ATTRIBUTE_NAMES.get(key, key.lower())] = _parse_value(value)
    return attributes


def _nifti_file(folder: Path, stem: str) -> Path:
    """folder/stem.nii.gz, or stem.nii when only that exists."""
    plain = folder / f"{stem}.nii"
    return plain if plain.is_file() and not (folder / f"{stem}.nii.gz").exists() else folder / f"{stem}.nii.gz"


def _read_acdc(root: Path, patients: list[tuple[Path, str]]) -> DatasetIndex:
    cases = []
    for folder, split in patients:
        pid = folder.name
        attributes = _read_info_cfg(folder / "Info.cfg")
        files = {"image": _nifti_file(folder, f"{pid}_4d")}
        for phase in ("ed", "es"):
            files[f"{phase}_image"] = _nifti_file(folder, f"{pid}_frame{attributes[f'{phase}_frame'] + 1:02d}")
        gts = {f"{phase}_label": _nifti_file(folder, files[f"{phase}_image"].name.split(".nii")[0] + "_gt")
               for phase in ("ed", "es")}
        if any(p.exists() for p in gts.values()):  # unlabelled cases (old test release) have no _gt files
            files.update(gts)
        cases.append(CaseRecord(id=pid, split=split, files=files, attributes=attributes,
                                label_keys=tuple(k for k in files if k.endswith("_label")), labels=ACDC_LABELS))
    return DatasetIndex(root=root, layout="acdc", name="ACDC", labels=dict(ACDC_LABELS),
                        modality={0: "cine-MRI"}, cases=cases)


# checks ------------------------------------------------------------------------------------------

VERIFIED_FILE = ".gen3d-verified.json"
_verified: dict[str, list] = {}      # path -> [size, mtime_ns, sha256] checked in this process


def _unchanged_since_verified(path: Path, expected: str, known: dict[str, list]) -> bool:
    st = path.stat()
    return known.get(str(path)) == [st.st_size, st.st_mtime_ns, expected]


def _verify(index: DatasetIndex, checksums: dict[Path, str], check_sums: str, root: Path) -> None:
    source = "dataset.json" if index.layout == "msd" else "Info.cfg (its ED/ES frames)"
    for case in index.cases:
        for key, path in case.files.items():
            if not path.is_file():
                raise DataError(path, f"file not found; {source} lists it as {key!r} of case {case.id}")
            if path.stat().st_size == 0:
                raise DataError(path, f"empty file (0 bytes), {key!r} of case {case.id}")
    from . import is_ours

    cache = root / VERIFIED_FILE
    known = dict(_verified)
    if check_sums == "once" and cache.is_file():
        try:
            known.update({str(root / k): v for k, v in json.loads(cache.read_text()).items()})
        except (OSError, ValueError, AttributeError):
            pass                                          # an unreadable cache: verify again
    fresh = 0
    for path, expected in checksums.items():
        if not path.is_file():
            raise DataError(path, "file not found; manifest.csv lists it")
        if path.stat().st_size == 0:
            raise DataError(path, "empty file (0 bytes); manifest.csv lists it")
        if check_sums == "size" or (check_sums == "once" and _unchanged_since_verified(path, expected, known)):
            continue
        if (actual := sha256(path)) != expected:
            raise DataError(path, f"checksum mismatch: manifest says {expected[:16]}..., file has {actual[:16]}... "
                                  "(the file changed after the dataset was written, or the copy is damaged)")
        st = path.stat()
        _verified[str(path)] = known[str(path)] = [st.st_size, st.st_mtime_ns, expected]
        fresh += 1
    if check_sums == "once" and fresh and is_ours(root):
        try:                                              # remembered beside the dataset gen3d wrote
            mine = {Path(k).relative_to(root).as_posix(): v for k, v in known.items() if root in Path(k).parents}
            tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(mine))
            os.replace(tmp, cache)
        except OSError:
            pass                                          # read-only: this process remembers


def _check_label(volume: Volume, labels: dict[int, str]) -> Volume:
    """A label map must hold integers from the dataset's label set; returned as int64."""
    data = volume.data
    if not np.issubdtype(data.dtype, np.integer):
        fractional = data[data != np.round(data)]
        if fractional.size:
            raise DataError(volume.path, f"label map has {fractional.size} non-integer values "
                                         f"(e.g. {fractional.flat[0]:g}): is it an image in the labels folder?")
    data = data.astype(np.int64)
    values = np.unique(data)
    if labels:
        unexpected = sorted(set(values.tolist()) - set(labels))
        if unexpected:
            count = int(np.isin(data, unexpected).sum())
            raise DataError(volume.path, f"unexpected label values {unexpected} in {count} voxels; "
                                         f"the dataset's labels are {labels}")
    return Volume(data=data, affine=volume.affine, path=volume.path)


def load_case(record: CaseRecord, keys: Sequence[str] | None = None) -> dict[str, Volume]:
    """Read the volumes ``keys`` (default: all) of a case, with checks.

    Images are 3D or 4D (X, Y, Z[, C or T]) float32; label maps are 3D int64 whose values must be in
    ``record.labels``; all volumes of the case must share the spatial shape (X, Y, Z).
    """
    keys = list(record.files) if keys is None else list(keys)
    absent = [k for k in keys if k not in record.files]
    if absent:
        raise DataError(None, f"case {record.id} ({record.split}) has no {', '.join(map(repr, absent))} "
                              f"volume; it has {', '.join(record.files)}")
    volumes: dict[str, Volume] = {}
    for key in keys:
        if key in record.label_keys:
            volumes[key] = _check_label(load_nifti(record.files[key], ndim=3, dtype=None), record.labels)
        else:
            volumes[key] = load_nifti(record.files[key], ndim=(3, 4), dtype=np.float32)
    if volumes:
        ref_key, ref = next(iter(volumes.items()))
        for key, vol in volumes.items():
            if vol.shape[:3] != ref.shape[:3]:
                raise DataError(vol.path, f"spatial shape {vol.shape[:3]} differs from {ref.shape[:3]} "
                                          f"of {ref_key!r} ({ref.path.name}) in case {record.id}")
    return volumes


# ----------------------------------------------------------------------------- torch datasets

def _attribute_value(value: Any) -> Any:
    """Numbers -> 0-d tensors (bool, int64, float32; a missing value -> NaN); text stays text."""
    if value is None:
        return torch.tensor(float("nan"))
    if isinstance(value, (bool, np.bool_)):
        return torch.tensor(bool(value))
    if isinstance(value, (int, np.integer)):
        return torch.tensor(int(value), dtype=torch.int64)
    if isinstance(value, (float, np.floating)):
        return torch.tensor(float(value), dtype=torch.float32)
    return value


class VolumeDataset(torch.utils.data.Dataset):
    """Cases of one split as dicts of tensors, kept in memory after the first read (``cache``).

    Each item: ``"id"``; every key of ``keys`` — images ``(C, D, H, W)`` float32 (a channels-last 4D
    NIfTI becomes channels-first), label maps ``(1, D, H, W)`` int64 —; and the case attributes
    (numbers as 0-d tensors, text as str). ``channels`` picks channels of 4D images by index or by
    modality name (``("T1", "FLAIR")``); ``frame`` picks one frame of a 4D cine as the single channel
    (an index, or ``"ed"`` / ``"es"`` for the case's ``ed_frame`` / ``es_frame``). ``size`` resamples
    to ``size``³ (or a (D, H, W) tuple): trilinear for images, nearest for labels. ``transform``
    runs on every item after the cache, e.g. for augmentation. Items from the cache share their
    tensors: copy before changing them in place.
    """

    def __init__(self, root_or_index: str | Path | DatasetIndex, split: str = "train",
                 keys: Sequence[str] = ("image", "label"), channels: int | str | Sequence[int | str] | None = None,
                 frame: int | str | None = None, size: int | Sequence[int] | None = None, cache: bool = True,
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        self.index = root_or_index if isinstance(root_or_index, DatasetIndex) else read_dataset(root_or_index)
        self.records = self.index.split(split)
        self.keys = tuple(keys)
        if not self.records:
            counts = ", ".join(f"{s}: {len(self.index.split(s))}" for s in SPLITS)
            raise DataError(self.index.root, f"no {split!r} cases ({counts})")
        for record in self.records:
            absent = [k for k in self.keys if k not in record.files]
            if absent:
                raise DataError(self.index.root, f"{split} case {record.id} has no {', '.join(map(repr, absent))} "
                                                 f"volume (it has {', '.join(record.files)}); choose other keys=")
            clash = set(record.attributes) & {"id", *self.keys}
            if clash:
                raise DataError(self.index.root, f"case {record.id}: attribute(s) {sorted(clash)} clash with item keys")
        if channels is not None and frame is not None:
            raise ValueError("give channels or frame, not both")
        self.channels = None if channels is None else self._channel_indices(channels)
        self.frame = frame
        self.size = None if size is None else ((size,) * 3 if isinstance(size, int) else tuple(size))
        if self.size is not None and (len(self.size) != 3 or min(self.size) < 1):
            raise ValueError(f"size must be an int or three positive ints, got {size!r}")
        self.cache = cache
        self.transform = transform
        self._items: dict[int, dict[str, Any]] = {}

    def _channel_indices(self, channels: int | str | Sequence[int | str]) -> list[int]:
        wanted = [channels] if isinstance(channels, (int, str)) else list(channels)
        by_name = {name.lower(): i for i, name in self.index.modality.items()}
        out = []
        for c in wanted:
            if isinstance(c, str):
                if c.lower() not in by_name:
                    raise ValueError(f"unknown channel {c!r}: this dataset's channels are {self.index.modality}")
                c = by_name[c.lower()]
            out.append(int(c))
        return out

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = range(len(self.records))[i]  # negative indices; IndexError past the end
        item = self._items.get(i)
        if item is None:
            item = self._load(self.records[i])
            if self.cache:
                self._items[i] = item
        item = dict(item)
        return self.transform(item) if self.transform is not None else item

    def _load(self, record: CaseRecord) -> dict[str, Any]:
        item: dict[str, Any] = {"id": record.id}
        for key, vol in load_case(record, self.keys).items():
            if key in record.label_keys:
                x = torch.from_numpy(vol.data)[None]                      # (1, D, H, W) int64
            else:
                x = torch.from_numpy(self._image_channels(vol, record))  # (C, D, H, W) float32
            if self.size is not None and tuple(x.shape[1:]) != self.size:
                x = self._resize(x, is_label=key in record.label_keys)
            item[key] = x
        item.update({k: _attribute_value(v) for k, v in record.attributes.items()})
        return item

    def _image_channels(self, vol: Volume, record: CaseRecord) -> np.ndarray:
        """(X, Y, Z) -> (1, D, H, W); (X, Y, Z, C) -> (C, D, H, W), then the chosen channels / frame."""
        x = vol.data[None] if vol.data.ndim == 3 else np.moveaxis(vol.data, -1, 0)  # (C, D, H, W)
        if self.frame is not None and vol.data.ndim == 4:
            t = self._frame_index(record)
            if not -x.shape[0] <= t < x.shape[0]:
                raise DataError(vol.path, f"frame {t} is out of range: the volume has {x.shape[0]} frames")
            x = x[[t]]
        elif self.channels is not None:
            bad = [c for c in self.channels if not -x.shape[0] <= c < x.shape[0]]
            if bad:
                raise DataError(vol.path, f"channel(s) {bad} out of range: the volume has {x.shape[0]} channel(s)")
            x = x[self.channels]
        return np.ascontiguousarray(x, dtype=np.float32)

    def _frame_index(self, record: CaseRecord) -> int:
        if not isinstance(self.frame, str):
            return int(self.frame)
        name = f"{self.frame.lower()}_frame"
        if not isinstance(record.attributes.get(name), int):
            raise DataError(None, f"case {record.id}: frame={self.frame!r} needs an integer attribute {name!r}, "
                                  f"which it does not have (attributes: {sorted(record.attributes)})")
        return record.attributes[name]

    def _resize(self, x: torch.Tensor, is_label: bool) -> torch.Tensor:
        """(C, D, H, W) -> (C, *size): trilinear for intensities, nearest for label maps."""
        if is_label:
            return F.interpolate(x[None].float(), size=self.size, mode="nearest-exact")[0].long()
        return F.interpolate(x[None], size=self.size, mode="trilinear", align_corners=False)[0]


# ----------------------------------------------------------------------------- cases as one tensor

def stack_cases(records: Sequence[CaseRecord], channels: Sequence[int] | None = None, image_key: str = "image",
                label_key: str = "label") -> tuple[torch.Tensor, torch.Tensor]:
    """The images (N, C, X, Y, Z) float32 and labels (N, 1, X, Y, Z) int64 of some cases.

    ``records`` come from ``read_dataset(...).split(...)``; ``channels`` picks channels of 4D
    images (all if None); ``image_key`` picks another image of the case (e.g. ``"lowdose"``).
    Every file is read and checked by :func:`load_case`.
    """
    images, labels = [], []
    for record in records:
        case = load_case(record, [image_key, label_key])
        x = case[image_key].data
        x = x[..., None] if x.ndim == 3 else x                              # (X, Y, Z, C)
        x = x[..., list(channels)] if channels is not None else x
        images.append(torch.from_numpy(np.moveaxis(x, -1, 0).copy()))       # (C, X, Y, Z)
        labels.append(torch.from_numpy(case[label_key].data)[None])        # (1, X, Y, Z)
    if not images:
        raise ValueError("records: no cases to stack")
    return torch.stack(images), torch.stack(labels)


def stack_cine_phases(records: Sequence[CaseRecord], z: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """End-diastole and end-systole of cine cases: images (2N, 1, X, Y, Z'), labels (2N, 1, X, Y, Z').

    Each case gives its ED frame with ``label`` and its ES frame with ``es`` (frames from the
    ``ed_frame`` / ``es_frame`` attributes); ``z`` keeps a range of slices. Only the two frames
    are decompressed from the 4D file, not the whole cycle. Returns the phase of each item too.
    """
    import nibabel as nib

    images, labels, phases = [], [], []
    for record in records:
        cine = nib.load(str(record.files["image"])).dataobj                # (X, Y, Z, T), read lazily
        if len(cine.shape) != 4:
            raise DataError(record.files["image"], f"expected a 4D cine (X, Y, Z, T), got shape {cine.shape}")
        case = load_case(record, ["label", "es"])
        for phase, key in (("ED", "label"), ("ES", "es")):
            t = int(record.attributes[f"{phase.lower()}_frame"])
            frame = np.asarray(cine[..., t], dtype=np.float32)
            if not np.isfinite(frame).all():
                raise DataError(record.files["image"], f"frame {t} ({phase}) contains NaN or infinite values")
            images.append(torch.from_numpy(frame[..., z].copy())[None])     # (1, X, Y, Z')
            labels.append(torch.from_numpy(case[key].data[..., z].copy())[None])
            phases.append(phase)
    if not images:
        raise ValueError("records: no cases to stack")
    return torch.stack(images), torch.stack(labels), phases
