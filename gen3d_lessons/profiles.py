"""Profiles: how one notebook runs in seconds, in minutes on two CPU cores, or longer on a GPU.

Every chapter starts with a tagged ``parameters`` cell, ``profile = None``, that papermill
overwrites with ``"smoke"``, ``"cpu"`` or ``"gpu"``. The chapter then names its sizes and
budgets once per profile and gets back one frozen :class:`Run`::

    run = setup(profile, seed=0,
                smoke=dict(size=16, n_train=4, budget_s=5, max_steps=3),
                cpu=dict(size=32, n_train=48, budget_s=120, max_steps=3000, dice_min=0.85),
                gpu=dict(size=64, n_train=48, budget_s=600, max_steps=20000, dice_min=0.9))
    run.size, run.device, run.checks_thresholds

Settings shared by every profile go in ``common``; a setting whose value is a dict is a *group*
(one per model, say), read as ``run.vae.steps``, and a profile's group is merged key by key over
the common one, so each profile names only what differs::

    run = setup(profile, seed=0,
                common=dict(vae=dict(lr=1e-3, batch=4), size=32),
                smoke=dict(vae=dict(steps=3), n_train=4),
                cpu=dict(vae=dict(steps=900), n_train=48, gates=dict(ssim=0.0)))
    run.vae.lr, run.vae.steps, run.gates["ssim"]

The three profiles:

- ``smoke``: seconds per chapter, tiny volumes, and no thresholds — it only proves that the
  notebook runs top to bottom (``run.checks_thresholds`` is False).
- ``cpu``: the default without CUDA and what CI runs: small volumes, a few minutes, real
  results checked against thresholds.
- ``gpu``: the default with CUDA: larger volumes and longer training.

``setup`` also seeds every random generator and fixes the number of CPU threads, so that two
runs of a chapter in the same profile tell the same story.

**The dry run.** ``GEN3D_MAX_STEPS=2`` caps every training loop (:func:`~gen3d_lessons.training.fit`)
and every sampling loop at two steps (:func:`step_cap`). A chapter then runs with its profile's
sizes and models in seconds — that is how the ``gpu`` profile's shapes and configs are tested on
a machine without a GPU — and its result cell checks no gate and no goal (a capped run proves
that the code runs, not that it learns).
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

PROFILES = ("smoke", "cpu", "gpu")

# Names that belong to Run itself; a setting with one of these names could never be read
# through ``run.<name>``, so setup() refuses it.
_RUN_FIELDS = ("name", "device", "seed", "threads", "settings", "checks_thresholds", "dry_run", "model_suffix",
               "get", "describe")


# 1. Which profile ----------------------------------------------------------------------------

def pick_profile(requested: str | None = None) -> str:
    """The profile to run in: ``requested``, else env ``GEN3D_PROFILE``, else by hardware.

    Without a request or the environment variable, a machine with CUDA runs ``"gpu"`` and any
    other machine ``"cpu"``; ``"smoke"`` is only ever chosen explicitly.
    """
    source = "profile"
    if requested is None:
        requested = os.environ.get("GEN3D_PROFILE") or None
        source = "GEN3D_PROFILE"
    if requested is None:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if not isinstance(requested, str) or requested.strip().lower() not in PROFILES:
        raise ValueError(f"{source}: unknown profile {requested!r}; expected one of {', '.join(PROFILES)}")
    return requested.strip().lower()


# 2. The dry run's step cap ------------------------------------------------------------------

MAX_STEPS_ENV = "GEN3D_MAX_STEPS"


def _positive_int_env(name: str) -> int | None:
    """The positive integer in environment variable ``name``; None if unset or empty."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {raw!r}")
    return value


def max_steps_cap() -> int | None:
    """The step cap of a dry run (env ``GEN3D_MAX_STEPS``), or None in an ordinary run."""
    return _positive_int_env(MAX_STEPS_ENV)


def step_cap(steps: int) -> int:
    """``steps``, or fewer in a dry run: the number of iterations a loop should really take."""
    cap = max_steps_cap()
    return int(steps) if cap is None else min(int(steps), cap)


# 3. Reproducibility: seeds and threads -------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every GPU).

    Also asks torch for deterministic kernels. ``warn_only=True`` because a few 3D operations
    (e.g. the backward of trilinear upsampling on CUDA) have no deterministic version: they
    warn instead of stopping the chapter.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seed must fit in 32 bits
    torch.manual_seed(seed)       # seeds the CUDA generators too
    # cuBLAS needs this before its first use to be deterministic; harmless on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def pick_threads() -> int:
    """The CPU thread count: env ``GEN3D_THREADS`` if set, else every core of the machine."""
    threads = _positive_int_env("GEN3D_THREADS")
    return max(1, os.cpu_count() or 1) if threads is None else threads


def _pick_device(profile: str) -> torch.device:
    """``cpu`` for smoke and cpu; ``cuda`` for gpu when there is one, else cpu with a warning."""
    if profile != "gpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    warnings.warn("profile 'gpu' was asked for but CUDA is not available: running on the CPU "
                  "(expect the gpu sizes to be slow)", RuntimeWarning, stacklevel=3)
    return torch.device("cpu")


# 4. The run ----------------------------------------------------------------------------------

class Group(dict):
    """A group of settings (one model's, say): a plain dict whose keys also read as attributes,
    ``run.vae.steps`` for ``run.settings["vae"]["steps"]``."""

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"settings group has no {key!r}; available: "
                                 f"{', '.join(map(str, self)) or '(none)'}") from None


def _merged(base: Mapping[str, Any], over: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``base`` updated by ``over``; where both hold a dict under one key, merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def _grouped(value: Any, where: str) -> Any:
    """Every dict in a setting becomes a :class:`Group`; a key that would hide a dict method is refused."""
    if not isinstance(value, Mapping):
        return value
    for key in value:
        if isinstance(key, str) and hasattr(dict, key):
            raise ValueError(f"{where}: setting {key!r} would hide dict.{key}; choose another name")
    return Group({k: _grouped(v, f"{where}.{k}") for k, v in value.items()})


@dataclass(frozen=True)
class Run:
    """Everything a chapter needs to know about how it runs.

    The profile's settings are also readable as attributes: ``run.size`` is
    ``run.settings["size"]``.
    """

    name: str                      # "smoke" | "cpu" | "gpu"
    device: torch.device           # where tensors and models go: never hard-code "cuda"
    seed: int
    threads: int
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def checks_thresholds(self) -> bool:
        """Whether the chapter's result cell checks its gates and goals.

        Not in ``smoke`` nor in a dry run (``GEN3D_MAX_STEPS``): a few steps prove that the code
        runs, not that it learns.
        """
        return self.name != "smoke" and max_steps_cap() is None

    @property
    def dry_run(self) -> bool:
        """A dry run (``GEN3D_MAX_STEPS`` set): every loop is capped, nothing is checked."""
        return max_steps_cap() is not None

    @property
    def model_suffix(self) -> str:
        """What a saved model's file name carries, so that a throw-away model never replaces a
        trained one: ``""`` for a real ``cpu`` or ``gpu`` run, ``"_smoke"``, or ``"_<profile>_dryrun"``.
        ``data_root() / "models" / f"ch04_vae{run.model_suffix}.pt"``."""
        if self.dry_run:
            return f"_{self.name}_dryrun"
        return "_smoke" if self.name == "smoke" else ""

    def __getattr__(self, key: str) -> Any:
        # Only called when normal attribute lookup fails. Guard dunders and "settings" itself,
        # which copy/pickle probe before the instance is filled in.
        if key.startswith("__") or key == "settings":
            raise AttributeError(key)
        settings = self.settings
        if key in settings:
            return settings[key]
        raise AttributeError(f"profile {self.name!r} has no setting {key!r}; "
                             f"available: {', '.join(sorted(settings)) or '(none)'}")

    def get(self, key: str, default: Any = None) -> Any:
        """A setting, or ``default`` if this profile does not define it."""
        return self.settings.get(key, default)

    def describe(self) -> str:
        """One line: profile, device, threads, seed and the settings."""
        parts = [f"profile={self.name}", f"device={self.device}", f"threads={self.threads}", f"seed={self.seed}"]
        parts += [f"{k}={v}" for k, v in self.settings.items()]
        return " ".join(parts)


def setup(profile: str | None = None, *, seed: int = 0,
          common: Mapping[str, Any] | None = None,
          smoke: Mapping[str, Any] | None = None,
          cpu: Mapping[str, Any] | None = None,
          gpu: Mapping[str, Any] | None = None,
          dry: Mapping[str, Any] | None = None,
          verbose: bool = True) -> Run:
    """Pick the profile, seed everything, set the threads, and return the chapter's :class:`Run`.

    ``smoke``, ``cpu`` and ``gpu`` are the settings of each profile (sizes, budgets,
    thresholds); only the chosen profile's settings must be given. ``common`` holds what every
    profile shares: the profile's settings are merged over it, groups (dict values) key by key,
    and every group reads as attributes (:class:`Group`). ``dry`` overrides a few of
    them in a dry run only (``GEN3D_MAX_STEPS``): fewer subjects to make and score, never other
    shapes or models, so that a dry run of the ``gpu`` profile stays a matter of minutes on a CPU.
    Prints one line describing the run unless ``verbose=False``.
    """
    # 1. which profile, and its settings
    name = pick_profile(profile)
    given = {"smoke": smoke, "cpu": cpu, "gpu": gpu, "common": common}
    for key, value in given.items():
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a dict of settings, got {type(value).__name__}")
    chosen = given[name]
    if chosen is None:
        raise ValueError(f"{name}: no settings were given for profile {name!r}; "
                         f"pass {name}=dict(...) to setup()")
    settings = _merged(common or {}, chosen, name)
    if dry is not None and max_steps_cap() is not None:
        unknown = set(dry) - set(settings)
        if unknown:
            raise ValueError(f"dry: {sorted(unknown)} are not settings of profile {name!r}")
        settings = _merged(settings, dry, "dry")
    settings = {key: _grouped(value, f"{name}.{key}") for key, value in settings.items()}
    for key in settings:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"{name}: setting names must be Python identifiers, got {key!r}")
        if key in _RUN_FIELDS:
            raise ValueError(f"{name}: setting {key!r} clashes with Run.{key}; choose another name")

    # 2. seeds, threads, device
    seed_everything(seed)
    threads = pick_threads()
    torch.set_num_threads(threads)
    device = _pick_device(name)

    run = Run(name=name, device=device, seed=int(seed), threads=threads, settings=settings)
    if verbose:
        print(run.describe())
    return run
