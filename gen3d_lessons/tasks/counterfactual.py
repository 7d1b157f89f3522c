"""Counterfactual questions put to trained models, checked against the answer they should give.

Chapter 4 asks two:

1. **What would an autoencoder return had the brain been upside down, or had its code been
   erased?** (:func:`copy_test`). A network that describes brains by its code returns a brain
   the right way up in the first case and nothing of this brain in the second; a network that
   copies its input around the bottleneck (the U-Net's skips) returns the input in both.
2. **What would this brain look like 20 years older?** A counterfactual model
   (:class:`~gen3d_lessons.models.scm.DeepSCM`, or the voxel-wise age model of voxel-based
   morphometry, :class:`~gen3d_lessons.models.scm.VoxelwiseAgeModel`) answers what real data can
   never check: no scanner shows the same person, with the same noise, at two ages. The phantom
   can: every subject is generated from a seed, and
   :func:`~gen3d_lessons.data.brain.make_brain_subject` with another ``age`` gives the same
   anatomy, site and noise with more (or less) atrophy.

- :func:`load_cohort`: the T1 volumes of one split with the variables of the causal graph (age,
  ventricle volume) and what the evaluation needs (brain masks, sites, the case records);
- :func:`copy_test`: question 1, for several autoencoders at once;
- :func:`phantom_at_age`: the ground truth of question 2, each subject generated again at another
  age and resampled as the dataset was;
- :func:`judge_counterfactuals`: one row per answer to question 2, scored against that truth
  inside the brain (RMSE, the share of the true change explained, the change correlation) and by
  the age the book's yardstick encoder reads off it;
- :func:`age_counterfactuals`: question 2 for a cohort, the deep SCM against the voxel-wise age
  model and doing nothing, judged;
- :func:`load_scm`: chapter 4's deep SCM rebuilt from the CVAE that chapter 4 saves (chapter 9
  compares its answers with a deformation model's);
- :func:`age_reader`: the yardstick encoder's age head as a differentiable, frozen function of
  the volumes (the age regressor that trains chapter 9's ageing network).

Shapes: volumes ``x: (B, 1, D, H, W)``, masks the same (bool), ``age, ventricles: (B,)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.brain import BrainConfig, make_brain_subject, ventricle_volume_ml
from ..data.datasets import CaseRecord, VolumeDataset, load_case
from ..metrics.image import reconstruction_scores
from ..models.scm import DeepSCM, VoxelwiseAgeModel
from .yardstick import YardstickEncoder, to_encoder_size

__all__ = ["Cohort", "load_cohort", "copy_test", "phantom_at_age", "age_counterfactuals", "judge_counterfactuals",
           "load_scm", "age_reader"]


@dataclass
class Cohort:
    """One split of the brain phantoms as tensors, with the causal variables of every subject."""

    x: torch.Tensor                   # (N, 1, D, H, W) T1, resampled to size³
    brain: torch.Tensor               # (N, 1, D, H, W) bool, label > 0
    age: torch.Tensor                 # (N,) years, float32
    site: torch.Tensor                # (N,) scanner site, int64
    ventricles: torch.Tensor          # (N,) ml, measured at full resolution (ventricle_volume_ml)
    records: list[CaseRecord]         # where each subject came from (its seed is in .attributes)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, keep: slice | torch.Tensor) -> "Cohort":
        """Some of the subjects, in order: ``cohort[:8]``, ``cohort[cohort.age <= 70]`` (a (N,) bool mask)
        or ``cohort[indices]`` (B,) int64."""
        if isinstance(keep, slice):
            idx = list(range(len(self)))[keep]
        else:
            keep = torch.as_tensor(keep)
            if keep.ndim != 1 or (keep.dtype == torch.bool and len(keep) != len(self)) or \
                    (keep.dtype != torch.bool and keep.dtype not in (torch.int32, torch.int64)):
                raise ValueError(f"keep: expected a slice, a ({len(self)},) bool mask or (B,) indices, got dtype "
                                 f"{keep.dtype} and shape {tuple(keep.shape)}")
            idx = keep.nonzero()[:, 0].tolist() if keep.dtype == torch.bool else keep.tolist()
        return Cohort(self.x[keep], self.brain[keep], self.age[keep], self.site[keep], self.ventricles[keep],
                      [self.records[i] for i in idx])


def load_cohort(folder: str | Path, split: str, size: int) -> Cohort:
    """The T1 channel of one split of a brain dataset at ``size``³, with masks, ages, sites and ventricles.

    The ventricle volume is measured on the label map at full resolution, before any resampling,
    so that it does not depend on ``size``.
    """
    ds = VolumeDataset(folder, split, keys=("image", "label"), channels=["T1"], size=size)
    items, labels = [ds[i] for i in range(len(ds))], [load_case(r, ["label"])["label"] for r in ds.records]
    return Cohort(x=torch.stack([it["image"] for it in items]),                        # (N, 1, D, H, W)
                  brain=torch.stack([it["label"] > 0 for it in items]),
                  age=torch.tensor([float(it["age"]) for it in items]),
                  site=torch.tensor([int(it["site"]) for it in items]),
                  ventricles=torch.tensor([ventricle_volume_ml(lab.data, lab.spacing) for lab in labels]),
                  records=list(ds.records))


def copy_test(models: Mapping[str, torch.nn.Module], x: torch.Tensor, mask: torch.Tensor, flip_dim: int = 4):
    """Does an autoencoder describe its input, or copy it? Each model's mean SSIM inside ``mask``:

    - ``held-out``: reconstructing ``x`` (B, 1, D, H, W) as it is;
    - ``upside down``: reconstructing ``x`` mirrored along ``flip_dim`` (4: superior-inferior in the
      brain phantoms), against the mirrored ``x``. No training brain was upside down: a network
      that learned brains returns one the right way up and scores low; a copier scores high;
    - ``bottleneck erased``: ``model.reconstruct_without_code(x)`` (z = 0; the U-Net keeps its
      skips), against ``x``. Without its code a describing network has nothing of this brain left.

    ``models`` maps names to autoencoders with ``reconstruct`` and ``reconstruct_without_code``
    (:class:`~gen3d_lessons.models.autoencoder.Autoencoder3D`, its U-Net version). Returns a pandas
    DataFrame (one row per model, the three columns) and the outputs ``{model: {column: x_hat}}``
    on the CPU, for figures.
    """
    import pandas as pd

    if not models:
        raise ValueError("models: expected a non-empty dict {name: autoencoder}")
    if not isinstance(x, torch.Tensor) or x.ndim != 5 or not isinstance(mask, torch.Tensor) or mask.shape != x.shape:
        raise ValueError(f"x, mask: expected two tensors of one shape (B, 1, D, H, W), got "
                         f"{getattr(x, 'shape', type(x).__name__)} and {getattr(mask, 'shape', type(mask).__name__)}")
    if flip_dim not in (2, 3, 4):
        raise ValueError(f"flip_dim: expected a spatial dimension 2, 3 or 4 of (B, C, D, H, W), got {flip_dim!r}")
    targets = {"held-out": (x, mask), "upside down": (x.flip(flip_dim), mask.flip(flip_dim)), "bottleneck erased": (x, mask)}
    outputs = {}
    for name, model in models.items():
        device = next(model.parameters()).device
        outputs[name] = {"held-out": model.reconstruct(x.to(device)).cpu(),
                         "upside down": model.reconstruct(x.flip(flip_dim).to(device)).cpu(),
                         "bottleneck erased": model.reconstruct_without_code(x.to(device)).cpu()}
    ssim_in = {name: {k: next(iter(reconstruction_scores(v, *targets[k]).values())) for k, v in out.items()}
               for name, out in outputs.items()}                           # the first score: SSIM inside the mask
    return pd.DataFrame(ssim_in).T, outputs


def phantom_at_age(folder: str | Path, records: Sequence[CaseRecord], ages: Any, size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ground truth of a counterfactual: each subject generated again at ``ages`` (B,).

    The same seed, lesion status and site as stored in ``records``, at the dataset's own grid
    (read from ``folder/dataset.json``), then resampled to ``size``³ as
    :class:`~gen3d_lessons.data.datasets.VolumeDataset` resamples. Returns the T1 volumes
    (B, 1, size, size, size) and the ventricle volumes (B,) in ml.
    """
    ages = [float(a) for a in torch.as_tensor(ages).reshape(-1)]
    if len(ages) != len(records):
        raise ValueError(f"ages: expected one age per record ({len(records)}), got {len(ages)}")
    cfg = BrainConfig(size=json.loads((Path(folder) / "dataset.json").read_text())["size"])
    xs, vs = [], []
    for record, age in zip(records, ages):
        a = record.attributes
        s = make_brain_subject(a["seed"], cfg, age=age, has_lesion=a["has_lesion"], site=a["site"])
        t1 = torch.from_numpy(s["image"][..., 0])[None, None]                          # (1, 1, X, Y, Z), as stored
        xs.append(F.interpolate(t1, size=(size,) * 3, mode="trilinear")[0])            # (1, size, size, size)
        vs.append(ventricle_volume_ml(s["label"], np.abs(np.diag(s["affine"]))[:3]))
    return torch.stack(xs), torch.tensor(vs)


def age_counterfactuals(scm: DeepSCM, baseline: VoxelwiseAgeModel, cohort: Cohort, years: float, folder: str | Path,
                        encoder: YardstickEncoder):
    """Every subject of ``cohort`` made ``years`` older, four ways, each judged against the phantom's truth.

    The answers: ``no change`` (the observed brain), the ``voxel-wise age model`` (``baseline``,
    fitted beforehand), the ``deep SCM`` (``scm.counterfactual``: abduction, action, prediction) and
    the ``deep SCM, decoder mean only`` (the same without the abducted voxel residual); then the
    ``phantom (truth)`` itself (:func:`phantom_at_age`), scored like an answer.

    Returns the table of :func:`judge_counterfactuals` (one row per answer), the answers
    ``{name: (B, 1, D, H, W)}`` on the CPU, and the numbers the text reads: the mean ventricle
    volume error of the deep SCM and of doing nothing (``v_err``, ``v_err_none``, ml) with the
    true mean (``v_true``); the age the encoder reads, as a shift from the observed brain, for the
    deep SCM and the truth (``shift_scm``, ``shift_true``); and the change correlation, share of the
    change and RMSE of the answers (``cos_*``, ``share_*``, ``rmse_*`` with ``scm``, ``lin`` (the
    voxel-wise model), ``mean`` (decoder mean only), ``none`` (no change)).
    """
    older = cohort.age + years
    # the truth is rendered at the age in double precision (float32 would round age + years)
    x_true, v_true = phantom_at_age(folder, cohort.records, cohort.age.double() + years, size=cohort.x.shape[-1])
    x_in = cohort.x.to(next(scm.image_model.parameters()).device)
    x_scm, v_scm = scm.counterfactual(x_in, cohort.age, cohort.ventricles, older)
    mean_only, _ = scm.counterfactual(x_in, cohort.age, cohort.ventricles, older, keep_residual=False)
    answers = {"no change": cohort.x, "voxel-wise age model": baseline.counterfactual(cohort.x, cohort.age, older),
               "deep SCM, decoder mean only": mean_only.cpu(), "deep SCM": x_scm.cpu(), "phantom (truth)": x_true}
    table = judge_counterfactuals(answers, cohort.x, x_true, cohort.brain, encoder)
    age, cos, share, rmse = (table[c] for c in ("encoder's age", "change correlation", "share of the change", "RMSE (brain)"))
    role = {"scm": "deep SCM", "lin": "voxel-wise age model", "mean": "deep SCM, decoder mean only", "none": "no change"}
    summary = {"v_err": float((v_scm.cpu() - v_true).abs().mean()), "v_err_none": float((cohort.ventricles - v_true).abs().mean()),
               "v_true": float(v_true.mean()), "shift_scm": float(age["deep SCM"] - age["no change"]),
               "shift_true": float(age["phantom (truth)"] - age["no change"]),
               **{f"cos_{k}": float(cos[role[k]]) for k in ("scm", "lin")},
               **{f"share_{k}": float(share[role[k]]) for k in ("scm", "lin")},
               **{f"rmse_{k}": float(rmse[role[k]]) for k in ("scm", "mean", "none")}}
    return table, answers, summary


def judge_counterfactuals(answers: Mapping[str, torch.Tensor], observed: torch.Tensor, truth: torch.Tensor,
                          mask: torch.Tensor, encoder: YardstickEncoder):
    """One row per answer ``x'`` (B, 1, D, H, W), scored against the ``truth`` inside ``mask``.

    - ``RMSE (brain)``: ``sqrt(mean (x' - x_true')²)`` over the voxels of the mask;
    - ``change correlation``: the cosine between the predicted change ``x' - x`` and the true one
      ``x_true' - x`` (NaN for an answer that changes nothing): does it change the right voxels in
      the right direction?
    - ``share of the change``: ``1 - ||x' - x_true'||² / ||x - x_true'||²``: 0 for doing nothing, 1 for
      the truth, negative for an answer worse than doing nothing;
    - ``encoder's age``: the mean age the yardstick encoder reads off the answers.

    Returns a pandas DataFrame, one row per answer, in the order of ``answers``.
    """
    import pandas as pd

    if not answers:
        raise ValueError("answers: expected a non-empty dict {name: volumes (B, 1, D, H, W)}")
    for name, v in {"observed": observed, "truth": truth, "mask": mask, **answers}.items():
        if not isinstance(v, torch.Tensor) or v.shape != observed.shape:
            raise ValueError(f"{name}: expected a tensor of the observed volumes' shape {tuple(observed.shape)}, got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    true_change = (truth - observed)[mask]

    def judge(x_cf: torch.Tensor) -> dict[str, float]:
        err, change = (x_cf - truth)[mask], (x_cf - observed)[mask]
        cos = F.cosine_similarity(change, true_change, dim=0) if change.abs().sum() > 0 else torch.tensor(float("nan"))
        return {"RMSE (brain)": float(err.pow(2).mean().sqrt()), "change correlation": float(cos),
                "share of the change": float(1 - err.pow(2).sum() / true_change.pow(2).sum()),
                "encoder's age": float(encoder.predict(to_encoder_size(x_cf, encoder))["age"].mean())}

    return pd.DataFrame({name: judge(x_cf) for name, x_cf in answers.items()}).T


def load_scm(folder: str | Path, train: Cohort, suffix: str = "", device: Any = None) -> DeepSCM:
    """Chapter 4's deep SCM: the CVAE it saves as ``folder/ch04_cvae{suffix}.pt`` and the volume
    mechanism fitted again to ``train`` (the same training cohort, so the same fit). A missing file
    raises a ``FileNotFoundError`` that says which page makes it."""
    from ..models.vae import VAE3D, VAEConfig
    from ..training import load_model

    path = Path(folder) / f"ch04_cvae{suffix}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; chapter 4 saves it: run it first (gen3d run ch04_autoencoders)")
    cvae = load_model(path, lambda c: VAE3D(VAEConfig(**c)), device)
    return DeepSCM.from_cohort(train.age, train.ventricles, image_model=cvae)


class _AgeReader(torch.nn.Module):
    """Volumes (B, 1, size³) -> the encoder's age (B,) in years, with gradients to the input only."""

    def __init__(self, encoder: YardstickEncoder):
        super().__init__()
        self.model = encoder.model.eval().requires_grad_(False)
        self.mean, self.std = float(encoder.targets["age_mean"]), float(encoder.targets["age_std"])
        self.size = encoder.config.size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"x: the age reader takes volumes (B, 1, D, H, W), got {tuple(x.shape)}")
        if tuple(x.shape[2:]) != (self.size,) * 3:                          # trilinear, as to_encoder_size
            x = F.interpolate(x, size=(self.size,) * 3, mode="trilinear", align_corners=False)
        self.model.eval()
        return self.model(x)["age"] * self.std + self.mean


def age_reader(encoder: YardstickEncoder) -> torch.nn.Module:
    """The yardstick encoder's age head, frozen, as a module ``x -> age (B,)`` in years that
    gradients flow through (to the volumes, not to the encoder); volumes of another size are
    resampled to the encoder's first (trilinear)."""
    return _AgeReader(encoder)
