"""The ``gen3d`` command: make the datasets, run a chapter, build the book, print the report.

    gen3d data brain|heart|all [--n 64] [--size 64] [--frames 16] [--seed 0] [--out PATH]
    gen3d yardstick [--data PATH]
    gen3d hearts [--data PATH]
    gen3d segment IN.nii.gz OUT.nii.gz [--model PATH] [--mask MASK] [--force]
    gen3d chapters
    gen3d run 1 [--profile cpu]
    gen3d book [--profile cpu] [--only 1,2] [--no-build | --no-run]
    gen3d report [--json]

Every user error (a bad argument, a missing or foreign folder, a corrupt file) is one line on
stderr and exit status 2; ``gen3d --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from . import book

DATASETS = ("brain", "heart")


def _make_dataset(kind: str, out: Path, args: argparse.Namespace) -> None:
    """Write one phantom dataset into ``out`` (atomically: see :func:`data.write_dataset`)."""
    from .data import is_complete, check_params, write_dataset

    params = dict(n=args.n, size=args.size, seed=args.seed) | (dict(frames=args.frames) if kind == "heart" else {})
    check_params(kind, params)                      # before anything is looked at or written
    if not args.force and out.is_dir() and is_complete(out, args.n):
        print(f"{kind}: {out} exists, skipping (--force to remake it)")
        return
    start = time.perf_counter()
    write_dataset(kind, out, force=args.force, **params)
    print(f"{kind}: wrote {out} ({args.n} subjects, {args.size}^3, "
          f"{time.perf_counter() - start:.1f} s)")


def cmd_data(args: argparse.Namespace) -> int:
    kinds = DATASETS if args.dataset == "all" else (args.dataset,)
    paths = book.BookPaths.at(args.root)
    for kind in kinds:
        if args.out is None:
            out = paths.data / kind
        elif args.dataset == "all":
            out = Path(args.out) / kind          # --out is the parent folder for 'all'
        else:
            out = Path(args.out)
        _make_dataset(kind, out, args)
    return 0


def _dataset_folder(args: argparse.Namespace, kind: str) -> Path:
    """``--data``, or the book's ``data/<kind>``; one clear line if no dataset of that kind is there."""
    folder = Path(args.data) if args.data else book.BookPaths.at(args.root).data / kind
    if not (folder / "dataset.json").is_file():
        raise FileNotFoundError(f"{folder}: no {kind} dataset here; make it first with `gen3d data {kind}`")
    return folder


def cmd_yardstick(args: argparse.Namespace) -> int:
    """Train (or load from the cache) the yardstick encoder every synthesis chapter shares."""
    from .tasks import yardstick

    folder = _dataset_folder(args, "brain")
    enc = yardstick.load_or_train_encoder(folder)       # the defaults every chapter uses
    t = enc.training
    how = "loaded from the cache" if enc.cached else \
        f"cohorts made in {t['cohort_seconds']} s, trained in {t['seconds']} s"
    print(f"yardstick encoder: {enc.path} ({t['steps']} steps on {t['cohort']} new brains; {how})")
    print(yardstick.heads_table(enc).round(3).to_string())
    from .tasks.sensitivity import CHECK_MODES_N, check_modes
    check_modes(enc, folder, CHECK_MODES_N)               # chapter 7's dropped-mode brains, made once
    return 0


def cmd_hearts(args: argparse.Namespace) -> int:
    """Make (once) the new phantom hearts chapter 7 draws beside the heart dataset."""
    from .tasks import heart_motion

    folder = _dataset_folder(args, "heart")
    for which, (_, n) in heart_motion.COHORTS.items():
        hearts = heart_motion.new_hearts(folder, which, n)
        print(f"{which} hearts: {len(hearts)} new hearts of {folder.name}, {tuple(hearts.ed.shape[2:])} label fractions")
    return 0


def _nifti_stem(path: Path) -> str:
    name = path.name
    return name[:-7] if name.endswith(".nii.gz") else name[:-4] if name.endswith(".nii") else path.stem


def cmd_segment(args: argparse.Namespace) -> int:
    """Label a T1 scan (CSF, GM, WM) on its own grid; a label table with volumes in mL beside it."""
    import numpy as np

    from .tasks.segment import load_segmenter, predict

    src, out = Path(args.input), Path(args.output)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{out}: the output must be a NIfTI file ending in .nii or .nii.gz")
    table = out.with_name(_nifti_stem(out) + ".tsv")
    if out.resolve() == src.resolve() or (args.mask and out.resolve() == Path(args.mask).resolve()):
        raise ValueError(f"{out}: the output would overwrite an input")
    for path in (out, table):
        if path.exists() and not args.force:
            raise FileExistsError(f"{path}: exists; choose another output or pass --force to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such folder for the output")
    start = time.perf_counter()
    labels = predict(src, model_path=args.model, mask=args.mask)
    _, cfg = load_segmenter(args.model)
    seconds = time.perf_counter() - start
    voxel_ml = abs(float(np.linalg.det(labels.affine[:3, :3]))) / 1000.0
    counts = np.bincount(np.asarray(labels.dataobj).ravel(), minlength=len(cfg.labels))
    labels.to_filename(out)
    rows = ["index\tname\tvolume_ml"] + [f"{k}\t{name}\t{counts[k] * voxel_ml:.1f}"
                                          for k, name in enumerate(cfg.labels) if k > 0]
    table.write_text("\n".join(rows) + "\n")
    print(f"{out}: labels on the grid of {src} ({'x'.join(map(str, labels.shape))}), {seconds:.1f} s")
    print(f"{table}: the label table")
    for k, name in enumerate(cfg.labels):
        if k > 0:
            print(f"  {k} {name:<4} {counts[k] * voxel_ml:8.1f} mL")
    return 0


def cmd_chapters(args: argparse.Namespace) -> int:
    for chapter in book.chapters(book.BookPaths.at(args.root), missing_ok=True):
        state = "" if chapter.path.is_file() else "  (not written yet)"
        print(f"{chapter.number:>3}  {chapter.docname:<28} {chapter.title}{state}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    paths = book.BookPaths.at(args.root)
    rows = book.run_one(args.chapter, profile=args.profile, paths=paths)      # every page of the chapter
    print()
    print(book.format_report({"chapters": [asdict(row) for row in rows]}))
    for row in rows:
        if row.metrics:
            print(f"metrics ({row.chapter}): " + ", ".join(f"{k}={book.format_value(v)}" for k, v in row.metrics.items()))
        print(f"executed notebook: {row.executed}")
    return 0 if all(row.ok for row in rows) else 1


def cmd_book(args: argparse.Namespace) -> int:
    return book.build_book(book.BookPaths.at(args.root), profile=args.profile, only=args.only,
                           run=not args.no_run, build=not args.no_build)


def cmd_report(args: argparse.Namespace) -> int:
    paths = book.BookPaths.at(args.root)
    report = book.load_report(paths)
    if report is None:
        print(f"no report yet ({paths.report_json}); run `gen3d book` or `make book` first",
              file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else book.format_report(report))
    rows = book.rows_of(report)
    return 0 if all(r.ok or r.status == "not run" for r in rows) else 1


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="gen3d", description="gen3d: make the datasets, run a chapter, build the book, "
                                  "print the report.")
    top.add_argument("--root", default=None,
                     help="the book's folder (the one with _toc.yml); found automatically")
    top.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = top.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make the synthetic brain and heart datasets")
    data.add_argument("dataset", choices=(*DATASETS, "all"))
    data.add_argument("--n", type=int, default=64, help="subjects (default 64)")
    data.add_argument("--size", type=int, default=64, help="edge of the volume (default 64)")
    data.add_argument("--frames", type=int, default=16, help="heart: frames per cycle (16)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--out", default=None,
                      help="dataset folder (for 'all': the parent folder); default data/<name>")
    data.add_argument("--force", action="store_true", help="remake an existing dataset")
    data.set_defaults(func=cmd_data)

    yard = sub.add_parser("yardstick", help="train (once) the encoder that scores generated brains")
    yard.add_argument("--data", default=None, help="brain dataset folder (default data/brain)")
    yard.set_defaults(func=cmd_yardstick)

    hearts = sub.add_parser("hearts", help="make (once) the new phantom hearts chapter 7 draws beside the dataset")
    hearts.add_argument("--data", default=None, help="heart dataset folder (default data/heart)")
    hearts.set_defaults(func=cmd_hearts)

    seg = sub.add_parser("segment", help="label a T1 scan (CSF, GM, WM) with the book's segmenter",
                         description="Label a T1-weighted brain scan: 1 CSF, 2 GM, 3 WM, written on the input's "
                                     "own grid, with a label table (OUT.tsv: index, name, volume in mL) beside it.")
    seg.add_argument("input", help="a T1 scan, .nii or .nii.gz, any orientation and voxel size")
    seg.add_argument("output", help="where to write the labels (.nii or .nii.gz)")
    seg.add_argument("--model", default=None, help="a segmenter saved by save_segmenter (default data/models/brain_seg.pt)")
    seg.add_argument("--mask", default=None, help="a brain mask on the input's grid; needed for a scan with skull")
    seg.add_argument("--force", action="store_true", help="replace OUT and its table if they exist")
    seg.set_defaults(func=cmd_segment)

    chapters = sub.add_parser("chapters", help="list the chapters of the toc")
    chapters.set_defaults(func=cmd_chapters)

    run = sub.add_parser("run", help="execute one chapter and print its result")
    run.add_argument("chapter", help="number (1) or name (ch01_volumes)")
    run.add_argument("--profile", choices=book.PROFILES, default=None,
                     help="default: gpu with CUDA, else cpu")
    run.set_defaults(func=cmd_run)

    build = sub.add_parser("book", help="run every chapter and build the site")
    build.add_argument("--profile", choices=book.PROFILES, default=None,
                       help="default: gpu with CUDA, else cpu")
    build.add_argument("--only", default=None, help="comma-separated chapters, e.g. 1,2")
    build.add_argument("--no-build", action="store_true", help="run chapters, skip the site")
    build.add_argument("--no-run", action="store_true",
                       help="rebuild the site from the last executed notebooks")
    build.set_defaults(func=cmd_book)

    report = sub.add_parser("report", help="print the last run report")
    report.add_argument("--json", action="store_true")
    report.set_defaults(func=cmd_report)
    return top


def error_line(exc: BaseException) -> str:
    """One line that says what went wrong and where, for any error a user can cause."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror}" if where else exc.strerror
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.root is not None and not (Path(args.root) / "_toc.yml").is_file():
            raise FileNotFoundError(f"--root {args.root}: no _toc.yml there; give the book's folder")
        return args.func(args)
    except (ValueError, KeyError, OSError) as exc:   # DataError is a ValueError
        if args.debug:
            raise
        print(f"gen3d: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gen3d: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
