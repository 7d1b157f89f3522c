"""Metrics: how each chapter measures its results. Pure functions, one number (or one per class).

Every function takes NumPy arrays or torch tensors (on any device) and returns Python floats,
or a dict ``{label: float}`` for per-class segmentation metrics. Argument order follows the
book: ``pred`` / ``x`` is what a model produced, ``target`` / ``y`` is the reference. One module
per task:

- :mod:`~gen3d_lessons.metrics.image`: intensity agreement of volumes — :func:`psnr`, :func:`ssim`,
  :func:`rmse`, :func:`nmse`, and a denoiser's :func:`scores`, :func:`detail_scores`, :func:`added_detail`;
- :mod:`~gen3d_lessons.metrics.segmentation`: overlap and surface distance of label maps —
  :func:`dice`, :func:`hd95`, :func:`assd` (from MONAI's boundary distances), :func:`score_segmentation`;
- :mod:`~gen3d_lessons.metrics.generative`: are generated volumes like real ones, diverse, new? —
  :func:`frechet_distance`, :func:`kid`, :func:`mmd`, :func:`one_nn_accuracy`, :func:`ms_ssim`,
  :func:`memorisation`;
- :mod:`~gen3d_lessons.metrics.detection`: anomaly maps against lesion masks — :func:`voxel_metrics`
  (AUROC, AUPRC, best Dice), :func:`volume_scores`, and ``detection.evaluate`` (all four numbers);
- :mod:`~gen3d_lessons.metrics.checks`: the input checks they share.

Bad input (shapes that differ, NaN, a label map of fractions) raises ``ValueError`` naming the
argument, because a metric silently computed on the wrong thing is worse than none.
"""

from .detection import best_dice, volume_scores, voxel_metrics
from .generative import (MS_SSIM_WEIGHTS, frechet_distance, kid, memorisation, memorisation_passed, mmd,
                         mmd2_unbiased, ms_ssim, ms_ssim_diversity, one_nn_accuracy)
from .image import added_detail, detail_scores, line_profile, mean_scores, nmse, psnr, rmse, scores, ssim, ssim_map
from .segmentation import assd, dice, hd95, score_segmentation, surface_distances

__all__ = ["psnr", "ssim", "ssim_map", "rmse", "nmse", "scores", "mean_scores", "detail_scores", "added_detail",
           "line_profile", "dice", "hd95", "assd", "surface_distances", "score_segmentation", "frechet_distance",
           "kid", "mmd", "mmd2_unbiased", "one_nn_accuracy", "MS_SSIM_WEIGHTS", "ms_ssim", "ms_ssim_diversity",
           "memorisation", "memorisation_passed", "voxel_metrics", "volume_scores", "best_dice"]

from .image import reconstruction_scores, reconstruction_table  # noqa: E402  (chapter 4)

__all__ += ["reconstruction_scores", "reconstruction_table"]
