"""The dataset writers never lose a user's files, answer bad arguments in one line, and survive a kill.

``gen3d data`` and ``data_scripts/make_*.py`` write through :func:`gen3d_lessons.data.write_dataset`:
``--out`` may be new, empty, or a dataset gen3d wrote; a dataset is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gen3d_lessons import cli
from gen3d_lessons.data import MARKER, DataError, is_ours, write_dataset

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--n", "3", "--size", "16"]


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _left(folder: Path) -> list[str]:
    """What a run left in ``folder``, besides the lock files that serialise writers."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_a_folder_with_someone_elses_files_is_refused_untouched(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "thesis.tex").write_text("\\chapter{Results}")
    (mine / "notes" / "todo.md").write_text("- write")
    before = _tree(mine)
    for force in ([], ["--force"]):
        assert cli.main(["data", "brain", "--out", str(mine), *SMALL, *force]) == 2
        assert "did not write" in _one_line_error(capsys)
    assert _tree(mine) == before
    assert _left(tmp_path) == ["mine"]                                # no partial folder left behind


def test_an_empty_folder_and_our_own_dataset_are_written(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["data", "heart", "--out", str(empty), *SMALL, "--frames", "4"]) == 0
    assert is_ours(empty) and (empty / "dataset.json").is_file() and (empty / MARKER).is_file()
    first = json.loads((empty / "dataset.json").read_text())["numTraining"]
    assert cli.main(["data", "heart", "--out", str(empty), "--n", "5", "--size", "16", "--frames", "4"]) == 0
    assert json.loads((empty / "dataset.json").read_text())["numTraining"] != first      # replaced, it was ours
    assert _left(tmp_path) == ["empty"]


@pytest.mark.parametrize("args, says", [
    (["--n", "0"], "--n"), (["--size", "3"], "--size"), (["--seed", "-1"], "--seed"),
    (["--size", "100000"], "--size"), (["--n", "1000000"], "--n"),
])
def test_bad_arguments_are_one_line_before_any_work(tmp_path, capsys, args, says):
    out = tmp_path / "brain"
    start = time.perf_counter()
    assert cli.main(["data", "brain", "--out", str(out), *SMALL, *args]) == 2
    assert says in _one_line_error(capsys) and time.perf_counter() - start < 5
    assert not out.exists() and _left(tmp_path) == []


def test_frames_and_a_file_as_out(tmp_path, capsys):
    assert cli.main(["data", "heart", "--out", str(tmp_path / "h"), *SMALL, "--frames", "0"]) == 2
    assert "--frames" in _one_line_error(capsys)
    target = tmp_path / "a_file"
    target.write_text("keep me")
    assert cli.main(["data", "brain", "--out", str(target), *SMALL]) == 2
    assert "is a file" in _one_line_error(capsys)
    assert target.read_text() == "keep me" and _left(tmp_path) == ["a_file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_folder_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert cli.main(["data", "brain", "--out", str(locked / "brain"), *SMALL]) == 2
    assert "not writable" in _one_line_error(capsys)


def test_a_missing_root_is_one_line(tmp_path, capsys):
    assert cli.main(["--root", str(tmp_path / "nowhere"), "chapters"]) == 2
    assert "no _toc.yml" in _one_line_error(capsys)


def test_the_scripts_answer_in_one_line_too(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    for script, extra in (("make_brain.py", ["--n", "0"]), ("make_heart.py", ["--frames", "0"]),
                          ("make_brain.py", ["--out", str(mine)])):
        done = subprocess.run([sys.executable, str(REPO / "data_scripts" / script), "--out", str(tmp_path / "d"),
                               *SMALL, *extra], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert (mine / "thesis.tex").read_text() == "x"


def test_a_kill_mid_write_leaves_the_old_dataset_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "brain"
    write_dataset("brain", out, n=2, size=16, seed=0, progress=False)
    before = _tree(out)
    child = subprocess.Popen([sys.executable, str(REPO / "data_scripts" / "make_brain.py"), "--out", str(out),
                              "--n", "40", "--size", "32", "--seed", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    partial = []
    while time.time() < deadline and not any(p.rglob("*.nii.gz") for p in partial):
        time.sleep(0.2)
        partial = list(tmp_path.glob(".brain.partial-*"))
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert partial, "the writer never started a partial folder"
    assert _tree(out) == before                                  # the old dataset, whole and alone
    write_dataset("brain", out, n=2, size=16, seed=0, progress=False)      # complete: kept, and cleans up
    assert _tree(out) == before and _left(tmp_path) == ["brain"]


def test_write_dataset_refuses_before_the_lock(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.txt").write_text("a")
    with pytest.raises(DataError, match="did not write"):
        write_dataset("heart", tmp_path / "x", n=2, size=16, frames=4)
