"""Segmenting volumes with a trained network, scoring the result, and the book's T1 segmenter.

    from gen3d_lessons.tasks.segment import predict
    labels = predict("my_t1.nii.gz")          # a nibabel image on the input's own grid
    labels.to_filename("my_t1_labels.nii.gz") # 0 background, 1 CSF, 2 GM, 3 WM

1. :class:`SegmenterConfig`, :func:`save_segmenter`, :func:`load_segmenter`: a trained network and
   the grid it expects, in one file (``data/models/brain_seg.pt`` by default);
2. inference on volumes already in memory: :func:`predict_labels`, :func:`keep_largest_component`
   (the scores are :func:`gen3d_lessons.metrics.segmentation.score_segmentation`);
3. :func:`predict` reads any NIfTI file (any orientation, any voxel size), resamples it onto the
   grid the network was trained on (RAS axes, isotropic voxels), runs the network, and carries
   the class probabilities back to the input's grid before taking the most likely class, so the
   labels line up voxel for voxel with the file that went in; a brain ``mask`` keeps it off skull
   and scalp (``gen3d segment`` is its command line);
4. **domain randomisation** in the spirit of SynthSeg (Billot et al. 2023): :func:`synthesize`
   draws training images from label maps alone, with a random intensity per tissue, contrast
   curve, bias field, blur, thick slices, noise, pose and field of view, so that no single
   contrast, resolution or scanner is "the" training domain; :func:`unseen_conditions` makes
   test images that differ from the training data in one way each;
5. :func:`train_brain_segmenter`, which chapter 10 of the book uses to train the saved network;
6. tables that compare segmenters: :func:`score_table` (Dice, HD95 and ASSD of several methods on
   a test set, per volume and summarised per class), :func:`mean_tissue_dice` and
   :func:`robustness_study` (T1 networks against Otsu, by site and under unseen conditions), and
   :func:`agreement_table` (two label maps of a real scan that has no expert labels).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import spatial
from ..data.errors import DataError
from ..data.io import check_volume, load_nifti
from ..models.unet import UNet3D, UNetConfig, pad_to_multiple

if TYPE_CHECKING:
    import pandas as pd

BRAIN_TISSUES = ("background", "CSF", "GM", "WM")


# 1. Where the trained model lives, and what it knows about itself -------------------------------

@dataclass(frozen=True)
class SegmenterConfig:
    """A trained segmenter: its network and the grid it expects (saved beside the weights)."""

    unet: UNetConfig = field(default_factory=lambda: UNetConfig(in_channels=1, out_channels=4, norm="batch"))
    spacing_mm: float = 3.0                      # isotropic voxel size of the training volumes
    labels: tuple[str, ...] = BRAIN_TISSUES      # name of each output class, label value = index
    data: dict = field(default_factory=dict)     # what it was trained on: dataset, its manifest hash, profile
    kind: str = "brain tissue segmenter"         # what load_segmenter() checks before it builds the network

    def __post_init__(self):
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", UNetConfig(**self.unet))
        object.__setattr__(self, "labels", tuple(self.labels))
        if len(self.labels) != self.unet.out_channels:
            raise ValueError(f"SegmenterConfig: {len(self.labels)} label names for {self.unet.out_channels} classes")
        if not self.spacing_mm > 0:
            raise ValueError(f"SegmenterConfig.spacing_mm: expected a positive voxel size, got {self.spacing_mm}")


def default_model_path() -> Path:
    """``data/models/brain_seg.pt`` in the book's data folder (``$GEN3D_DATA`` if set)."""
    from ..data import data_root

    return data_root() / "models" / "brain_seg.pt"


def load_segmenter(model_path: str | Path | None = None, device: Any = None) -> tuple[UNet3D, SegmenterConfig]:
    """The saved network (eval mode) and its :class:`SegmenterConfig`; a clear error if there is none."""
    from ..training import load_model

    path = Path(model_path) if model_path is not None else default_model_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no trained brain segmenter here. Make one by running chapter 10 "
            "(`gen3d run 10`, or execute book/ch10_segmentation.ipynb), or call "
            "gen3d_lessons.tasks.segment.train_brain_segmenter(...) and save_segmenter(...); "
            "or point to a model you saved (model_path=, or gen3d segment --model PATH).")
    saved: dict = {}

    def build(config: dict) -> UNet3D:
        if config.get("kind", SegmenterConfig.kind) != SegmenterConfig.kind or "unet" not in config:
            raise NotASegmenter(f"{path}: not a brain segmenter (it holds a {config.get('kind', 'model')} whose config "
                                f"has {', '.join(sorted(map(str, config)))}); give a file saved by save_segmenter()")
        saved.update(config)
        return UNet3D(SegmenterConfig(**config).unet)

    try:
        model = load_model(path, build, device=device)
    except ValueError as e:
        if isinstance(e.__cause__, NotASegmenter):
            raise NotASegmenter(str(e.__cause__)) from None
        raise
    return model, SegmenterConfig(**saved)


class NotASegmenter(ValueError):
    """A saved model file that holds some other network."""


def save_segmenter(model: UNet3D, cfg: SegmenterConfig, path: str | Path | None = None) -> Path:
    """Save the network with its config (``save_model``) where :func:`predict` looks by default."""
    from ..training import save_model

    return save_model(default_model_path() if path is None else path, model, asdict(cfg))


# 2. Intensities and inference on the model's own grid --------------------------------------------

def normalize_intensity(image: torch.Tensor, low: float = 0.005, high: float = 0.995) -> torch.Tensor:
    """Map each (C, *S) volume of a (B, C, *S) batch to [0, 1] by its 0.5th and 99.5th percentiles.

    Percentiles, not min and max: one hot voxel (a vessel, an artefact) must not squash the rest.
    The same function prepares training volumes and new scans, so both arrive on one scale.
    """
    flat = image.flatten(2).float()                                     # (B, C, N)
    k = min(flat.shape[-1], 1_000_000)                                  # quantile() has a size limit
    sample = flat[..., torch.linspace(0, flat.shape[-1] - 1, k).long()]
    lo = torch.quantile(sample, low, dim=-1)[..., None]
    hi = torch.quantile(sample, high, dim=-1)[..., None]
    out = ((flat - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)
    return out.view_as(image)


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, image: torch.Tensor, device: Any = None, *,
                          set_eval: bool = True) -> torch.Tensor:
    """Class probabilities (B, K, *S) of a batch (B, C, *S) already on the model's grid.

    The volume is zero-padded to a size the U-Net accepts and cropped back afterwards. The model
    is put in eval mode first unless ``set_eval=False``, which leaves its modes as they are (Monte
    Carlo dropout samples with its dropout layers on, :func:`~gen3d_lessons.tasks.trust.dropout_on`).
    """
    if set_eval:
        model.eval()
    divisor = model.cfg.divisor if hasattr(model, "cfg") and hasattr(model.cfg, "divisor") else 8
    padded, crop = pad_to_multiple(image, divisor)
    logits = model(padded.to(device))
    return logits.softmax(1)[(slice(None), slice(None), *crop)].cpu()


@torch.no_grad()
def predict_labels(model: torch.nn.Module, images: torch.Tensor, device: Any = None,
                   batch_size: int = 4) -> torch.Tensor:
    """The most likely class of every voxel, (N, *S) int64, for volumes (N, C, *S), ``batch_size`` at a time.

    Batches, not single volumes: on a CPU, PyTorch runs a 3D convolution of one volume through
    its generic (im2col) kernel and a batch of several through oneDNN, about three times faster
    per volume for the book's U-Nets at 64³.
    """
    check_volume(images, "images", ndim=5)
    if batch_size < 1:
        raise ValueError(f"batch_size: expected at least 1 volume per batch, got {batch_size}")
    return torch.cat([predict_probabilities(model, images[i:i + batch_size], device).argmax(1)
                      for i in range(0, len(images), batch_size)])


def keep_largest_component(labels: Any, classes: Any = None) -> np.ndarray:
    """Keep only the largest connected 3D piece of each class; the other pieces become background.

    A common clean-up after a segmentation network (nnU-Net tests it on every task): a heart has
    one LV, and a bright vessel far from it labelled "LV" is an error that Dice barely notices but
    a surface distance does. ``classes`` defaults to every non-zero label present.
    """
    from scipy import ndimage

    out = np.array(labels, copy=True)
    check_volume(out, "labels", ndim=3)
    for k in (np.unique(out[out > 0]) if classes is None else classes):
        pieces, n = ndimage.label(out == k)
        if n > 1:
            sizes = ndimage.sum(np.ones_like(pieces), pieces, range(1, n + 1))
            out[(pieces > 0) & (pieces != 1 + int(np.argmax(sizes)))] = 0
    return out


# 3. predict(): any NIfTI in, labels on the same grid out -------------------------------------------

MIN_EDGE = 8          # voxels per axis: anything smaller is not a brain scan


def _as_volume(volume: Any) -> tuple[np.ndarray, np.ndarray, str]:
    """(data (X, Y, Z) float32, affine, name) from a path or a nibabel image, with clear errors."""
    import nibabel as nib

    if isinstance(volume, (str, Path)):
        vol = load_nifti(volume, ndim=(3, 4))
        data, affine, name = vol.data, vol.affine, str(volume)
    elif isinstance(volume, nib.spatialimages.SpatialImage):
        data, affine, name = np.asarray(volume.dataobj, dtype=np.float32), np.asarray(volume.affine, float), "volume"
        check_volume(data, name, ndim=(3, 4))
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise DataError(None, f"{name}: the affine is not invertible:\n{affine}")
    else:
        raise TypeError(f"volume: expected a path to a NIfTI file or a nibabel image, got {type(volume).__name__}")
    if data.ndim == 4:
        if data.shape[3] != 1:
            raise DataError(None, f"{name}: a 4D volume with {data.shape[3]} volumes (shape {data.shape}); "
                                  "predict() segments one 3D T1 volume: pass one of them, e.g. img.slicer[..., 0]")
        data = data[..., 0]
    if min(data.shape) < 2:
        raise DataError(None, f"{name}: shape {data.shape} is a single slice, not a 3D volume")
    if min(data.shape) < MIN_EDGE:
        raise DataError(None, f"{name}: shape {data.shape} is too small to be a brain scan (at least {MIN_EDGE} "
                              "voxels per axis)")
    if float(np.ptp(data)) == 0:
        raise DataError(None, f"{name}: every voxel has the value {data.flat[0]}: there is nothing to segment")
    data = np.asarray(data, dtype=np.float32)
    check_volume(data, f"{name} (as float32)")          # 1e300 in float64 becomes inf in float32
    return data, affine, name


def model_grid(shape: tuple[int, ...], affine: np.ndarray, spacing_mm: float,
               divisor: int = 1) -> tuple[tuple[int, int, int], np.ndarray]:
    """An axis-aligned RAS grid of ``spacing_mm`` voxels covering a volume's field of view.

    Returns its shape (each side a multiple of ``divisor``) and its voxel -> mm affine. The
    field of view is the box around the centres of the eight corner voxels of the input; the grid
    is centred on it, so padding spreads evenly on both sides.
    """
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in shape[:3]], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]                  # (3, 8) mm
    lo, hi = world.min(1), world.max(1)
    n = np.maximum(np.ceil((hi - lo) / spacing_mm).astype(int) + 1, 1)
    n = (np.ceil(n / divisor) * divisor).astype(int)
    centre = (lo + hi) / 2
    grid_affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    grid_affine[:3, 3] = centre - spacing_mm * (n - 1) / 2               # RAS: +x right, +y anterior, +z up
    return tuple(int(v) for v in n), grid_affine


def _resample(data: np.ndarray, src_affine: np.ndarray, dst_shape: tuple[int, ...], dst_affine: np.ndarray,
              order: int = 1, cval: float = 0.0) -> np.ndarray:
    """``data`` (X, Y, Z) on ``src_affine`` sampled at the voxels of (``dst_shape``, ``dst_affine``)."""
    from scipy import ndimage

    m = np.linalg.inv(src_affine) @ dst_affine                           # dst voxel -> src voxel
    return ndimage.affine_transform(data, m[:3, :3], offset=m[:3, 3], output_shape=dst_shape,
                                    order=order, mode="constant", cval=cval)


HEAD_ML = 2500.0      # inside the outline of a scan: more than this is a head (skull, scalp), not a brain


def outline_volume_ml(data: np.ndarray, affine: np.ndarray) -> float:
    """mL inside a scan's outline: above Otsu's threshold, holes filled, the largest piece."""
    from ..baselines.segmentation import brain_mask_from_intensity

    return float(brain_mask_from_intensity(data).sum() * abs(np.linalg.det(affine[:3, :3])) / 1000.0)


def _as_mask(mask: Any, shape: tuple[int, ...], affine: np.ndarray, name: str) -> np.ndarray:
    """A brain mask (path, nibabel image or array) checked against the volume it belongs to."""
    import nibabel as nib

    where = str(mask) if isinstance(mask, (str, Path)) else "mask"
    if isinstance(mask, (str, Path)):
        vol = load_nifti(mask, ndim=(3, 4))
        data, m_affine = vol.data, vol.affine
    elif isinstance(mask, nib.spatialimages.SpatialImage):
        data, m_affine = np.asarray(mask.dataobj), np.asarray(mask.affine, float)
    else:
        data, m_affine = np.asarray(mask), None
    data = data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data
    if data.shape != shape:
        raise DataError(None, f"{where}: a mask of shape {data.shape} for {name} of shape {shape}; "
                              "the mask must be on the scan's own grid")
    if m_affine is not None and not np.allclose(m_affine, affine, atol=1e-3):
        raise DataError(None, f"{where}: its affine differs from {name}'s; the mask must be on the scan's own grid")
    data = data.astype(np.uint8) if data.dtype == bool else data
    check_volume(data, where)                                         # a numeric array, no NaN or inf
    m = data > 0.5
    if not m.any():
        raise DataError(None, f"{where}: the mask is empty (no voxel above 0.5)")
    return m


def predict(volume: Any, model_path: str | Path | None = None, device: Any = None, mask: Any = None,
            check_head: bool = True):
    """Segment a T1-weighted brain volume into 0 background, 1 CSF, 2 GM, 3 WM.

    ``volume`` is a path to a .nii/.nii.gz file or a nibabel image: 3D (or 4D with one volume),
    any orientation, any voxel size, finite values. Returns a ``nibabel.Nifti1Image`` of uint8
    labels with the input's shape and affine. ``model_path`` defaults to :func:`default_model_path`.

    The network knows brains, not skulls: give a skull-stripped scan, or a brain ``mask`` on the
    scan's grid (a path, an image or an array; voxels above 0.5 are brain), outside which the
    image is darkened before the network sees it and the labels are background. Without a mask, a
    scan whose outline holds more than ``HEAD_ML`` mL looks like a whole head and is refused
    (``check_head=False`` skips that test).

    Steps: 1. read and check; 2. resample onto the model's RAS grid (anti-aliased when the input is
    finer); 3. normalise the intensities; 4. class probabilities; 5. probabilities back onto the
    input grid (trilinear), then the most likely class per voxel.
    """
    import nibabel as nib
    from scipy import ndimage

    # 1. read the volume, its mask and the model
    data, affine, name = _as_volume(volume)
    if mask is not None:
        brain = _as_mask(mask, data.shape, affine, name)
        data = np.where(brain, data, float(data[brain].min()))
    elif check_head and (ml := outline_volume_ml(data, affine)) > HEAD_ML:
        raise DataError(None, f"{name}: about {ml:.0f} mL lie inside the scan's outline, a whole head rather than "
                              f"a brain (1.0-1.8 L), and skull and scalp would be labelled as tissue: strip the "
                              "skull first, or give a brain mask (predict(..., mask=...), gen3d segment --mask MASK)")
    model, cfg = load_segmenter(model_path, device=device)
    if cfg.unet.in_channels != 1:
        raise ValueError(f"{model_path or default_model_path()}: this network takes {cfg.unet.in_channels} "
                         "channels; predict() segments single T1 volumes")
    # 2. onto the model's grid; blur first if the input voxels are smaller than the model's
    shape, grid_affine = model_grid(data.shape, affine, cfg.spacing_mm, cfg.unet.divisor)
    src_spacing = np.linalg.norm(affine[:3, :3], axis=0)
    sigma = np.maximum(cfg.spacing_mm / src_spacing - 1.0, 0.0) / 2.0       # in input voxels
    smooth = ndimage.gaussian_filter(data, sigma) if sigma.max() > 0 else data
    x = _resample(smooth, affine, shape, grid_affine, order=1, cval=float(np.percentile(data, 0.5)))
    # 3. intensities to [0, 1]
    x = normalize_intensity(torch.from_numpy(x)[None, None])              # (1, 1, *grid)
    # 4. probabilities on the model's grid
    probs = predict_probabilities(model, x, device)[0].numpy()            # (K, *grid)
    if not np.isfinite(probs).all():
        raise ValueError(f"{name}: the network's output is not finite (a corrupt model file?)")
    # 5. back onto the input's grid; outside the model's grid is background
    back = np.stack([_resample(p, grid_affine, data.shape, affine, order=1, cval=1.0 if k == 0 else 0.0)
                     for k, p in enumerate(probs)])                       # (K, X, Y, Z)
    labels = back.argmax(0).astype(np.uint8)
    if mask is not None:
        labels[~brain] = 0
    out = nib.Nifti1Image(labels, affine)
    out.header.set_xyzt_units("mm")
    return out


# 4. Domain randomisation (SynthSeg-style) -------------------------------------------------------

@dataclass(frozen=True)
class SynthConfig:
    """How widely :func:`synthesize` varies the images it draws from label maps.

    Intensities live on the scale that :func:`normalize_intensity` gives a whole scan (dark
    background near 0, brightest tissue near 1), so a synthetic crop looks like a crop of a
    normalised volume, which is what the network sees at test time.
    """

    order: tuple[int, ...] | None = None   # labels whose means keep this order, darkest first, e.g. (1, 2, 3):
                                           # T1's CSF < GM < WM; None: every tissue gets any mean
    min_contrast: float = 0.3              # with ``order``: the smallest gap between neighbours, relative
    std_max: float = 0.08                  # within-tissue intensity spread, up to this
    dark_background: float = 0.6           # chance that the background is dark (skull-stripped look) ...
    clutter_prob: float = 0.5              # ... and chance that it holds smooth structure (skull, scalp, neck)
    blur_max_vox: float = 1.0              # Gaussian blur sigma per axis, up to this (partial volumes)
    thick_slice_prob: float = 0.3          # chance of thick slices along one random axis ...
    thick_slice_max: float = 3.0           # ... up to this many voxels thick
    bias_max: float = 0.35                 # std of the log bias field, up to this
    gamma_std: float = 0.3                 # log of the contrast exponent ~ N(0, gamma_std²)
    noise_max: float = 0.06                # Gaussian noise std, up to this
    max_rotation_deg: float = 12.0
    max_scale: float = 0.12
    fov_crop_prob: float = 0.2             # chance of a partial field of view (a cut box, zero outside)


def _uniform(g: torch.Generator, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape or (1,), generator=g)


def synthesize(labels: torch.Tensor, generator: torch.Generator, cfg: SynthConfig = SynthConfig(),
               n_labels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a random-contrast image for each label map: ``(B, 1, *S)`` ints -> (image, labels).

    Returns the image (B, 1, *S) in [0, 1] and the labels it shows (moved by the same random pose,
    cut by the same field of view). The recipe, per sample:

    1. pose: a random rotation and scaling (nearest-neighbour, so labels stay labels);
    2. a Gaussian mixture: tissue ``k`` gets a mean ``mu_k ~ U(0, 1)`` and a spread ``sigma_k``;
       the background is often dark, and sometimes holds smooth random structure;
    3. resolution: a blur (partial volumes) and, sometimes, thick slices along one axis;
    4. a smooth multiplicative bias field, a random contrast curve ``x ** gamma`` and noise;
    5. sometimes a partial field of view: outside a random box the image is empty and the
       labels are background.
    """
    check_volume(labels, "labels", ndim=5)
    b, _, *shape = labels.shape
    n_labels = int(labels.max()) + 1 if n_labels is None else n_labels
    g = generator
    # 1. pose
    matrix = spatial.random_affine(b, 3, max_rotation_deg=cfg.max_rotation_deg, max_scale=cfg.max_scale,
                                   max_shear=0.0, generator=g)
    u = spatial.affine_displacement(matrix, shape)                                   # (B, 3, *S)
    labels = spatial.warp(labels.float(), u, mode="nearest").round().long()          # (B, 1, *S)
    # 2. one Gaussian per tissue: a table of means and spreads per sample, looked up per voxel
    mu = torch.rand(b, n_labels, generator=g)                                        # (B, K)
    if cfg.order:
        # increasing means: cumulative sums of random gaps, none much smaller than the others
        gaps = cfg.min_contrast + torch.rand(b, len(cfg.order) + 1, generator=g)       # (B, k + 1)
        mu[:, list(cfg.order)] = gaps.cumsum(1)[:, :-1] / gaps.sum(1, keepdim=True)
    dark = torch.rand(b, generator=g) < cfg.dark_background
    mu[:, 0] = torch.where(dark, 0.1 * mu[:, 0], mu[:, 0])                           # background
    sigma = cfg.std_max * torch.rand(b, n_labels, generator=g)
    idx = labels[:, 0].flatten(1)                                                    # (B, N)
    mean_map = torch.gather(mu, 1, idx).view(b, 1, *shape)                           # (B, 1, *S)
    std_map = torch.gather(sigma, 1, idx).view(b, 1, *shape)
    image = mean_map + std_map * torch.randn(mean_map.shape, generator=g)            # (B, 1, *S)
    out = []
    for i in range(b):
        x = image[i:i + 1]                                                           # (1, 1, *S)
        if torch.rand((), generator=g) < cfg.clutter_prob:
            # smooth blobs of other tissue where the labels say background
            clutter = spatial.smooth_random_field((1, 1, *shape), sigma_vox=float(_uniform(g, 1.0, 3.0)),
                                                  amplitude=float(_uniform(g, 0.1, 0.4)), generator=g)
            x = torch.where(labels[i:i + 1] == 0, x + clutter, x)
        # 3. resolution: blur, and sometimes thick slices along one axis
        x = spatial.gaussian_blur(x, [float(v) for v in _uniform(g, 0.0, cfg.blur_max_vox, 3)])
        if torch.rand((), generator=g) < cfg.thick_slice_prob:
            axis = int(torch.randint(3, (), generator=g))
            factor = float(_uniform(g, 1.5, cfg.thick_slice_max))
            small = list(shape)
            small[axis] = max(2, round(shape[axis] / factor))
            x = F.interpolate(F.interpolate(x, size=small, mode="trilinear", align_corners=False),
                              size=shape, mode="trilinear", align_corners=False)
        # 4. bias field (scaled so that the brightest tissue rarely saturates), contrast curve, noise
        amplitude = float(_uniform(g, 0.0, cfg.bias_max))
        bias = spatial.smooth_random_field((1, 1, *shape), sigma_vox=max(shape) / 2, amplitude=amplitude,
                                           generator=g)
        x = (x * (bias - amplitude).exp()).clamp(0.0, 1.0)
        x = x ** math.exp(float(cfg.gamma_std * torch.randn((), generator=g)))
        x = (x + float(_uniform(g, 0.0, cfg.noise_max)) * torch.randn(x.shape, generator=g)).abs().clamp(0.0, 1.0)
        out.append(x)
    image = torch.cat(out)
    # 5. partial field of view
    for i in range(b):
        if torch.rand((), generator=g) < cfg.fov_crop_prob:
            keep = torch.ones(shape, dtype=torch.bool)
            for axis, s in enumerate(shape):
                lo, hi = (int(v) for v in (_uniform(g, 0, 0.25, 2) * s))
                sl = [slice(None)] * 3
                sl[axis] = slice(0, lo)
                keep[tuple(sl)] = False
                sl[axis] = slice(s - hi, s)
                keep[tuple(sl)] = False
            image[i, 0][~keep] = 0.0
            labels[i, 0][~keep] = 0
    return image, labels


def unseen_conditions(t1: torch.Tensor, lowdose: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Test versions of T1 volumes (N, 1, *S) that differ from the training images in one way each.

    ``clean`` (as given), ``low-dose`` (the cohort's blurred, noisier copies, if given), ``thick
    slices`` (every three axial slices averaged, then resampled back), ``bias field`` (a smooth
    gain ``exp(b)``, std(b) = 0.4) and ``contrast x²`` (a new contrast curve that darkens grey
    matter towards CSF). Intensities are left unnormalised.
    """
    check_volume(t1, "t1", ndim=5)
    n, _, *shape = t1.shape
    out = {"clean": t1}
    if lowdose is not None:
        check_volume(lowdose, "lowdose", ndim=5)
        if lowdose.shape != t1.shape:
            raise ValueError(f"lowdose: shape {tuple(lowdose.shape)} differs from t1 {tuple(t1.shape)}")
        out["low-dose"] = lowdose
    thick = F.avg_pool3d(t1, kernel_size=(1, 1, 3), ceil_mode=True)                  # (N, 1, D, H, W / 3)
    out["thick slices"] = F.interpolate(thick, size=shape, mode="trilinear", align_corners=False)
    bias = spatial.smooth_random_field((n, 1, *shape), sigma_vox=shape[0] / 4, amplitude=0.4, generator=generator)
    out["bias field"] = t1 * bias.exp()
    out["contrast x²"] = t1.clamp_min(0.0) ** 2
    return out


def domain_randomize(batch: dict, generator: torch.Generator, cfg: SynthConfig = SynthConfig(),
                     p_synthetic: float = 0.5, n_labels: int = 4) -> dict:
    """A :class:`~gen3d_lessons.data.batches.CropBatches` transform: flip left-right, then
    replace a share ``p_synthetic`` of the batch by :func:`synthesize` images of the same labels.

    The real crops that remain are used as they are: normalise the whole volumes with
    :func:`normalize_intensity` *before* cropping, as :func:`predict` normalises a whole scan.
    """
    from ..data.batches import random_flip

    batch = random_flip(batch, generator)
    image, labels = batch["image"].clone(), batch["label"].clone()
    synthetic = torch.rand(image.shape[0], generator=generator) < p_synthetic
    if synthetic.any():
        image[synthetic], labels[synthetic] = synthesize(labels[synthetic], generator, cfg, n_labels)
    return {**batch, "image": image, "label": labels}


# 5. Training the segmenter that predict() uses -------------------------------------------------------

def train_brain_segmenter(images: torch.Tensor, labels: torch.Tensor, spacing_mm: float, *,
                          unet: UNetConfig = UNetConfig(in_channels=1, out_channels=4, norm="batch"),
                          init: UNet3D | None = None,
                          crop: int = 16, batch_size: int = 8, lr: float = 1e-2, p_synthetic: float = 0.5,
                          synth: SynthConfig = SynthConfig(), max_steps: int = 300, budget_s: float | None = None,
                          seed: int = 0, device: Any = None, desc: str = "brain segmenter",
                          data: Mapping[str, Any] | None = None):
    """Train a tissue segmenter with domain randomisation; returns ``(model, config, history)``.

    ``images`` (N, 1, D, H, W) are T1 volumes and ``labels`` (N, 1, D, H, W) their tissue labels
    (0-3; merge any lesion label into WM first) on a grid of ``spacing_mm`` voxels. Each volume
    is normalised whole (:func:`normalize_intensity`), then the network learns on random crops, a
    share ``p_synthetic`` of them redrawn by :func:`synthesize` (0: plain training, flips only).
    ``init``: a trained network to start from (copied, not changed); else a new ``UNet3D(unet)``.
    The learning rate follows one cycle over ``max_steps``. ``data`` says what the images are (for
    instance :func:`gen3d_lessons.tasks.yardstick.data_version` of their dataset) and is kept in
    the config, so the saved file tells which data made it. Save the result with
    :func:`save_segmenter` for :func:`predict` to use.
    """
    import copy

    from monai.losses import DiceCELoss

    from ..data.batches import CropBatches
    from ..training.segmentation import train_segmenter

    check_volume(images, "images", ndim=5)
    check_volume(labels, "labels", ndim=5)
    unet = init.cfg if init is not None else unet
    cfg = SegmenterConfig(unet=unet, spacing_mm=float(spacing_mm), data=dict(data or {}))
    if images.shape[1] != unet.in_channels:
        raise ValueError(f"images: {images.shape[1]} channels, but the network takes {unet.in_channels}")
    if labels.min() < 0 or labels.max() >= unet.out_channels:
        raise ValueError(f"labels: values in [{int(labels.min())}, {int(labels.max())}], but the network has "
                         f"{unet.out_channels} classes (0 .. {unet.out_channels - 1})")
    torch.manual_seed(seed)
    model = copy.deepcopy(init) if init is not None else UNet3D(unet)
    model = model.to(device, memory_format=torch.channels_last_3d).train()   # channels last: ~25 % faster on CPU
    batches = CropBatches(normalize_intensity(images), labels, crop=crop, batch_size=batch_size, seed=seed,
                          transform=partial(domain_randomize, cfg=synth, p_synthetic=p_synthetic,
                                            n_labels=unet.out_channels))
    history = train_segmenter(model, batches, DiceCELoss(to_onehot_y=True, softmax=True, batch=True), lr=lr,
                              max_steps=max_steps, budget_s=budget_s, desc=desc)
    return model.eval(), cfg, history


# 6. Comparing segmenters on a test set -------------------------------------------------------------

def tissue_map(labels: torch.Tensor, lesion: int = 4, tissue: int = 3) -> torch.Tensor:
    """The labels with every ``lesion`` voxel counted as ``tissue``: a lesion lies in white matter,
    so a brain's map of CSF, GM and WM (labels 0-3) calls it WM. Same shape and dtype."""
    return torch.where(labels == lesion, tissue, labels)


def score_table(preds: Mapping[str, Sequence[Any]], targets: Sequence[Any], classes: Mapping[str, int],
                spacing: Any = None, *, extra_classes: Mapping[str, Mapping[str, int]] | None = None,
                info: Mapping[str, Sequence[Any]] | None = None, by: Sequence[str] = ("model",),
                mean: str = "mean") -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """Score several segmenters on one test set: ``(scores, table)``.

    ``preds`` maps a method's name to its label maps, one (*S) per volume of ``targets``;
    ``classes`` names the labels every method is scored on, ``{"CSF": 1, ...}``, and
    ``extra_classes[name]`` adds labels for one method only (a lesion that only the networks know).
    ``scores`` holds one row per method, volume and class (columns ``model``, the ``info`` columns,
    ``class``, ``Dice``, ``HD95``, ``ASSD``; ``info`` gives one value per volume, by default
    ``case``: its index). ``table`` has one row per method (per group of ``by``) and, per class,
    the mean Dice and the *median* HD95 and ASSD (a structure that a method misses entirely has an
    infinite distance); its first column, ``("Dice", mean)``, is the mean Dice over ``classes``.
    """
    import pandas as pd

    from ..metrics.segmentation import score_segmentation

    info = {"case": range(len(targets))} if info is None else info
    extra_classes = {} if extra_classes is None else extra_classes
    for name, maps in preds.items():
        if len(maps) != len(targets):
            raise ValueError(f"preds[{name!r}]: {len(maps)} label maps for {len(targets)} targets")
    for key, values in info.items():
        if len(values) != len(targets):
            raise ValueError(f"info[{key!r}]: {len(values)} values for {len(targets)} targets")
    rows = [{"model": name, **{key: values[n] for key, values in info.items()}, **row}
            for name, maps in preds.items() for n, (p, y) in enumerate(zip(maps, targets))
            for row in score_segmentation(p, y, dict(classes) | dict(extra_classes.get(name, {})), spacing)]
    scores = pd.DataFrame(rows)
    table = scores.groupby([*by, "class"], sort=False).agg(Dice=("Dice", "mean"), HD95=("HD95", "median"),
                                                           ASSD=("ASSD", "median")).unstack("class")
    table.insert(0, ("Dice", mean), table["Dice"][list(classes)].mean(axis=1))
    return scores, table


def mean_tissue_dice(models: Mapping[str, torch.nn.Module], images: torch.Tensor, labels: Any,
                     device: Any = None) -> "pd.DataFrame":
    """Mean Dice over CSF, GM and WM of every volume, for each T1 network and for Otsu's thresholds.

    ``images`` (N, 1, *S) are T1 volumes as read (each network sees them through
    :func:`normalize_intensity`, as :func:`predict` does); ``labels`` (N, *S) their tissue maps
    (0-3). Otsu is given the true brain mask (``labels > 0``). One row per volume, one column per
    network and ``"Otsu"`` last.
    """
    import pandas as pd

    from ..baselines.segmentation import threshold_segmentation
    from ..metrics.segmentation import dice

    check_volume(images, "images", ndim=5)
    if len(labels) != len(images):
        raise ValueError(f"labels: {len(labels)} label maps for {len(images)} images")
    labels = np.asarray(labels)
    mean_dice = lambda p, t: np.nanmean(list(dice(p, t, labels=[1, 2, 3]).values()))   # noqa: E731
    out = {name: [mean_dice(p, t) for p, t in zip(predict_labels(m, normalize_intensity(images), device).numpy(), labels)]
           for name, m in models.items()}
    otsu = [mean_dice(threshold_segmentation(v[0].numpy(), t > 0), t) for v, t in zip(images, labels)]
    return pd.DataFrame(out | {"Otsu": otsu})


def agreement_table(reference: Any, labels: Any, voxel_ml: float,
                    classes: Mapping[str, int] = {"CSF": 1, "GM": 2, "WM": 3}) -> "pd.DataFrame":
    """How two label maps of one scan agree, class by class: Dice, each map's volume in mL, and the
    relative volume gap ``|labels - reference| / reference``.

    For scans without expert labels, ``reference`` is another method's answer (a classical tissue
    classifier, say): the table measures agreement with it, not accuracy.
    """
    import pandas as pd

    from ..metrics.segmentation import dice

    ref, lab = np.asarray(reference), np.asarray(labels)
    if ref.shape != lab.shape:
        raise ValueError(f"labels: shape {lab.shape} differs from the reference's {ref.shape}")
    if not voxel_ml > 0:
        raise ValueError(f"voxel_ml: expected a positive voxel volume, got {voxel_ml}")
    overlap = dice(lab, ref, labels=dict(classes))                    # NaN for a class neither map holds
    rows = {}
    for name, k in classes.items():
        ref_ml, lab_ml = float((ref == k).sum() * voxel_ml), float((lab == k).sum() * voxel_ml)
        rows[name] = {"Dice": overlap[name], "reference (mL)": ref_ml, "network (mL)": lab_ml,
                      "volume gap": abs(lab_ml - ref_ml) / ref_ml if ref_ml > 0 else float("inf")}
    return pd.DataFrame.from_dict(rows, orient="index")


def robustness_study(models: Mapping[str, torch.nn.Module], cases: Sequence[Any], images: torch.Tensor,
                     labels: Any, per_site: int = 1, device: Any = None,
                     seed: int = 0) -> tuple["pd.DataFrame", "pd.DataFrame", "pd.DataFrame"]:
    """How T1 networks hold up on test brains from every site and under :func:`unseen_conditions`.

    ``cases`` are the test records of the brain cohort (their ``site`` attribute and ``lowdose``
    copies), ``images`` (N, 1, *S) their T1 volumes and ``labels`` (N, *S) their tissue maps.
    Returns ``(clean, by_site, robust)``: :func:`mean_tissue_dice` of every test brain; its mean
    per site; and the mean over ``per_site`` brains of every site of each condition (rows ``clean``,
    ``low-dose``, ``thick slices``, ... ; columns the networks and ``Otsu``). ``seed`` draws the
    bias fields.
    """
    import pandas as pd

    from ..data.datasets import stack_cases

    if len(cases) != len(images):
        raise ValueError(f"cases: {len(cases)} records for {len(images)} images")
    if per_site < 1:
        raise ValueError(f"per_site: expected at least one brain per site, got {per_site}")
    labels = np.asarray(labels)
    sites = np.array([c.attributes["site"] for c in cases])
    clean = mean_tissue_dice(models, images, labels, device)
    by_site = clean.groupby([f"site {s}" for s in sites]).mean().rename_axis("clean test T1, by site")
    pick = np.concatenate([np.flatnonzero(sites == s)[:per_site] for s in np.unique(sites)])   # every site
    lowdose = stack_cases([cases[i] for i in pick], channels=[0], image_key="lowdose")[0]
    conditions = unseen_conditions(images[pick], lowdose, torch.Generator().manual_seed(seed))
    robust = pd.DataFrame({c: mean_tissue_dice(models, x, labels[pick], device).mean()
                           for c, x in conditions.items()}).T
    return clean, by_site, robust.rename_axis(f"mean tissue Dice, {len(pick)} test brains")


BRAIN_TISSUES = {"CSF": 1, "GM": 2, "WM": 3}
HEART_STRUCTURES = {"RV": 1, "MYO": 2, "LV": 3}
HEART_NAMES = {"RV": "right ventricle", "MYO": "myocardium", "LV": "left ventricle"}


def score_brains(models: Mapping[str, torch.nn.Module], images: torch.Tensor, labels: torch.Tensor, spacing: Any,
                 size: int, device: Any = None) -> tuple[dict[str, list[np.ndarray]], "pd.DataFrame", "pd.DataFrame"]:
    """Chapter 10's brain evaluation: the classical baselines and the networks on the test brains.

    ``images`` (N, 4, *S) with T1 first and ``labels`` (N, 1, *S) (0 background, 1-3 the tissues, 4
    lesion); ``size`` picks the cohort's template for the affine atlas. The baselines (given the
    true brain mask) run first, then every network in turn on whole volumes. Returns ``(preds,
    scores, table)``: the label maps per method and :func:`score_table` on :data:`BRAIN_TISSUES`,
    with the lesion scored for the networks only (no baseline knows what a lesion is).
    """
    from ..baselines.segmentation import tissue_baselines
    from ..data.brain import brain_template

    if images.ndim != 5 or labels.ndim != 5 or len(images) != len(labels):
        raise ValueError(f"images, labels: expected (N, C, *S) and (N, 1, *S), got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    atlas = brain_template(size)
    preds = tissue_baselines(images[:, 0].numpy(), labels[:, 0].numpy() > 0, atlas["image"][..., 0],
                             atlas["probabilities"])
    preds |= {name: list(predict_labels(model, images, device).numpy()) for name, model in models.items()}
    scores, table = score_table(preds, labels[:, 0].numpy(), BRAIN_TISSUES, spacing, mean="tissue mean",
                                extra_classes={name: {"lesion": 4} for name in models})
    return preds, scores, table


def dice_per_case(scores: "pd.DataFrame", model: str, classes: Sequence[str] | None = None,
                  by: Sequence[str] = ("case",)) -> "pd.Series":
    """One method's mean Dice per volume (per group of ``by``), over ``classes`` (None: all scored)."""
    rows = scores[scores.model == model]
    if not len(rows):
        raise ValueError(f"model: {model!r} is not among the scores' models {list(dict.fromkeys(scores.model))}")
    if classes is not None:
        rows = rows[rows["class"].isin(list(classes))]
    return rows.groupby(list(by), sort=False)["Dice"].mean()


def brain_summary(table: "pd.DataFrame", networks: Sequence[str], vox2vox: Any, vaereg: Any,
                  reference: str = "U-Net", last: int = 50) -> tuple[dict[str, Any], "pd.DataFrame"]:
    """The numbers chapter 10's text quotes from its brain table, and each network's lead.

    ``table`` is :func:`score_brains`'s, ``networks`` the rows that are networks (the others are
    baselines), ``vox2vox`` and ``vaereg`` the two continuations' histories (their means over the
    ``last`` steps). Returns ``(numbers, lead)``: ``lead`` is each network's mean Dice minus the
    best baseline's, per tissue; ``numbers`` is a flat dict ready for ``glue_values``: the
    ``reference`` network's tissue Dice (``brain_unet``) and its margin over the best baseline
    (``baseline_best``'s), its lesion Dice (``lesion_unet``), the smallest lead, the gaps of Vox2Vox and VAE-reg to the reference and how many are positive
    (``helped``), how many methods find CSF hardest (``csf_last`` of ``n_methods``), the
    discriminator's loss (``loss_d``; ``d_coin``: within 0.1 of ln 2, a coin's) and the VAE terms as a
    percentage of the segmentation loss (``vae_pct``).
    """
    networks = list(networks)
    if reference not in networks or not set(networks) <= set(table.index):
        raise ValueError(f"networks: expected rows of the table including {reference!r}, got {networks}")
    tissue_dice = table[("Dice", "tissue mean")]
    best = tissue_dice.drop(networks).max()
    dice_by = table["Dice"][list(BRAIN_TISSUES)]                                 # mean Dice, one row per method
    lead = dice_by.loc[networks] - dice_by.drop(networks).max()                   # network minus best baseline
    gaps = {name: float(tissue_dice[name] - tissue_dice[reference]) for name in ("Vox2Vox", "VAE-reg")}
    loss_d = vox2vox.mean_last("loss_d", last)
    numbers = dict(brain_unet=tissue_dice[reference], brain_margin=float(tissue_dice[reference] - best),
                   baseline_best=float(best), lesion_unet=float(table[("Dice", "lesion")][reference]),
                   min_lead=float(lead.min().min()), n_methods=len(dice_by),
                   csf_last=int((dice_by["CSF"] <= dice_by[["GM", "WM"]].min(axis=1)).sum()),
                   vox_gap=gaps["Vox2Vox"], vae_gap=gaps["VAE-reg"], helped=sum(gap > 0 for gap in gaps.values()),
                   loss_d=loss_d, d_coin=bool(abs(loss_d - np.log(2)) < 0.1),
                   vae_pct=100 * 0.1 * (vaereg.mean_last("l2", last) + vaereg.mean_last("kl", last))
                   / vaereg.mean_last("seg", last))
    return numbers, lead.rename_axis("lead over the best baseline")


def score_hearts(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, phases: Sequence[str],
                 spacing: Any, device: Any = None) -> tuple[dict[str, list[np.ndarray]], "pd.DataFrame", "pd.DataFrame"]:
    """Chapter 10's heart evaluation: the network, its largest pieces, and k-means + geometry.

    ``images`` and ``labels`` (2N, 1, *S) are the ED and ES frames of N test hearts, in pairs, and
    ``phases`` their names. Returns ``(preds, scores, table)``, :func:`score_table` on
    :data:`HEART_STRUCTURES` by model and phase, with ``case`` the heart of every frame.
    """
    from ..baselines.segmentation import heart_intensity_segmentation

    if len(images) != len(labels) or len(phases) != len(images):
        raise ValueError(f"images, labels, phases: expected one of each per frame, got {len(images)}, "
                         f"{len(labels)} and {len(phases)}")
    preds = {"U-Net": list(predict_labels(model, images, device).numpy())}
    preds["U-Net, largest pieces"] = [keep_largest_component(p) for p in preds["U-Net"]]
    preds["k-means + geometry"] = [heart_intensity_segmentation(x[0].numpy(), spacing) for x in images]
    scores, table = score_table(preds, labels[:, 0].numpy(), HEART_STRUCTURES, spacing, by=("model", "phase"),
                                info={"phase": phases, "case": [n // 2 for n in range(len(images))]})
    return preds, scores, table


def heart_summary(scores: "pd.DataFrame", model: str = "U-Net",
                  baseline: str = "k-means + geometry") -> dict[str, Any]:
    """The numbers chapter 10's text quotes from :func:`score_hearts`'s scores, a flat dict for
    ``glue_values``: the mean Dice over frames and structures of the network (``heart_unet``) and of
    the baseline, the network's margin, its hardest structure and that structure's Dice, and what
    keeping the largest pieces changes (``lcc_dice``; the median HD95 ``hd_before``, ``hd_after``).
    """
    dice = scores.groupby("model", sort=False)["Dice"].mean()                 # over frames and structures
    if model not in dice or baseline not in dice:
        raise ValueError(f"model, baseline: expected two of {list(dice.index)}, got {model!r} and {baseline!r}")
    by_class = scores[scores.model == model].groupby("class")["Dice"].mean()
    hd95 = scores.groupby("model", sort=False)["HD95"].median()
    pieces = f"{model}, largest pieces"
    return dict(heart_unet=dice[model], heart_baseline=float(dice[baseline]),
                heart_margin=float(dice[model] - dice[baseline]), heart_worst=HEART_NAMES.get(by_class.idxmin(),
                by_class.idxmin()), heart_worst_dice=by_class.min(), lcc_dice=dice[pieces] - dice[model],
                hd_before=hd95[model], hd_after=hd95[pieces])


def robustness_summary(clean: "pd.DataFrame", by_site: "pd.DataFrame", robust: "pd.DataFrame",
                       networks: Sequence[str] = ("plain", "randomised")) -> dict[str, Any]:
    """The numbers chapter 10's text quotes from :func:`robustness_study`, a flat dict for
    ``glue_values``: on how many sites (of ``n_sites``) and new conditions (of ``n_cond``) the
    second network is ahead of the first, and that share of the conditions; the clean gap; each
    network's mean tissue Dice on the brains as they are and under its worst condition; the better
    network's clean mean (``t1_best``).
    """
    first, second = networks
    ahead = (robust[second] > robust[first]).drop("clean")                       # per new condition
    worst = robust.drop("clean").min()
    return dict(sites_ahead=int((by_site[second] > by_site[first]).sum()), n_sites=len(by_site),
                clean_gap=float(clean[second].mean() - clean[first].mean()), cond_ahead=int(ahead.sum()),
                n_cond=len(ahead), share_ahead=float(ahead.mean()), ahead_any=bool(ahead.any()),
                ahead_all=bool(ahead.all()), plain_clean=robust.loc["clean", first], plain_worst=worst[first],
                rand_clean=robust.loc["clean", second], rand_worst=worst[second],
                t1_best=float(clean[list(networks)].mean().max()))
