"""The autoregressive family: 3D PixelCNN (masks, causality, cached sampling, baselines), VQ-VAE and
the code transformer (shapes, causality, KV-cached sampling), their step functions, bad input."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from gen3d_lessons.models.pixelcnn import (ALPHAS, MaskedConv3d, PixelCNN3D, PixelCNNConfig, VoxelHistogram,
                                           causal_mask, dequantise, quantise, receptive_field, uniform_nll_bits,
                                           validated_histogram)
from gen3d_lessons.models.vqvae import (CodeTransformer, TransformerConfig, VQVAE3D, VQVAEConfig, to_grid,
                                        to_sequence)
from gen3d_lessons.training import fit, load_model, save_model
from gen3d_lessons.training.autoregressive import code_grids, pixelcnn_step, transformer_step, vqvae_step

L = 4


def _pixelcnn(**kw) -> PixelCNN3D:
    torch.manual_seed(0)
    return PixelCNN3D(PixelCNNConfig(**{"levels": L, "channels": 8, "n_layers": 3, **kw}))


def _raster_index(shape) -> torch.Tensor:
    return torch.arange(math.prod(shape)).view(*shape)


# 1. masks and causality -------------------------------------------------------------------------

def test_masks_keep_the_taps_before_the_centre_in_raster_order():
    a, b = causal_mask(3, "A"), causal_mask(3, "B")
    order = _raster_index((3, 3, 3))
    assert torch.equal(a.bool(), order < 13) and torch.equal(b.bool(), order <= 13)
    assert a.sum() == 13 and b.sum() == 14
    with pytest.raises(ValueError, match="kind"):
        causal_mask(3, "C")
    with pytest.raises(ValueError, match="odd"):
        causal_mask(4, "A")


def test_masked_conv_ignores_the_centre_and_later_voxels():
    torch.manual_seed(0)
    conv = MaskedConv3d(1, 2, 3, "A")
    x = torch.zeros(1, 1, 5, 5, 5)
    x[0, 0, 2, 2, 2:] = 1.0                                    # the centre voxel and those after it in its row
    x[0, 0, 3] = 1.0                                          # the next plane
    y0 = conv(torch.zeros_like(x))[0, :, 2, 2, 2]
    assert torch.allclose(conv(x)[0, :, 2, 2, 2], y0)


@pytest.mark.parametrize("voxel", [(2, 2, 2), (0, 0, 1), (3, 0, 4), (4, 4, 4)])
def test_no_output_voxel_depends_on_itself_or_later_voxels(voxel):
    model = _pixelcnn(n_layers=4, shape=(5, 5, 5))          # with a position prior: still causal
    shape = (5, 5, 5)
    seen = receptive_field(model, shape, voxel)                # gradient of the logits at voxel w.r.t. input
    order = _raster_index(shape)
    assert not seen[order >= order[voxel]].any()
    if voxel != (0, 0, 1):
        assert seen.sum() > 13                                 # stacking grew the view beyond one layer's


def test_receptive_field_shows_the_blind_spot_of_the_current_plane():
    model = _pixelcnn(n_layers=4)
    seen = receptive_field(model, (6, 6, 9), (3, 3, 4))
    assert seen[3, 2, 5] and not seen[3, 2, 6]                 # one row up: one column right, not two
    assert seen[2, 2, 7]                                        # one plane back, one row up: three columns right


def test_first_voxel_prediction_is_the_same_for_every_volume():
    model = _pixelcnn().eval()
    torch.nn.init.normal_(model.head[-1].weight)
    x = torch.randint(0, L, (3, 1, 4, 4, 4))
    logits = model(x)
    assert logits.shape == (3, L, 4, 4, 4)
    assert torch.allclose(logits[0, :, 0, 0, 0], logits[1, :, 0, 0, 0])


# 2. likelihood and sampling ----------------------------------------------------------------------

def test_nll_is_in_bits_and_matches_the_log_softmax():
    model = _pixelcnn().eval()
    x = torch.randint(0, L, (2, 1, 4, 4, 4))
    nll = model.nll_bits(x)
    logp = model(x).log_softmax(1).gather(1, x)                # (B, 1, D, H, W)
    assert nll.shape == (2,)
    assert torch.allclose(nll, -logp.flatten(1).mean(1) / math.log(2), atol=1e-6)
    assert model.voxel_nll(x).shape == (2, 1, 4, 4, 4)


def test_cached_sampler_computes_the_same_logits_as_the_full_network():
    model = _pixelcnn(n_layers=3).eval()
    torch.nn.init.normal_(model.head[-1].weight)              # the last layer starts at zero
    levels, logits = model._generate(2, (3, 4, 5), torch.Generator().manual_seed(1))
    assert levels.shape == (2, 1, 3, 4, 5) and levels.dtype == torch.long
    assert torch.allclose(model(levels), logits, atol=1e-5)
    again = model.sample(2, (3, 4, 5), torch.Generator().manual_seed(1))
    assert torch.equal(levels, again)


def test_pixelcnn_learns_a_constant_volume_and_samples_it():
    model = _pixelcnn()
    x = torch.full((4, 1, 4, 4, 4), 2, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    history = fit(partial(pixelcnn_step, model=model, optimizer=opt), [{"levels": x}], max_steps=60)
    assert history.values["bits_per_voxel"][-1] < 0.1 < history.values["bits_per_voxel"][0]
    assert (model.sample(2, (4, 4, 4), torch.Generator().manual_seed(0)) == 2).float().mean() > 0.9


def test_an_untrained_pixelcnn_with_a_prior_is_the_histogram_baseline():
    train = torch.randint(0, L, (6, 1, 3, 4, 5))
    hist = VoxelHistogram(L, alpha=0.5).fit(train)
    model = _pixelcnn(shape=(3, 4, 5)).set_prior(hist)
    x = torch.randint(0, L, (2, 1, 3, 4, 5))
    assert torch.allclose(model.nll_bits(x), hist.nll_bits(x), atol=1e-5)
    torch.nn.init.normal_(model.head[-1].weight)              # a model that uses its context
    levels, logits = model._generate(2, (3, 4, 5), torch.Generator().manual_seed(0))
    assert torch.allclose(model(levels), logits, atol=1e-5)
    assert model.sample(1).shape == (1, 1, 3, 4, 5)           # the prior's grid by default
    with pytest.raises(ValueError, match="prior's grid"):
        model(torch.zeros(1, 1, 4, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="do not fit"):
        model.set_prior(VoxelHistogram(L).fit(torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)))


def test_gradients_reach_every_parameter():
    model = _pixelcnn()
    model.nll_bits(torch.randint(0, L, (2, 1, 4, 4, 4))).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_save_and_load_round_trip(tmp_path):
    model = _pixelcnn(shape=(4, 4, 4)).set_prior(VoxelHistogram(L).fit(torch.randint(0, L, (3, 1, 4, 4, 4))))
    torch.nn.init.normal_(model.head[-1].weight)
    path = save_model(tmp_path / "pixelcnn.pt", model.eval(), model.cfg)
    again = load_model(path, lambda c: PixelCNN3D(PixelCNNConfig(**c)))
    x = torch.randint(0, L, (1, 1, 4, 4, 4))
    assert torch.allclose(model(x), again(x))


# 3. quantisation and baselines -------------------------------------------------------------------

def test_quantise_and_dequantise():
    x = torch.tensor([-0.5, 0.0, 0.24, 0.26, 0.99, 1.0, 3.0]).view(1, 1, 1, 1, 7)
    k = quantise(x, 4)
    assert k.dtype == torch.long and k.flatten().tolist() == [0, 0, 0, 1, 3, 3, 3]
    assert torch.allclose(dequantise(k, 4).flatten()[:4], torch.tensor([0.125, 0.125, 0.125, 0.375]))
    with pytest.raises(ValueError, match="finite"):
        quantise(torch.full((1, 1, 2, 2, 2), float("nan")), 4)
    with pytest.raises(ValueError, match="levels"):
        dequantise(torch.tensor([4]), 4)


def test_histogram_baseline_counts_with_laplace_smoothing():
    train = torch.zeros(3, 1, 2, 2, 2, dtype=torch.long)
    train[0, 0, 0, 0, 0] = 1
    hist = VoxelHistogram(levels=2, alpha=1.0).fit(train)
    x = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    nll = hist.voxel_nll(x)[0, 0]
    assert math.isclose(nll[0, 0, 0].item(), -math.log2(3 / 5), rel_tol=1e-5)       # (2 + 1) / (3 + 2)
    assert math.isclose(nll[1, 1, 1].item(), -math.log2(4 / 5), rel_tol=1e-5)
    unseen = torch.ones(1, 1, 2, 2, 2, dtype=torch.long)                             # never seen at (1, 1, 1)
    assert math.isfinite(hist.nll_bits(unseen).item())
    assert hist.sample(5, torch.Generator().manual_seed(0)).shape == (5, 1, 2, 2, 2)
    assert uniform_nll_bits(8) == 3.0


def test_validated_histogram_chooses_alpha_on_the_validation_volumes_then_counts_all():
    torch.manual_seed(0)
    x = torch.randint(0, L, (10, 1, 3, 3, 3))
    x[:, :, 0] = 1                                             # one plane always at level 1: little smoothing wins
    val = torch.arange(10) % 5 == 0
    hist, scores = validated_histogram(x, L, validation=val, alphas=(2.0, 0.5, 0.05))
    assert list(scores) == [2.0, 0.5, 0.05]
    for a, bits in scores.items():                             # each score: counted without, scored on, the validation
        assert bits == VoxelHistogram(L, a).fit(x[~val]).nll_bits(x[val]).mean().item()
    best = min(scores, key=scores.get)
    assert hist.alpha == best and torch.equal(hist.log_p, VoxelHistogram(L, best).fit(x).log_p)   # then all of x
    assert validated_histogram(x, L, validation=val)[1].keys() == set(ALPHAS)


def test_validated_histogram_rejects_bad_input():
    x = torch.zeros(4, 1, 2, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="bool mask"):
        validated_histogram(x, L, validation=torch.tensor([0, 1, 0, 0]))
    with pytest.raises(ValueError, match="bool mask"):
        validated_histogram(x, L, validation=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="at least one"):
        validated_histogram(x, L, validation=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="alphas"):
        validated_histogram(x, L, validation=torch.tensor([True, False, False, False]), alphas=())
    with pytest.raises(ValueError, match="integer levels"):
        validated_histogram(x.float(), L, validation=torch.tensor([True, False, False, False]))


def test_receptive_field_figure_draws_the_planes_up_to_the_voxel():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from gen3d_lessons.viz import plot_receptive_field

    seen = receptive_field(_pixelcnn(n_layers=3), (6, 6, 6), (3, 3, 3))
    fig = plot_receptive_field(seen, (3, 3, 3), radius=2)
    assert isinstance(fig, Figure) and [a.get_title() for a in fig.axes] == ["plane d-2", "plane d-1", "current plane d"]
    assert fig.axes[2].images[0].get_array().shape == (5, 5)   # ± radius around (h, w)
    edge = plot_receptive_field(seen, (1, 0, 5), radius=3, planes=2)   # crops stay inside the volume
    assert len(edge.axes) == 2 and edge.axes[1].images[0].get_array().shape == (4, 4)
    for bad in (dict(voxel=(6, 0, 0)), dict(voxel=(0, 0)), dict(voxel=(1, 1, 1), planes=3), dict(voxel=(1, 1, 1), radius=-1)):
        with pytest.raises(ValueError):
            plot_receptive_field(seen, **{"radius": 2, **bad})
    with pytest.raises(ValueError, match="D, H, W"):
        plot_receptive_field(seen[0], (0, 0))


# 4. VQ-VAE and code transformer -------------------------------------------------------------------

def test_vqvae_step_and_codes():
    torch.manual_seed(0)
    vq = VQVAE3D(VQVAEConfig(channels=(8, 8), num_embeddings=8, embedding_dim=4, groups=4))
    x = torch.rand(2, 1, 8, 8, 8)
    out = vqvae_step({"image": x}, 0, model=vq, optimizer=torch.optim.Adam(vq.parameters(), 1e-3))
    assert set(out) == {"loss", "mse", "commitment"}
    k = vq.eval().codes(x)
    assert k.shape == (2, 2, 2, 2) and vq.decode_codes(k).shape == x.shape
    with pytest.raises(ValueError, match="multiples"):
        vq.encode(torch.rand(1, 1, 7, 8, 8))


def test_code_grids_are_the_codes_of_the_volumes_and_their_mirror_images():
    torch.manual_seed(0)
    vq = VQVAE3D(VQVAEConfig(channels=(8, 8), num_embeddings=8, embedding_dim=4, groups=4)).eval()
    x = torch.rand(3, 1, 8, 8, 8)
    k = code_grids(vq, x)
    assert k.shape == (3, 2, 2, 2) and k.dtype == torch.long and k.device.type == "cpu"
    assert torch.equal(k, vq.codes(x))
    both = code_grids(vq, x, mirror=True)                      # the volumes, then their mirror images
    assert both.shape == (6, 2, 2, 2) and torch.equal(both[:3], k) and torch.equal(both[3:], vq.codes(x.flip(2)))
    with pytest.raises(ValueError, match=r"\(N, C, D, H, W\)"):
        code_grids(vq, x[0])


def test_vqvae_and_transformer_save_and_load(tmp_path):
    torch.manual_seed(0)
    vq = VQVAE3D(VQVAEConfig(channels=(8, 8), num_embeddings=8, embedding_dim=4, groups=4)).eval()
    again = load_model(save_model(tmp_path / "vq.pt", vq, vq.cfg), lambda c: VQVAE3D(VQVAEConfig(**c)))
    x = torch.rand(1, 1, 8, 8, 8)
    assert torch.equal(vq.codes(x), again.codes(x))
    tf = _transformer()
    tf2 = load_model(save_model(tmp_path / "tf.pt", tf, tf.cfg), lambda c: CodeTransformer(TransformerConfig(**c)))
    s = torch.randint(0, 6, (2, 8))
    assert torch.allclose(tf(s), tf2(s))


def _transformer(**kw) -> CodeTransformer:
    torch.manual_seed(0)
    return CodeTransformer(TransformerConfig(**{"vocab_size": 6, "block_size": 8, "n_layer": 2, "n_head": 2,
                                                "n_embd": 16, **kw})).eval()


def test_transformer_is_causal():
    tf = _transformer()
    s = torch.randint(0, 6, (1, 8))
    s2 = s.clone()
    s2[0, 5:] = (s2[0, 5:] + 1) % 6                          # change positions 5..7
    assert torch.allclose(tf(s)[0, :6], tf(s2)[0, :6], atol=1e-6)   # logits 0..5 predict codes 0..5
    assert not torch.allclose(tf(s)[0, 6:], tf(s2)[0, 6:])


def test_kv_cached_sampling_matches_the_full_forward():
    tf = _transformer()
    s = tf.sample(3, torch.Generator().manual_seed(0))
    assert s.shape == (3, 8) and s.min() >= 0 and s.max() < 6
    # the cached sampler drew s[:, t] from p(. | s_<t): replay it with an explicit multinomial
    g = torch.Generator().manual_seed(0)
    p = tf(s).softmax(-1)                                      # (3, 8, 6)
    replay = torch.stack([torch.multinomial(p[:, t], 1, generator=g).squeeze(1) for t in range(8)], 1)
    assert torch.equal(replay, s)
    bits = tf.nll_bits(s)
    assert bits.shape == (3,) and torch.all(bits > 0)


def test_transformer_step_reduces_the_loss():
    tf = _transformer()
    codes = torch.arange(8).remainder(6).view(1, 2, 2, 2).repeat(4, 1, 1, 1)
    opt = torch.optim.Adam(tf.parameters(), 1e-2)
    history = fit(partial(transformer_step, model=tf, optimizer=opt), [{"codes": codes}], max_steps=30)
    assert history.values["loss"][-1] < 0.5 * history.values["loss"][0]
    assert torch.equal(to_grid(to_sequence(codes), (2, 2, 2)), codes)


# 5. bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (torch.zeros(1, 4, 4, 4, dtype=torch.long), "2D image"),               # no channel axis
    (torch.zeros(1, 2, 4, 4, 4, dtype=torch.long), r"\(B, 1, D, H, W\)"),  # two channels
    (torch.zeros(1, 1, 4, 4, 4), "integer levels"),                        # floats
    (torch.full((1, 1, 4, 4, 4), L, dtype=torch.long), "levels must lie"),  # out of range
    (torch.full((1, 1, 4, 4, 4), -1, dtype=torch.long), "levels must lie"),
])
def test_pixelcnn_rejects_bad_levels(bad, match):
    with pytest.raises(ValueError, match=match):
        _pixelcnn()(bad)


def test_bad_input_elsewhere():
    with pytest.raises(ValueError, match="fit"):
        VoxelHistogram(4).nll_bits(torch.zeros(1, 1, 2, 2, 2, dtype=torch.long))
    hist = VoxelHistogram(4).fit(torch.zeros(2, 1, 2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="spatial shape"):
        hist.nll_bits(torch.zeros(1, 1, 3, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        _pixelcnn().sample(1, (4, 4))
    with pytest.raises(ValueError, match="shape"):
        _pixelcnn().sample(1)                                  # no prior: the size must be given
    with pytest.raises(ValueError, match="integer codes"):
        _transformer()(torch.full((1, 8), 6))
    with pytest.raises(ValueError, match="levels"):
        pixelcnn_step({"image": torch.zeros(1, 1, 4, 4, 4)}, 0, model=_pixelcnn(), optimizer=None)
    with pytest.raises(ValueError, match="codes"):
        transformer_step({"image": torch.zeros(1, 1, 4, 4, 4)}, 0, model=_transformer(), optimizer=None)
