"""The book's losses: pure functions of tensors, each returning a 0-d tensor to *minimise*
(or a per-sample tensor where a chapter needs one).

Shapes: images ``(B, C, *S)``, displacement fields ``(B, N, *S)`` in voxels (as in
:mod:`gen3d_lessons.spatial`), latent statistics ``(B, Z)``. Nothing below assumes three spatial
axes, so every function works on 2D images too.

- reconstruction and distributions: :func:`gaussian_nll` (a VAE's reconstruction term),
  :func:`kl_to_standard_normal` (the VAE's KL term, survey Eq. 7) and :func:`kl_per_voxel`
  (the same KL as the VAE-regularised U-Net weighs it);
- adversarial: :func:`discriminator_loss` / :func:`generator_loss` (non-saturating GAN, survey
  Eq. 1, and Wasserstein critic, Eq. 5), :func:`bce_discriminator_loss` / :func:`bce_generator_loss`
  (the non-saturating pair written with binary cross-entropy, as Vox2Vox does),
  :func:`gradient_penalty` (WGAN-GP, Eq. 5), :func:`l1_loss` (pix2pix, Eq. 3) and
  :func:`cycle_consistency_loss` (CycleGAN, Eq. 4); :func:`sobel_magnitude` and :func:`edge_loss`
  (Ea-GAN's edge term: the L1 distance between the Sobel gradient magnitudes of two volumes);
- similarity: :func:`mse_loss` (same contrast), :func:`ncc` / :func:`ncc_loss` (local normalised
  cross-correlation: insensitive to a local gain and offset, so it tolerates bias fields),
  :func:`global_ncc` (one gain and offset for the whole image);
- smoothness of a deformation: :func:`gradient_loss` (diffusion regulariser, mean ``|∇u|²``) and
  :func:`bending_energy` (mean squared second derivatives: penalises curvature, not stretching);
- overlap: :func:`soft_dice_loss` between label probabilities.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


# 1. Reconstruction and distributions ----------------------------------------------------------

def gaussian_nll(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``−log p(x | z)`` of a Gaussian decoder with unit variance, up to a constant: the sum over
    voxels of ``(x − x̂)² / 2`` per volume, averaged over the batch (a VAE's reconstruction term)."""
    return 0.5 * (x_hat - x).pow(2).flatten(1).sum(1).mean()


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample, (B,): 0.5 * sum(mu² + sigma² - 1 - log sigma²)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def kl_per_voxel(mu: torch.Tensor, logvar: torch.Tensor, n_voxels: int) -> torch.Tensor:
    """The batch mean of :func:`kl_to_standard_normal`, divided by ``n_voxels``: the ``L_KL`` of the
    VAE-regularised U-Net (Myronenko 2019), which weighs the KL per voxel of the input.

    The terms are summed in another order than in :func:`kl_to_standard_normal` (``− log σ² − 1``),
    which can change the last bits; chapter 10's numbers were recorded with this order.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1).mean() / n_voxels


# 2. Adversarial training ------------------------------------------------------------------------

def discriminator_loss(real_score: torch.Tensor, fake_score: torch.Tensor, kind: str) -> torch.Tensor:
    """What D minimises, from its scores on real and generated volumes (any shape, averaged)."""
    if kind == "ns":      # −log σ(D(x)) − log(1 − σ(D(G(z)))): Eq. 1, maximised by D, with its sign flipped
        return F.softplus(-real_score).mean() + F.softplus(fake_score).mean()
    if kind in ("wgan", "wgan-gp"):      # E[D(G(z))] − E[D(x)]: Eq. 5 without its penalty
        return fake_score.mean() - real_score.mean()
    raise ValueError(f"kind: expected 'ns' or 'wgan-gp', got {kind!r}")


def generator_loss(fake_score: torch.Tensor, kind: str) -> torch.Tensor:
    """What G minimises, from D's scores on its volumes: ``−log σ(D(G(z)))`` or ``−E[D(G(z))]``."""
    if kind == "ns":
        return F.softplus(-fake_score).mean()
    if kind in ("wgan", "wgan-gp"):
        return -fake_score.mean()
    raise ValueError(f"kind: expected 'ns' or 'wgan-gp', got {kind!r}")


def bce_discriminator_loss(real_score: torch.Tensor, fake_score: torch.Tensor) -> torch.Tensor:
    """The ``"ns"`` :func:`discriminator_loss` written as binary cross-entropy on logits (real → 1,
    fake → 0) and halved, as pix2pix and Vox2Vox do "to slow down the rate at which D learns"."""
    return 0.5 * (F.binary_cross_entropy_with_logits(real_score, torch.ones_like(real_score))
                  + F.binary_cross_entropy_with_logits(fake_score, torch.zeros_like(fake_score)))


def bce_generator_loss(fake_score: torch.Tensor) -> torch.Tensor:
    """The ``"ns"`` :func:`generator_loss` as binary cross-entropy: the fakes labelled real (1)."""
    return F.binary_cross_entropy_with_logits(fake_score, torch.ones_like(fake_score))


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP penalty (Gulrajani et al. 2017, their Eq. 3): ``E[(||∇_x̃ D(x̃)||₂ − 1)²]``.

    ``x̃ = ε real + (1 − ε) fake`` with one ``ε ~ U(0, 1)`` per sample, on the straight lines
    between real and generated volumes, where a 1-Lipschitz optimal critic has gradient norm 1.
    The graph is kept (``create_graph``) so that the penalty can be backpropagated into the critic.
    """
    if real.shape != fake.shape:
        raise ValueError(f"fake: shape {tuple(fake.shape)} does not match real {tuple(real.shape)}")
    # 1. random points between real and fake: eps is (B, 1, 1, 1, 1), broadcast over C, D, H, W
    eps = torch.rand((real.shape[0],) + (1,) * (real.ndim - 1), device=real.device, dtype=real.dtype)
    x_tilde = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    # 2. gradient of the critic's scores with respect to those points
    (grad,) = torch.autograd.grad(critic(x_tilde).sum(), x_tilde, create_graph=True)
    # 3. distance of each sample's gradient norm from 1
    norms = grad.flatten(1).norm(dim=1)                          # (B,)
    return ((norms - 1) ** 2).mean()


def l1_loss(target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference ``E |output − target|``: pix2pix's L1 term (survey Eq. 3)."""
    if output.shape != target.shape:
        raise ValueError(f"output: shape {tuple(output.shape)} does not match target {tuple(target.shape)}")
    return (output - target).abs().mean()


def cycle_consistency_loss(x: torch.Tensor, x_cycled: torch.Tensor) -> torch.Tensor:
    """CycleGAN's ``L_cyc`` for one direction: ``E ||F(G(x)) − x||₁``, the :func:`l1_loss` of the round trip."""
    return l1_loss(x, x_cycled)


def sobel_magnitude(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Sobel gradient magnitude of every channel of ``x`` (B, C, D, H, W), same shape.

    Along each axis the 3D Sobel operator takes the central difference ``[-1, 0, 1] / 2`` and
    smooths the two other axes with ``[1, 2, 1] / 4``; the magnitude is the root of the three
    squared responses. Edges are replicated, so the border of a volume is not an edge. Used by
    Ea-GAN (Yu et al. 2019) to make a translator keep the target's edges.
    """
    if x.ndim != 5:
        raise ValueError(f"x: expected volumes (B, C, D, H, W), got shape {tuple(x.shape)}")
    v = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")                      # (B, C, D+2, H+2, W+2)

    def smooth(u: torch.Tensor, dim: int) -> torch.Tensor:                # [1, 2, 1] / 4 along dim
        n = u.shape[dim] - 2
        return 0.25 * u.narrow(dim, 0, n) + 0.5 * u.narrow(dim, 1, n) + 0.25 * u.narrow(dim, 2, n)

    def diff(u: torch.Tensor, dim: int) -> torch.Tensor:                  # [-1, 0, 1] / 2 along dim
        n = u.shape[dim] - 2
        return 0.5 * (u.narrow(dim, 2, n) - u.narrow(dim, 0, n))

    squares = 0
    for axis in (2, 3, 4):
        g = v
        for dim in (2, 3, 4):
            g = diff(g, dim) if dim == axis else smooth(g, dim)
        squares = squares + g ** 2
    return torch.sqrt(squares + eps)


def edge_loss(target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Ea-GAN's edge term: the :func:`l1_loss` between the :func:`sobel_magnitude` of the two."""
    return l1_loss(sobel_magnitude(target), sobel_magnitude(output))


# 3. Registration: similarity, smoothness, overlap -----------------------------------------------


def _check_pair(x: torch.Tensor, y: torch.Tensor, names: tuple[str, str]) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{names[1]}: shape {tuple(y.shape)} does not match {names[0]} shape {tuple(x.shape)}")
    if x.ndim < 3:
        raise ValueError(f"{names[0]}: expected (B, C, *S) with at least one spatial axis, got {tuple(x.shape)}")


def mse_loss(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference. Right when both images share one contrast."""
    _check_pair(fixed, warped, ("fixed", "warped"))
    return F.mse_loss(warped, fixed)


def _box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum of ``x`` (B, C, *S) over a ``window``-wide cube around every voxel (zero padding), per channel.

    Separable: one 1D box filter per axis costs ``N * window`` operations per voxel, not ``window ** N``.
    """
    n = x.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    out = x.reshape(x.shape[0] * x.shape[1], 1, *x.shape[2:])            # (B*C, 1, *S): one channel at a time
    for axis in range(n):
        size = [1] * n
        size[axis] = window
        pad = [0] * n
        pad[axis] = window // 2
        out = conv(out, torch.ones(1, 1, *size, device=x.device, dtype=x.dtype), padding=tuple(pad))
    return out.reshape(x.shape)


def ncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 7, eps: float = 1e-5) -> torch.Tensor:
    """Local normalised cross-correlation, averaged over voxels: 1 for images equal up to a local gain.

    In every ``window``³ neighbourhood: ``cc = cov(f, w)² / (var(f) var(w))`` (squared, as in
    VoxelMorph, so it lies in [0, 1] and ignores the sign of the correlation).
    """
    _check_pair(fixed, warped, ("fixed", "warped"))
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window: expected an odd positive size in voxels, got {window}")
    n_vox = float(window ** (fixed.ndim - 2))
    # local sums of f, w, f², w², f·w: five box filters give all local moments
    f_sum, w_sum = _box_sum(fixed, window), _box_sum(warped, window)
    ff, ww, fw = _box_sum(fixed * fixed, window), _box_sum(warped * warped, window), _box_sum(fixed * warped, window)
    cross = fw - f_sum * w_sum / n_vox                                  # n · cov(f, w)
    f_var = (ff - f_sum * f_sum / n_vox).clamp_min(0)                   # n · var(f)
    w_var = (ww - w_sum * w_sum / n_vox).clamp_min(0)
    return (cross * cross / (f_var * w_var + eps)).mean()


def ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 7) -> torch.Tensor:
    """``1 - ncc``: 0 for images that agree up to a local gain and offset."""
    return 1.0 - ncc(fixed, warped, window)


def global_ncc(fixed: torch.Tensor, warped: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalised cross-correlation of each whole image, averaged over the batch: 1 for a perfect linear match.

    ``cc = Σ (f − f̄)(w − w̄) / (‖f − f̄‖ ‖w − w̄‖)`` over all of a (C, *S) image, signed (−1 for an
    inverted contrast): one gain and offset for the whole image, unlike the windowed :func:`ncc`.
    Right for a global (affine) map between images of different intensity scales.
    """
    _check_pair(fixed, warped, ("fixed", "warped"))
    values = []
    for f, w in zip(fixed, warped):                                     # one (C, *S) pair at a time
        f, w = f - f.mean(), w - w.mean()
        values.append((f * w).sum() / (f.norm() * w.norm() + eps))
    return torch.stack(values).mean()


def _check_field(u: torch.Tensor) -> int:
    if u.ndim < 3 or u.shape[1] != u.ndim - 2:
        raise ValueError(f"displacement: expected (B, N, *S) with N = number of spatial axes, got {tuple(u.shape)}")
    return u.ndim - 2


def gradient_loss(u: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser ``mean |∇u|²`` by forward differences (VoxelMorph's smoothness term)."""
    n = _check_field(u)
    return sum(torch.diff(u, dim=d).pow(2).mean() for d in range(2, n + 2)) / n


def bending_energy(u: torch.Tensor) -> torch.Tensor:
    """Mean of all squared second derivatives ``∂²u/∂x_i∂x_j``: zero for any affine map.

    Unlike :func:`gradient_loss` it does not resist a uniform stretch (an affine part), only bending.
    """
    n = _check_field(u)
    total = 0.0
    for i in range(2, n + 2):
        first = torch.diff(u, dim=i)
        for j in range(i, n + 2):
            weight = 1.0 if i == j else 2.0                              # the mixed terms appear twice
            total = total + weight * torch.diff(first, dim=j).pow(2).mean()
    return total / (n * n)


def soft_dice_loss(target: torch.Tensor, warped: torch.Tensor, eps: float = 1e-5,
                   include_background: bool = False) -> torch.Tensor:
    """``1 - mean over classes of 2 Σ p q / (Σ p + Σ q)`` for label probabilities (B, K, *S).

    ``target`` is usually one-hot, ``warped`` the moving image's one-hot labels (or tissue
    probabilities) pulled through the deformation with linear interpolation, hence soft.
    """
    _check_pair(target, warped, ("target", "warped"))
    dims = tuple(range(2, target.ndim))
    inter = (target * warped).sum(dims)                                 # (B, K)
    denom = target.sum(dims) + warped.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    if not include_background:
        dice = dice[:, 1:]
    return 1.0 - dice.mean()
