"""Profiles: picking one, the Run it gives, seeding and threads."""

import copy
import pickle
import random
import warnings

import numpy as np
import pytest
import torch

from gen3d_lessons import profiles
from gen3d_lessons.profiles import MAX_STEPS_ENV, PROFILES, Run, pick_profile, seed_everything, setup, step_cap

SETTINGS = dict(smoke=dict(size=16, n_train=4, budget_s=5, max_steps=3),
                cpu=dict(size=32, n_train=48, budget_s=120, max_steps=3000, dice_min=0.85),
                gpu=dict(size=64, n_train=48, budget_s=600, max_steps=20000, dice_min=0.9))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("GEN3D_PROFILE", raising=False)
    monkeypatch.delenv("GEN3D_THREADS", raising=False)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def test_profiles_names():
    assert PROFILES == ("smoke", "cpu", "gpu")


def test_pick_profile_order(monkeypatch):
    assert pick_profile("smoke") == "smoke"
    assert pick_profile("CPU") == "cpu"
    monkeypatch.setenv("GEN3D_PROFILE", "smoke")
    assert pick_profile() == "smoke"
    assert pick_profile("cpu") == "cpu"  # an explicit request beats the environment
    monkeypatch.delenv("GEN3D_PROFILE")
    assert pick_profile() == ("gpu" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_profile() == "gpu"


def test_pick_profile_unknown(monkeypatch):
    with pytest.raises(ValueError, match="smoke, cpu, gpu"):
        pick_profile("fast")
    monkeypatch.setenv("GEN3D_PROFILE", "turbo")
    with pytest.raises(ValueError, match="GEN3D_PROFILE.*turbo"):
        pick_profile()


def test_setup_cpu(capsys):
    run = setup("cpu", seed=3, **SETTINGS)
    assert isinstance(run, Run)
    assert run.name == "cpu" and run.seed == 3
    assert run.device == torch.device("cpu")
    assert run.size == 32 and run.dice_min == 0.85 and run.settings["n_train"] == 48
    assert run.checks_thresholds is True
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    for part in ("profile=cpu", "device=cpu", f"threads={run.threads}", "seed=3", "size=32"):
        assert part in line


def test_setup_smoke_has_no_thresholds():
    run = setup("smoke", verbose=False, **SETTINGS)
    assert run.checks_thresholds is False
    assert run.max_steps == 3 and run.device.type == "cpu"
    assert run.get("dice_min") is None and run.get("dice_min", 0.5) == 0.5


def test_missing_setting_lists_available():
    run = setup("smoke", verbose=False, **SETTINGS)
    with pytest.raises(AttributeError, match="dice_min.*budget_s, max_steps, n_train, size"):
        run.dice_min


def test_run_is_frozen_and_copyable():
    run = setup("smoke", verbose=False, **SETTINGS)
    with pytest.raises(Exception):
        run.name = "gpu"
    assert copy.deepcopy(run).size == 16
    assert pickle.loads(pickle.dumps(run)).settings == run.settings


def test_gpu_without_cuda_falls_back(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="CUDA"):
        run = setup("gpu", verbose=False, **SETTINGS)
    assert run.device == torch.device("cpu") and run.name == "gpu" and run.size == 64


def test_setup_bad_settings():
    with pytest.raises(ValueError, match="cpu.*no settings"):
        setup("cpu", smoke=dict(size=8))
    with pytest.raises(ValueError, match="smoke: expected a dict"):
        setup("smoke", smoke=[1, 2])
    with pytest.raises(ValueError, match="clashes with Run.device"):
        setup("smoke", smoke=dict(device="cuda"))


def test_threads_from_env(monkeypatch):
    monkeypatch.setenv("GEN3D_THREADS", "1")
    run = setup("smoke", verbose=False, **SETTINGS)
    assert run.threads == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("GEN3D_THREADS", "zero")
    with pytest.raises(ValueError, match="GEN3D_THREADS"):
        profiles.pick_threads()


def test_seed_everything_repeats_draws():
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(7)
    first = draws()
    seed_everything(7)
    assert draws() == first
    seed_everything(8)
    assert draws() != first
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_setup_seeds():
    setup("smoke", seed=11, verbose=False, **SETTINGS)
    a = torch.rand(3)
    with warnings.catch_warnings():
        setup("smoke", seed=11, verbose=False, **SETTINGS)
    assert torch.equal(a, torch.rand(3))


def test_dry_run_checks_nothing_and_saves_apart(monkeypatch):
    monkeypatch.delenv("GEN3D_MAX_STEPS", raising=False)
    cpu = setup("cpu", cpu=dict(n=1), verbose=False)
    assert cpu.checks_thresholds and not cpu.dry_run and cpu.model_suffix == ""
    assert setup("smoke", smoke=dict(n=1), verbose=False).model_suffix == "_smoke"
    monkeypatch.setenv("GEN3D_MAX_STEPS", "2")
    gpu = setup("gpu", gpu=dict(n=1), verbose=False)
    assert gpu.dry_run and not gpu.checks_thresholds and gpu.model_suffix == "_gpu_dryrun"
    assert step_cap(1000) == 2 and step_cap(1) == 1


def test_dry_overrides_apply_only_in_a_dry_run(monkeypatch):
    monkeypatch.delenv("GEN3D_MAX_STEPS", raising=False)
    assert setup("gpu", gpu=dict(n=400, size=64), dry=dict(n=8), verbose=False).n == 400
    monkeypatch.setenv("GEN3D_MAX_STEPS", "2")
    run = setup("gpu", gpu=dict(n=400, size=64), dry=dict(n=8), verbose=False)
    assert run.n == 8 and run.size == 64
    with pytest.raises(ValueError, match="not settings"):
        setup("gpu", gpu=dict(n=400), dry=dict(m=8), verbose=False)


def test_common_settings_and_groups_merge_key_by_key():
    run = setup("cpu", verbose=False,
                common=dict(size=32, vae=dict(lr=1e-3, batch=4)),
                cpu=dict(vae=dict(steps=900, batch=8), n_train=48))
    assert run.size == 32 and run.n_train == 48
    assert run.vae.lr == 1e-3 and run.vae.steps == 900 and run.vae.batch == 8   # the profile wins
    assert isinstance(run.vae, dict) and dict(run.vae) == {"lr": 1e-3, "batch": 8, "steps": 900}
    with pytest.raises(AttributeError, match="available: lr, batch, steps"):
        run.vae.epochs


def test_a_group_key_that_hides_a_dict_method_is_refused():
    with pytest.raises(ValueError, match="would hide dict.items"):
        setup("cpu", verbose=False, cpu=dict(gates=dict(items=3)))


def test_dry_overrides_merge_into_groups(monkeypatch):
    monkeypatch.setenv(MAX_STEPS_ENV, "2")
    run = setup("gpu", verbose=False, gpu=dict(data=dict(n=64, size=64)), dry=dict(data=dict(n=4)))
    assert run.data == {"n": 4, "size": 64}
