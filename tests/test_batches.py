"""data/batches.py: the one shuffled iterator (Batches) every chapter trains from.

CropBatches and random_flip are tested with the segmentation code that uses them (test_segmentation.py).
"""

import pytest
import torch

from gen3d_lessons.data.batches import Batches
from gen3d_lessons.training import Checkpoint, fit


def numbered(n: int = 6, shape: tuple[int, int, int] = (2, 2, 2)) -> torch.Tensor:
    """Volumes (n, 1, *shape) whose voxels all equal the item's index."""
    return torch.arange(float(n)).view(n, 1, 1, 1, 1).expand(n, 1, *shape).contiguous()


def reference(data, batch_size, seed, augment=(), flip_p=0.5, flip_axis=0, shift=0, gain=0.0):
    """The documented recipe written out: randperm, then per batch rand(B), randint shifts, rand gains."""
    g = torch.Generator().manual_seed(seed)
    n = len(next(iter(data.values())))
    bs = min(batch_size, n)
    order = torch.randperm(n, generator=g)
    out = []
    for s in range(0, n - bs + 1, bs):
        idx = order[s:s + bs]
        batch = {k: v[idx] for k, v in data.items()}
        mirror = torch.rand(bs, generator=g) < flip_p
        shifts = torch.randint(-shift, shift + 1, (bs, 3), generator=g).tolist() if shift else None
        scale = 1 + gain * (2 * torch.rand(bs, 1, 1, 1, 1, generator=g) - 1) if gain else None
        for key in augment:
            items = []
            for k in range(bs):
                x = batch[key][k]
                x = x.flip(1 + flip_axis) if mirror[k] else x
                x = torch.roll(x, tuple(shifts[k]), dims=(1, 2, 3)) if shifts else x
                items.append(x)
            batch[key] = torch.stack(items) * scale if scale is not None else torch.stack(items)
        out.append(batch)
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert list(x) == list(y)
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


def test_every_item_once_per_pass_and_a_new_order_each_pass():
    x, c = numbered(), torch.arange(6.0)[:, None]
    loader = Batches({"image": x, "condition": c}, 2, seed=0, augment=("image",))
    first = list(loader)
    assert len(first) == len(loader) == 3 and all(b["image"].shape == (2, 1, 2, 2, 2) for b in first)
    assert torch.equal(torch.cat([b["condition"][:, 0] for b in first]).sort().values, torch.arange(6.0))
    for b in first:                                                        # conditions stay with their images
        assert torch.equal(b["image"][:, 0, 0, 0, 0], b["condition"][:, 0])
    second = list(loader)                                                  # iterable again, another order
    assert len(second) == 3
    assert not torch.equal(torch.cat([b["condition"] for b in first]), torch.cat([b["condition"] for b in second]))
    # the last partial batch is dropped
    assert [len(b["image"]) for b in Batches({"image": x}, 4)] == [4]


def test_same_seed_same_batches_and_the_documented_draws():
    torch.manual_seed(0)
    data = {"image": torch.randn(9, 2, 5, 4, 3), "label": torch.randint(0, 3, (9, 1, 5, 4, 3)),
            "age": torch.randn(9)}
    for kw in ({}, {"augment": ("image",)}, {"augment": ("image", "label"), "flip_axis": 2, "flip_p": 0.3},
               {"augment": ("image",), "shift": 2, "gain": 0.1}):
        for seed in (0, 3):
            loader = Batches(data, 4, seed, **kw)
            expected = reference(data, 4, seed, **kw)
            assert_same(list(loader), expected)
            assert_same(list(Batches(data, 4, seed, **kw)), list(Batches(data, 4, seed, **kw)))
    assert not torch.equal(next(iter(Batches(data, 4, 0)))["age"], next(iter(Batches(data, 4, 1)))["age"])


def test_the_coin_is_drawn_even_when_nothing_is_mirrored():
    data = {"image": numbered(7), "id": torch.arange(7)}
    plain, augmented = Batches(data, 2, seed=4), Batches(data, 2, seed=4, augment=("image",))
    for _ in range(3):                                                     # the same order, pass after pass
        assert torch.equal(torch.cat([b["id"] for b in plain]), torch.cat([b["id"] for b in augmented]))


def test_mirror_shift_and_gain_keep_image_and_label_together():
    x = numbered(6, (2, 1, 1)).clone()
    x[:, 0, 1] += 100                                                      # the second plane differs
    batches = list(Batches({"image": x, "id": torch.arange(6)}, 2, seed=0, augment=("image",)))
    flipped = torch.cat([b["image"][:, 0, 0, 0, 0] > 50 for b in batches])
    assert 0 < flipped.sum() < 6                                           # some mirrored, some not
    # an image and its label map get the same mirror and shift
    image = torch.randn(8, 1, 6, 6, 6)
    label = (image > 0).long()
    for b in Batches({"image": image, "label": label}, 4, seed=1, augment=("image", "label"), shift=2):
        assert torch.equal((b["image"] > 0).long(), b["label"])
    # the gain scales each whole volume by a factor in 1 ± gain
    ones = torch.ones(8, 1, 3, 3, 3)
    for b in Batches({"image": ones}, 4, seed=2, augment=("image",), gain=0.1):
        factor = b["image"].flatten(1)
        assert torch.equal(factor, factor[:, :1].expand_as(factor))
        assert ((factor - 1).abs() <= 0.1).all() and not torch.equal(factor, torch.ones_like(factor))


def test_a_batch_size_above_n_is_clamped():
    data = {"image": numbered(5)}
    loader = Batches(data, 8, seed=0)
    assert loader.batch_size == 5 and len(loader) == 1
    batches = list(loader)
    assert len(batches) == 1 and sorted(batches[0]["image"][:, 0, 0, 0, 0].tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("make, match", [
    (lambda: Batches({}, 2), "non-empty dict"),
    (lambda: Batches([numbered()], 2), "non-empty dict"),
    (lambda: Batches({"image": [1, 2]}, 1), r"data\['image'\]: expected a tensor"),
    (lambda: Batches({"a": torch.zeros(3), "b": torch.zeros(2)}, 2), "same, non-zero length"),
    (lambda: Batches({"a": torch.zeros(0, 1)}, 1), "same, non-zero length"),
    (lambda: Batches({"image": numbered().index_fill(0, torch.tensor([2]), float("nan"))}, 2), "NaN or infinite"),
    (lambda: Batches({"image": numbered()}, 0), "batch_size"),
    (lambda: Batches({"image": numbered()}, 2.0), "batch_size"),
    (lambda: Batches({"image": numbered()}, True), "batch_size"),
    (lambda: Batches({"image": numbered()}, 2, augment=("label",)), "augment"),
    (lambda: Batches({"image": torch.rand(6, 4, 4, 4)}, 2, augment=("image",)), r"expected volumes \(N, C, D, H, W\)"),
    (lambda: Batches({"image": numbered().long()}, 2, augment=("image",), gain=0.1), "gain scales intensities"),
    (lambda: Batches({"image": numbered()}, 2, flip_p=1.5), "flip_p"),
    (lambda: Batches({"image": numbered()}, 2, flip_axis=3), "flip_axis"),
    (lambda: Batches({"image": numbered()}, 2, shift=-1), "shift"),
    (lambda: Batches({"image": numbered()}, 2, gain=1.0), "gain"),
])
def test_bad_input_is_refused_with_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_resumable_through_its_generator(tmp_path):
    data = {"image": torch.randn(10, 1, 4, 4, 4, generator=torch.Generator().manual_seed(5))}
    loader = Batches(data, 3, seed=1, augment=("image",), shift=1, gain=0.1)
    assert isinstance(loader.generator, torch.Generator)                   # what fit saves and restores
    state = loader.generator.get_state()
    first = list(loader)
    loader.generator.set_state(state)
    assert_same(list(loader), first)

    # a run stopped mid-pass and resumed sees the batches of the uninterrupted run
    def run(max_steps, checkpoint=None):
        seen = []
        net = torch.nn.Linear(1, 1)

        def step(batch, i):
            seen.append(batch["image"].clone())
            return {"loss": 0.0}

        fit(step, Batches(data, 3, seed=1, augment=("image",), shift=1, gain=0.1), max_steps=max_steps,
            checkpoint=None if checkpoint is None else Checkpoint(checkpoint, {"net": net}))
        return seen

    full = run(8)
    run(4, tmp_path / "c.pt")
    resumed = run(8, tmp_path / "c.pt")
    assert len(resumed) == 4 and all(torch.equal(a, b) for a, b in zip(resumed, full[4:]))
