"""One training loop for every model in the book, and the files it leaves behind.

The loop knows no model. Each family brings a *step function* with one signature,
``step(batch, i, *, <networks>, <optimizers>, <options>) -> dict[str, float]``: it takes one
optimizer step (a GAN's takes two, ``opt_g`` and ``opt_d``) and returns what it measured.
The chapter binds the networks by name with :func:`functools.partial`::

    def vae_step(batch, i, *, model, optimizer, beta=1.0):
        ...                                  # forward, loss, backward, optimizer.step()
        return {"loss": loss.item(), "kl": kl.item()}

    step = partial(vae_step, model=vae, optimizer=opt)
    history = fit(step, loader, max_steps=run.max_steps, budget_s=run.budget_s)

``fit`` stops at ``max_steps``, and only there: the same chapter on a fast machine and on a
slow one trains the same number of steps and prints the same numbers. ``budget_s`` is a *fuse*,
not a stopping rule: a run that has not reached ``max_steps`` when it burns raises
:class:`FuseBlown`, which says how far it got ("reached 251 of 2000 steps in its 45 s fuse"),
instead of quietly returning a less-trained model. In a dry run (env ``GEN3D_MAX_STEPS``, see
:func:`~gen3d_lessons.profiles.step_cap`) ``max_steps`` is capped.

A :class:`Checkpoint` makes a long run resumable: if its file exists, ``fit`` restores the
models, optimizers, step counter, history and random generators from it and carries on.
:func:`save_model` / :func:`load_model` store a finished model with the config that builds it;
:func:`save_checked` / :func:`read_checked` store generated data kept between runs (a cohort, samples).
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import random
import time
import zipfile
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..profiles import step_cap
from ..progress import progress


class FuseBlown(RuntimeError):
    """A training run reached its wall-clock fuse before its step count."""

# 1. What a run measured ----------------------------------------------------------------------

@dataclass
class History:
    """The values a step function returned, one list per key, one entry per step.

    Every list has ``steps`` entries: a key that a step did not return (a GAN generator loss
    logged every fifth step, say) holds NaN at that step, so ``values[key][i]`` is always the
    value at step ``i``.
    """

    steps: int = 0                                           # steps done, all sessions together
    seconds: float = 0.0                                     # training time, all sessions together
    values: dict[str, list[float]] = field(default_factory=dict)
    stopped_by: str = "max_steps"                            # always "max_steps": the fuse raises

    def record(self, measured: Mapping[str, float]) -> None:
        """Append one step's values (keys new to the history are back-filled with NaN)."""
        for key in measured:
            if key not in self.values:
                self.values[key] = [math.nan] * self.steps
        for key, column in self.values.items():
            column.append(float(measured[key]) if key in measured else math.nan)
        self.steps += 1

    def _column(self, key: str) -> np.ndarray:
        if key not in self.values:
            raise KeyError(f"key {key!r} was never recorded; recorded: {', '.join(sorted(self.values)) or '(none)'}")
        return np.asarray(self.values[key], dtype=float)

    def last(self, key: str) -> float:
        """The most recent recorded (non-NaN) value of ``key``; NaN if there is none."""
        column = self._column(key)
        finite = column[~np.isnan(column)]
        return float(finite[-1]) if finite.size else math.nan

    def mean_last(self, key: str, n: int = 10) -> float:
        """Mean of ``key`` over the last ``n`` steps, skipping steps that did not record it.

        A loss is noisy from batch to batch; this is the number to report.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive integer, got {n!r}")
        window = self._column(key)[-n:]
        window = window[~np.isnan(window)]
        return float(window.mean()) if window.size else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only (for JSON, glue, or a checkpoint)."""
        return {"steps": self.steps, "seconds": self.seconds,
                "values": {k: list(v) for k, v in self.values.items()}, "stopped_by": self.stopped_by}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "History":
        """The inverse of :meth:`to_dict`."""
        return cls(steps=int(d["steps"]), seconds=float(d["seconds"]),
                   values={k: [float(x) for x in v] for k, v in d["values"].items()},
                   stopped_by=str(d["stopped_by"]))


# 2. Reading and writing files safely ---------------------------------------------------------

def _config_dict(config: Any, name: str = "config") -> dict | None:
    """A dataclass config becomes a dict (STYLE item 1); a dict stays one; None stays None."""
    if config is None:
        return None
    if is_dataclass(config) and not isinstance(config, type):
        return asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"{name}: expected a dataclass instance or a dict, got {type(config).__name__}")


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file, then rename: a crash mid-write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX and Windows


def _digest(obj: Any) -> str:
    """A sha256 of every tensor and value in a nested structure of dicts, lists and tensors.

    Saved beside the states, it turns a flipped byte in the weights into a clear error on load
    instead of a silently different model.
    """
    h = hashlib.sha256()

    def walk(x: Any, name: str) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}:{x.dtype}:{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, Mapping):
            for key in sorted(x, key=str):
                walk(x[key], f"{name}/{key}")
        elif isinstance(x, (list, tuple)):
            for i, item in enumerate(x):
                walk(item, f"{name}[{i}]")
        else:
            h.update(f"{name}={x!r}".encode())

    walk(obj, "")
    return h.hexdigest()


def _read(path: Path, what: str, checked: str) -> dict:
    """Load a file written by this module, with an error that names the file and the problem.

    ``checked`` is the key whose contents the file's ``sha256`` covers (files written before
    checksums existed have none and are read as they are).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what} file here")
    try:
        # weights_only: tensors and plain Python containers only, never arbitrary code.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError,
            IndexError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as a {what} (corrupt, or not a file gen3d_lessons wrote: "
                         f"{type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a {what} (a dict), found a {type(obj).__name__}")
    if "sha256" in obj and checked in obj and _digest(obj[checked]) != obj["sha256"]:
        raise ValueError(f"{path}: the {what}'s tensors do not match the checksum saved with them "
                         "(the file is corrupt); retrain or restore it")
    return obj


def save_checked(obj: Mapping[str, Any], path: str | Path, checked: str) -> Path:
    """Save a dict of tensors and plain values atomically, with a sha256 of ``obj[checked]``: what a
    cache of generated data (a cohort, saved samples) needs, read back by :func:`read_checked`."""
    if checked not in obj:
        raise ValueError(f"checked: {checked!r} is not a key of the object to save ({', '.join(map(str, obj))})")
    path = Path(path)
    _atomic_save({**obj, "sha256": _digest(obj[checked])}, path)
    return path


def read_checked(path: str | Path, what: str, checked: str) -> dict:
    """Read a file :func:`save_checked` wrote; a missing, unreadable or corrupt file is one error
    line that names it and says which (``what`` names the kind of file)."""
    return _read(Path(path), what, checked)


# 3. Random generators: captured and restored so a resumed run draws what it would have -------

def _rng_state() -> dict:
    # NumPy's state holds an ndarray, which weights_only loading refuses: keep it as a tensor.
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (np_name, torch.from_numpy(np_key.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    random.setstate(state["python"])
    np_name, np_key, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_key.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# 4. Checkpoints --------------------------------------------------------------------------------

class Checkpoint:
    """A resumable snapshot of a training run in one file.

    ``objects`` names everything with a ``state_dict`` that the step function changes:
    networks, optimizers, schedulers (``{"G": gen, "D": critic, "opt_G": ..., "opt_D": ...}``).
    During :func:`fit` it is saved every ``every_steps`` steps and/or every ``every_s``
    seconds, and at the end. The file holds ``{"config", "step", "elapsed_s", "history",
    "states": {name: state_dict}, "rng"}``.

    If ``config`` is given, resuming from a file written with a different config is refused:
    the weights would not mean what the chapter thinks they mean.
    """

    def __init__(self, path: str | Path, objects: Mapping[str, Any], config: Any = None,
                 every_steps: int | None = None, every_s: float | None = 60):
        if not isinstance(objects, Mapping) or not objects:
            raise ValueError("objects: expected a non-empty dict {name: module / optimizer / scheduler}")
        for name, obj in objects.items():
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise TypeError(f"objects[{name!r}]: a {type(obj).__name__} has no state_dict/load_state_dict")
        if every_steps is not None and (not isinstance(every_steps, int) or every_steps < 1):
            raise ValueError(f"every_steps: expected a positive integer or None, got {every_steps!r}")
        if every_s is not None and not every_s > 0:
            raise ValueError(f"every_s: expected a positive number of seconds or None, got {every_s!r}")
        self.path = Path(path)
        self.objects = dict(objects)
        self.config = _config_dict(config)
        self.every_steps = every_steps
        self.every_s = every_s
        self.saved_step: int | None = None      # the step of the last file written or read
        self.loader_state: dict | None = None   # where the loader was, as the last file read says
        self._last_save_t = time.perf_counter()

    def exists(self) -> bool:
        return self.path.is_file()

    def due(self, step: int) -> bool:
        """Whether to save after ``step`` steps, by step count or by time since the last save."""
        by_steps = self.every_steps is not None and step % self.every_steps == 0
        by_time = self.every_s is not None and time.perf_counter() - self._last_save_t >= self.every_s
        return by_steps or by_time

    def save(self, history: History, loader_state: Mapping[str, Any] | None = None) -> None:
        """Write the current states, RNG, history and the loader's place (atomically)."""
        states = {name: obj.state_dict() for name, obj in self.objects.items()}
        _atomic_save({"config": self.config,
                      "step": history.steps,
                      "elapsed_s": history.seconds,
                      "history": history.to_dict(),
                      "states": states,
                      "sha256": _digest(states),
                      "rng": _rng_state(),
                      "loader": None if loader_state is None else dict(loader_state)}, self.path)
        self.saved_step = history.steps
        self._last_save_t = time.perf_counter()

    def load(self) -> History:
        """Restore every object's state and the RNG from the file; return the saved history."""
        ckpt = _read(self.path, "checkpoint", "states")
        missing = {"step", "history", "states", "rng"} - set(ckpt)
        if missing:
            raise ValueError(f"{self.path}: not a training checkpoint (missing {', '.join(sorted(missing))})")
        if self.config is not None and ckpt.get("config") is not None and ckpt["config"] != self.config:
            raise ValueError(f"{self.path}: written with config {ckpt['config']}, but this run's config is "
                             f"{self.config}; delete the file or use another path to start afresh")
        absent = set(self.objects) - set(ckpt["states"])
        if absent:
            raise ValueError(f"{self.path}: holds no state for {', '.join(sorted(absent))} "
                             f"(it has {', '.join(sorted(ckpt['states']))})")
        for name, obj in self.objects.items():
            try:
                obj.load_state_dict(ckpt["states"][name])
            except (RuntimeError, ValueError, KeyError) as e:
                raise ValueError(f"{self.path}: the saved state of {name!r} does not fit this object: {e}") from e
        _set_rng_state(ckpt["rng"])
        self.loader_state = ckpt.get("loader")
        self.saved_step = int(ckpt["step"])
        self._last_save_t = time.perf_counter()
        return History.from_dict(ckpt["history"])


# 5. The loop ---------------------------------------------------------------------------------

def _as_floats(measured: Any, i: int) -> dict[str, float]:
    """The step's dict with every value as a Python float (0-d tensors included)."""
    if not isinstance(measured, Mapping):
        raise TypeError(f"step {i}: the step function must return a dict of floats, got {type(measured).__name__}")
    out = {}
    for key, value in measured.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: a tensor with more than one value
            raise TypeError(f"step {i}: value of {key!r} is not a number ({type(value).__name__}): {e}") from e
    return out


def fit(step: Callable[[Any, int], Mapping[str, float]], loader: Iterable, *, max_steps: int,
        budget_s: float | None = None, checkpoint: Checkpoint | None = None,
        log_every: int = 10, desc: str = "train") -> History:
    """Call ``step(batch, i)`` on batches from ``loader`` until ``max_steps`` steps are done.

    ``loader`` is any iterable (a DataLoader, a list of batches ...); it is iterated again
    when exhausted, so one pass is one epoch. ``i`` counts steps from 0 across resumed
    sessions. Every ``log_every`` steps the progress bar shows the mean of each value over the
    last ``log_every`` steps.

    ``budget_s`` is a fuse: if this session's time passes it before ``max_steps``, ``fit`` saves
    the checkpoint (if any) and raises :class:`FuseBlown`. In a dry run ``max_steps`` is capped
    by ``GEN3D_MAX_STEPS``.

    With a ``checkpoint`` whose file exists, the run resumes from it (states, step counter,
    history, random generators) and the loader's place: the pass is replayed up to the saved
    batch (restoring ``loader.generator`` first, if the loader has one), so a resumed run equals
    the uninterrupted one wherever the checkpoint was taken. The checkpoint is saved
    as it asks and once more at the end.

    Raises ``FloatingPointError`` as soon as a step returns a NaN or infinite value; nothing
    is saved after that, so the last checkpoint still holds the last good state.
    """
    # 1. check the arguments
    if not callable(step):
        raise TypeError(f"step: expected a function step(batch, i) -> dict, got {type(step).__name__}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"max_steps: expected a positive integer, got {max_steps!r}")
    if budget_s is not None and not (isinstance(budget_s, (int, float, np.number)) and budget_s > 0):
        raise ValueError(f"budget_s: expected a positive number of seconds or None, got {budget_s!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, (int, np.integer)) or log_every < 1:
        raise ValueError(f"log_every: expected a positive integer, got {log_every!r}")
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        raise TypeError(f"checkpoint: expected a Checkpoint or None, got {type(checkpoint).__name__}")
    max_steps = step_cap(max_steps)

    # 2. where the loader is: its generator's state at the start of this pass, and the batches
    #    taken since. A checkpoint keeps both, so a resumed run replays the pass up to the same
    #    batch and goes on exactly as the uninterrupted one would (wherever the checkpoint was taken).
    generator = getattr(loader, "generator", None)
    generator = generator if isinstance(generator, torch.Generator) else None
    pass_start = generator.get_state() if generator is not None else None
    position = 0

    def loader_state() -> dict:
        return {"generator": pass_start, "position": position}

    # 3. resume if a checkpoint file is there
    history = History()
    batches = None
    if checkpoint is not None and checkpoint.exists():
        history = checkpoint.load()
        saved = checkpoint.loader_state
        if saved is not None:
            if generator is not None and saved.get("generator") is not None:
                generator.set_state(saved["generator"])
                pass_start = saved["generator"]
            batches, position = iter(loader), int(saved["position"])
            for _ in range(position):                    # replay this pass up to the saved batch
                next(batches)
        print(f"{desc}: resumed from {checkpoint.path} at step {history.steps}")
    prior_s = history.seconds
    history.stopped_by = "max_steps"

    # 4. the loop: fetch a batch, take a step, check, record, maybe save
    t0 = time.perf_counter()
    if batches is None:
        batches = iter(loader)
    bar = progress(total=max_steps, initial=history.steps, desc=desc)
    try:
        while history.steps < max_steps:
            if budget_s is not None and time.perf_counter() - t0 >= budget_s:
                if checkpoint is not None and checkpoint.saved_step != history.steps:
                    checkpoint.save(history, loader_state())
                raise FuseBlown(f"{desc}: reached {history.steps} of {max_steps} steps in its {budget_s:g} s fuse; "
                                "this machine is slower than the profile expects (the step count decides "
                                "the result, the fuse only guards the clock)")
            try:
                batch = next(batches)
            except StopIteration:  # end of an epoch: start the next pass
                pass_start = generator.get_state() if generator is not None else None
                batches, position = iter(loader), 0
                try:
                    batch = next(batches)
                except StopIteration:
                    raise ValueError("loader: yielded no batches") from None
            position += 1

            i = history.steps
            measured = _as_floats(step(batch, i), i)
            for key, value in measured.items():
                if not math.isfinite(value):
                    if checkpoint is None:
                        kept = "no checkpoint was being written"
                    elif checkpoint.saved_step is None:
                        kept = f"no checkpoint had been saved yet to {checkpoint.path}"
                    else:
                        kept = f"the last checkpoint {checkpoint.path} (step {checkpoint.saved_step}) is intact"
                    raise FloatingPointError(f"step {i}: {key} = {value} is not finite; training stopped "
                                             f"({kept}). Try a lower learning rate or gradient clipping.")
            history.record(measured)
            history.seconds = prior_s + time.perf_counter() - t0

            bar.update(1)
            if history.steps % log_every == 0 or history.steps == max_steps:
                # refresh=False: the bar redraws at its own pace (rarely, in static output)
                bar.set_postfix({k: f"{history.mean_last(k, log_every):.4g}" for k in history.values}, refresh=False)
            if checkpoint is not None and checkpoint.due(history.steps):
                checkpoint.save(history, loader_state())
    finally:
        bar.close()

    # 5. final save and a one-line summary
    history.seconds = prior_s + time.perf_counter() - t0
    if checkpoint is not None and checkpoint.saved_step != history.steps:
        checkpoint.save(history, loader_state())
    summary = ", ".join(f"{k} {history.mean_last(k, log_every):.4g}" for k in history.values)
    print(f"{desc}: {history.steps} steps in {history.seconds:.1f} s"
          + (f"; last {log_every}: {summary}" if summary else ""))
    return history


# 6. A finished model and the config that builds it (STYLE item 1) ----------------------------

def save_model(path: str | Path, model: nn.Module, config: Any) -> Path:
    """Save ``{"config": asdict(config), "model": state_dict}`` to ``path`` (atomically).

    ``config`` is the model's config dataclass (or a dict): whoever loads the file can build
    the same network without knowing its hyperparameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    cfg = _config_dict(config)
    if cfg is None:
        raise ValueError("config: a saved model needs the config that builds it, got None")
    path = Path(path)
    weights = model.state_dict()
    _atomic_save({"config": cfg, "model": weights, "sha256": _digest(weights)}, path)
    return path


def load_model(path: str | Path, build: Callable[[dict], nn.Module],
               device: torch.device | str | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_model`: ``build(config_dict)``, then load its weights.

    ``build`` turns the saved config dict into a fresh model, e.g.
    ``lambda c: UNet3D(UNetConfig(**c))``. The model comes back in eval mode, on ``device``
    (CPU if None).
    """
    if not callable(build):
        raise TypeError(f"build: expected a function config -> nn.Module, got {type(build).__name__}")
    path = Path(path)
    saved = _read(path, "model", "model")
    if "config" not in saved or "model" not in saved:
        raise ValueError(f"{path}: not a saved model (expected keys 'config' and 'model', found {sorted(saved)})")
    try:
        model = build(saved["config"])
    except (TypeError, ValueError, KeyError) as e:      # another model's config
        raise ValueError(f"{path}: holds a model whose config does not build this network "
                         f"(config keys: {', '.join(sorted(map(str, saved['config'])))}): {e}") from e
    if not isinstance(model, nn.Module):
        raise TypeError(f"build: returned a {type(model).__name__}, not a torch.nn.Module")
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: the saved weights do not fit the model built from its config: {e}") from e
    if device is not None:
        model.to(device)
    return model.eval()
