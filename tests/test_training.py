"""The generic loop: stopping rules, NaN guard, history, checkpoints and resuming, saved models."""

import math
from pathlib import Path
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from gen3d_lessons.training import Checkpoint, FuseBlown, History, fit, load_model, save_model


def make_problem(seed=0):
    """A tiny regression (y = 2x + 1) with a model, an optimizer and 4 batches."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.linspace(-1, 1, 32).unsqueeze(1)                 # (N, 1)
    batches = [(x[i::4], 2 * x[i::4] + 1) for i in range(4)]   # 4 batches of (8, 1)

    def step(batch, i):
        xb, yb = batch
        loss = ((model(xb) - yb) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        # a little randomness, so that resuming must restore the RNG to repeat a run
        return {"loss": loss.item(), "noise": torch.rand(()).item() + float(np.random.rand())}

    return model, opt, batches, step


def test_fit_learns_and_stops_at_max_steps(capsys):
    model, _, batches, step = make_problem()
    h = fit(step, batches, max_steps=200)
    assert h.steps == 200 and h.stopped_by == "max_steps"
    assert len(h.values["loss"]) == 200 and h.seconds > 0
    assert h.mean_last("loss", 10) < 0.01 * h.values["loss"][0]
    assert abs(model.weight.item() - 2) < 0.05 and abs(model.bias.item() - 1) < 0.05
    assert "200 steps" in capsys.readouterr().out


def test_loader_is_reiterated_and_step_index_counts():
    seen = []
    fit(lambda b, i: seen.append((b, i)) or {"b": b}, [10, 20, 30], max_steps=7)
    assert seen == [(10, 0), (20, 1), (30, 2), (10, 3), (20, 4), (30, 5), (10, 6)]


def test_the_fuse_fails_loudly_and_keeps_the_checkpoint(tmp_path):
    def slow(batch, i):
        time.sleep(0.05)
        return {"loss": 1.0}

    ck = Checkpoint(tmp_path / "ck.pt", {"net": nn.Linear(1, 1)}, every_steps=1000, every_s=None)
    with pytest.raises(FuseBlown, match=r"train: reached \d+ of 10000 steps in its 0.3 s fuse"):
        fit(slow, [0], max_steps=10_000, budget_s=0.3, checkpoint=ck)
    assert 1 <= ck.load().steps < 50                          # resumable from where the fuse burnt


def test_a_fuse_that_holds_changes_nothing():
    h = fit(lambda b, i: {"loss": float(i)}, [0], max_steps=20, budget_s=60)
    assert h.steps == 20 and h.stopped_by == "max_steps"


def test_dry_run_caps_the_steps(monkeypatch):
    monkeypatch.setenv("GEN3D_MAX_STEPS", "2")
    assert fit(lambda b, i: {"loss": 1.0}, [0], max_steps=500).steps == 2
    monkeypatch.setenv("GEN3D_MAX_STEPS", "zero")
    with pytest.raises(ValueError, match="GEN3D_MAX_STEPS"):
        fit(lambda b, i: {"loss": 1.0}, [0], max_steps=5)


def test_nan_guard_names_step_key_value():
    def step(batch, i):
        return {"loss": 1.0, "kl": math.nan if i == 3 else 0.5}

    with pytest.raises(FloatingPointError, match=r"step 3: kl = nan.*no checkpoint"):
        fit(step, [0], max_steps=10)


def test_nan_guard_keeps_last_checkpoint(tmp_path):
    model, opt, batches, step = make_problem()

    def bad(batch, i):
        out = step(batch, i)
        return {**out, "loss": math.inf} if i == 5 else out

    ck = Checkpoint(tmp_path / "run.pt", {"model": model, "opt": opt}, every_steps=2)
    with pytest.raises(FloatingPointError, match=r"step 5: loss = inf.*run.pt \(step 4\) is intact"):
        fit(bad, batches, max_steps=10, checkpoint=ck)
    assert torch.load(tmp_path / "run.pt", weights_only=True)["step"] == 4


def test_step_must_return_numbers():
    with pytest.raises(TypeError, match="dict"):
        fit(lambda b, i: 1.0, [0], max_steps=2)
    with pytest.raises(TypeError, match="'loss' is not a number"):
        fit(lambda b, i: {"loss": "low"}, [0], max_steps=2)
    h = fit(lambda b, i: {"loss": torch.tensor(0.5)}, [0], max_steps=2)  # 0-d tensors are fine
    assert h.values["loss"] == [0.5, 0.5]


def test_bad_arguments():
    ok = lambda b, i: {"a": 1.0}  # noqa: E731
    with pytest.raises(ValueError, match="max_steps"):
        fit(ok, [0], max_steps=0)
    with pytest.raises(ValueError, match="budget_s"):
        fit(ok, [0], max_steps=2, budget_s=-1)
    with pytest.raises(ValueError, match="log_every"):
        fit(ok, [0], max_steps=2, log_every=0)
    with pytest.raises(ValueError, match="loader"):
        fit(ok, [], max_steps=2)


def test_history_helpers():
    h = History()
    h.record({"d": 1.0})
    h.record({"d": 3.0, "g": 10.0})   # "g" logged from the second step on
    h.record({"d": 5.0})
    assert h.steps == 3
    assert h.values["d"] == [1.0, 3.0, 5.0]
    assert math.isnan(h.values["g"][0]) and math.isnan(h.values["g"][2])
    assert h.last("d") == 5.0 and h.last("g") == 10.0
    assert h.mean_last("d", 2) == 4.0 and h.mean_last("g", 3) == 10.0
    with pytest.raises(KeyError, match="'x'.*d, g"):
        h.last("x")
    d = h.to_dict()
    assert set(d) == {"steps", "seconds", "values", "stopped_by"}
    assert History.from_dict(d).values["d"] == h.values["d"]


def test_resume_matches_an_uninterrupted_run(tmp_path):
    # 1. one run of 40 steps
    model_a, _, batches, step_a = make_problem()
    full = fit(step_a, batches, max_steps=40)

    # 2. the same run in two sessions: 20 steps, then a fresh process-like restart to 40
    model_b, opt_b, batches, step_b = make_problem()
    ck = Checkpoint(tmp_path / "ck.pt", {"model": model_b, "opt": opt_b}, config={"lr": 0.1})
    first = fit(step_b, batches, max_steps=20, checkpoint=ck)
    assert first.steps == 20 and ck.exists()
    # different initial weights and RNG states: resuming must restore all of them
    model_c, opt_c, batches, step_c = make_problem(seed=99)
    ck2 = Checkpoint(tmp_path / "ck.pt", {"model": model_c, "opt": opt_c}, config={"lr": 0.1})
    second = fit(step_c, batches, max_steps=40, checkpoint=ck2)

    assert second.steps == 40 and len(second.values["loss"]) == 40
    # batches restart at the resumed step 20, which is a multiple of the 4 batches: same order
    np.testing.assert_allclose(second.values["loss"], full.values["loss"], rtol=1e-6)
    np.testing.assert_allclose(second.values["noise"], full.values["noise"], rtol=1e-6)
    assert torch.allclose(model_c.weight, model_a.weight)
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert saved["step"] == 40 and saved["config"] == {"lr": 0.1}
    assert set(saved["states"]) == {"model", "opt"} and saved["elapsed_s"] >= first.seconds


def test_resume_at_max_steps_does_nothing(tmp_path):
    model, opt, batches, step = make_problem()
    ck = Checkpoint(tmp_path / "ck.pt", {"model": model, "opt": opt})
    fit(step, batches, max_steps=5, checkpoint=ck)
    calls = []
    h = fit(lambda b, i: calls.append(i) or {"loss": 0.0}, batches, max_steps=5, checkpoint=ck)
    assert calls == [] and h.steps == 5


def test_checkpoint_refuses_other_config(tmp_path):
    model, opt, batches, step = make_problem()
    fit(step, batches, max_steps=2, checkpoint=Checkpoint(tmp_path / "c.pt", {"model": model}, config={"lr": 0.1}))
    with pytest.raises(ValueError, match="config"):
        fit(step, batches, max_steps=4, checkpoint=Checkpoint(tmp_path / "c.pt", {"model": model}, config={"lr": 0.5}))


def test_checkpoint_bad_objects_and_corrupt_file(tmp_path):
    with pytest.raises(TypeError, match=r"objects\['x'\]"):
        Checkpoint(tmp_path / "c.pt", {"x": 3})
    with pytest.raises(ValueError, match="objects"):
        Checkpoint(tmp_path / "c.pt", {})
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    ck = Checkpoint(tmp_path / "c.pt", {"m": nn.Linear(1, 1)})
    with pytest.raises(ValueError, match="c.pt: cannot be read"):
        fit(lambda b, i: {"a": 1.0}, [0], max_steps=1, checkpoint=ck)


def test_checkpoint_is_written_atomically(tmp_path):
    model, opt, batches, step = make_problem()
    ck = Checkpoint(tmp_path / "sub" / "c.pt", {"model": model}, every_steps=1)
    fit(step, batches, max_steps=3, checkpoint=ck)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["c.pt"]   # no .tmp left behind


@dataclass
class TinyConfig:
    hidden: int = 4
    act: str = "relu"


def build(cfg: dict) -> nn.Module:
    c = TinyConfig(**cfg)
    return nn.Sequential(nn.Linear(2, c.hidden), nn.ReLU(), nn.Linear(c.hidden, 1))


def test_save_and_load_model(tmp_path):
    cfg = TinyConfig(hidden=5)
    model = build({"hidden": 5, "act": "relu"})
    path = save_model(tmp_path / "m.pt", model, cfg)
    assert torch.load(path, weights_only=True)["config"] == {"hidden": 5, "act": "relu"}
    loaded = load_model(path, build)
    x = torch.randn(3, 2)
    assert torch.equal(loaded(x), model(x)) and not loaded.training


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt", build)
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="bad.pt: cannot be read"):
        load_model(tmp_path / "bad.pt", build)
    save_model(tmp_path / "m.pt", build({"hidden": 5}), TinyConfig(hidden=5))
    with pytest.raises(ValueError, match="do not fit"):
        load_model(tmp_path / "m.pt", lambda c: build({**c, "hidden": 6}))
    with pytest.raises(TypeError, match="config"):
        save_model(tmp_path / "n.pt", nn.Linear(1, 1), config=3)


def test_progress_is_plain_text_outside_a_live_kernel(monkeypatch):
    from tqdm.std import tqdm as text_tqdm

    from gen3d_lessons import progress as P

    monkeypatch.setenv("GEN3D_STATIC", "1")
    bar = P.progress(range(3), desc="x")
    assert type(bar) is text_tqdm and bar.mininterval == P.STATIC_MININTERVAL_S
    bar.close()

    class FakeKernelShell:
        kernel = object()

    monkeypatch.setattr("IPython.get_ipython", lambda: FakeKernelShell())
    assert not P.in_live_kernel()          # the book runner executes in a kernel, but output is static
    monkeypatch.delenv("GEN3D_STATIC")
    assert P.in_live_kernel()
    monkeypatch.setattr("IPython.get_ipython", lambda: None)
    assert not P.in_live_kernel()


def test_fit_output_stays_short_in_the_static_book(monkeypatch, capsys):
    monkeypatch.setenv("GEN3D_STATIC", "1")
    fit(lambda b, i: {"loss": 1.0}, [0], max_steps=500)
    out = capsys.readouterr().out
    assert out.count("\r") <= 3 and len(out) < 600   # no redraw per step


# Integrity: a flipped byte, a text file, another model's file -----------------------------------

def _flip_a_weight_byte(path, needle: bytes):
    """Flip one byte inside the stored bytes of a tensor (found by its known content)."""
    raw = bytearray(path.read_bytes())
    at = raw.find(needle)
    assert at > 0, "tensor bytes not found in the file"
    raw[at + 1] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_in_saved_weights_is_an_error(tmp_path):
    net = nn.Linear(4, 4)
    with torch.no_grad():
        net.weight.copy_(torch.arange(16.0).reshape(4, 4) + 0.5)
    path = save_model(tmp_path / "m.pt", net, {"n": 4})
    load_model(path, lambda c: nn.Linear(c["n"], c["n"]))                       # intact: fine
    _flip_a_weight_byte(path, (torch.arange(16.0) + 0.5).numpy().tobytes()[:8])
    with pytest.raises(ValueError, match=r"m\.pt: .*checksum"):
        load_model(path, lambda c: nn.Linear(c["n"], c["n"]))


def test_a_flipped_byte_in_a_checkpoint_is_an_error(tmp_path):
    net = nn.Linear(4, 4)
    with torch.no_grad():
        net.weight.copy_(torch.arange(16.0).reshape(4, 4) + 0.25)
    ck = Checkpoint(tmp_path / "ck.pt", {"net": net}, every_steps=1, every_s=None)
    fit(lambda b, i: {"loss": 0.0}, [0], max_steps=1, checkpoint=ck)
    _flip_a_weight_byte(ck.path, (torch.arange(16.0) + 0.25).numpy().tobytes()[:8])
    with pytest.raises(ValueError, match=r"ck\.pt: .*checksum"):
        Checkpoint(ck.path, {"net": nn.Linear(4, 4)}).load()


def test_a_text_file_or_another_models_file_is_named(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a model\n" * 10)
    with pytest.raises(ValueError, match=r"notes\.pt: cannot be read"):
        load_model(text, lambda c: nn.Linear(2, 2))
    other = save_model(tmp_path / "other.pt", nn.Linear(2, 3), {"width": 3})

    @dataclass
    class NetConfig:
        n: int

    with pytest.raises(ValueError, match=r"other\.pt: holds a model whose config does not build"):
        load_model(other, lambda c: nn.Linear(NetConfig(**c).n, 2))


# Exact resume wherever the checkpoint was taken (mid-pass, shuffled, killed) ------------------------

def _shuffled_problem(seed: int = 0):
    from gen3d_lessons.data.batches import Batches

    torch.manual_seed(seed)
    net = nn.Conv3d(1, 1, 3, padding=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(10, 1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    batches = Batches({"image": x}, batch_size=3, seed=1, augment=("image",))   # 3 batches a pass, a new order each pass

    def step(batch, i):
        loss = (net(batch["image"]) - batch["image"].flip(2)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}
    return net, opt, batches, step


@pytest.mark.parametrize("stop", [4, 7, 8])
def test_resume_mid_pass_equals_the_uninterrupted_run(tmp_path, stop):
    net_a, _, batches, step = _shuffled_problem()
    full = fit(step, batches, max_steps=11)
    net_b, opt_b, batches, step = _shuffled_problem()
    fit(step, batches, max_steps=stop, checkpoint=Checkpoint(tmp_path / "c.pt", {"net": net_b, "opt": opt_b}))
    net_c, opt_c, batches, step = _shuffled_problem(seed=42)     # a new process: other weights, fresh loader
    again = fit(step, batches, max_steps=11, checkpoint=Checkpoint(tmp_path / "c.pt", {"net": net_c, "opt": opt_c}))
    assert again.values["loss"] == full.values["loss"]
    assert torch.equal(net_c.weight, net_a.weight)


KILLED_RUN = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_training import _shuffled_problem
from gen3d_lessons.training import Checkpoint, fit
net, opt, batches, step = _shuffled_problem()
def slow(batch, i):
    time.sleep(0.15)
    return step(batch, i)
fit(slow, batches, max_steps=40, checkpoint=Checkpoint({path!r}, {{"net": net, "opt": opt}}, every_steps=1, every_s=None))
"""


def test_a_killed_training_resumes_exactly(tmp_path):
    import signal
    import subprocess
    import sys

    path = tmp_path / "c.pt"
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN.format(tests=str(Path(__file__).parent), path=str(path))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (path.is_file() and torch.load(path, weights_only=True)["step"] >= 5):
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = torch.load(path, weights_only=True)["step"]
    assert 5 <= killed_at < 40
    net_a, _, batches, step = _shuffled_problem()
    full = fit(step, batches, max_steps=40)
    net_b, opt_b, batches, step = _shuffled_problem(seed=3)
    again = fit(step, batches, max_steps=40, checkpoint=Checkpoint(path, {"net": net_b, "opt": opt_b}))
    assert again.values["loss"] == full.values["loss"] and torch.equal(net_b.weight, net_a.weight)


def test_cost_ratios_reads_3d_over_2d_at_one_edge():
    from gen3d_lessons.training.benchmark import cost_ratios
    rows = [dict(dims=2, size=32, params=10, memory_MB=2.0, s_per_step=0.01),
            dict(dims=3, size=32, params=30, memory_MB=64.0, s_per_step=0.5)]
    r = cost_ratios(rows, 32)
    assert r == {"slowdown": 0.5 / 0.01, "memory_ratio": 32.0, "param_ratio": 3.0}
    with pytest.raises(ValueError, match="no measurement in 2D and 3D at edge 64"):
        cost_ratios(rows, 64)


def test_saved_data_comes_back_checked(tmp_path):
    from gen3d_lessons.training import read_checked, save_checked
    x = torch.arange(12.0).reshape(3, 4)
    path = save_checked({"x": x, "note": "cohort"}, tmp_path / "d.pt", "x")
    back = read_checked(path, "cohort file", "x")
    assert torch.equal(back["x"], x) and back["note"] == "cohort"
    with pytest.raises(ValueError, match="checked: 'y'"):
        save_checked({"x": x}, tmp_path / "e.pt", "y")
    torch.save({**back, "x": x + 1}, path)                               # tensors changed behind the checksum
    with pytest.raises(ValueError, match="do not match the checksum"):
        read_checked(path, "cohort file", "x")
    with pytest.raises(FileNotFoundError, match="no cohort file"):
        read_checked(tmp_path / "none.pt", "cohort file", "x")
