"""The shared building blocks: layer layouts (they name saved weights), shapes, checks, helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gen3d_lessons.blocks import (ConvBlock3d, PatchDiscriminator3D, PatchDiscriminatorConfig, PixelNorm,
                                  check_condition, check_pyramid, check_volumes, conv_norm_act, count_parameters,
                                  down, norm, one_hot, sample_from_prior, up)


def test_norm_builds_each_kind_and_rejects_others():
    assert isinstance(norm("instance", 4), nn.InstanceNorm3d) and norm("instance", 4).affine
    assert isinstance(norm("batch", 4), nn.BatchNorm3d)
    g = norm("group", 8, groups=2)
    assert isinstance(g, nn.GroupNorm) and g.num_groups == 2
    assert isinstance(norm("pixel", 4), PixelNorm)
    assert isinstance(norm("none", 4), nn.Identity)
    with pytest.raises(ValueError, match="groups"):
        norm("group", 8)
    with pytest.raises(ValueError, match="expected one of"):
        norm("layer", 8)


def test_pixel_norm_gives_unit_mean_square_per_voxel():
    x = torch.randn(2, 5, 3, 3, 3) * 7
    assert torch.allclose(PixelNorm()(x).pow(2).mean(1), torch.ones(2, 3, 3, 3), atol=1e-5)


def test_conv_norm_act_layout_and_shapes():
    block = conv_norm_act(2, 8, 4, stride=2, norm="group", groups=4)
    assert [type(m) for m in block] == [nn.Conv3d, nn.GroupNorm, nn.SiLU]      # indices 0, 1, 2 name the weights
    assert block(torch.zeros(1, 2, 8, 8, 8)).shape == (1, 8, 4, 4, 4)
    plain = conv_norm_act(2, 3, act=nn.LeakyReLU(0.2), bias=False)
    assert isinstance(plain[1], nn.Identity) and plain[0].bias is None and plain[2].negative_slope == 0.2
    t = conv_norm_act(4, 2, 2, stride=2, padding=0, transposed=True, norm="batch")
    assert isinstance(t[0], nn.ConvTranspose3d) and t(torch.zeros(2, 4, 3, 3, 3)).shape == (2, 2, 6, 6, 6)


def test_down_and_up_halve_and_double_the_edge():
    x = torch.randn(2, 1, 8, 8, 8)
    h = down(1, 4, groups=2)(x)
    assert h.shape == (2, 4, 4, 4, 4)
    assert up(4, 4, groups=2)(h).shape == (2, 4, 8, 8, 8)
    last = up(4, 1, None)
    assert len(last) == 1 and last(h).shape == (2, 1, 8, 8, 8)                  # the output layer: conv alone
    assert list(dict(down(1, 4, 2).named_parameters())) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_conv_block_keeps_its_indices_for_every_norm():
    names = {k: list(dict(ConvBlock3d(2, 4, k).named_parameters())) for k in ("instance", "batch", "none")}
    assert names["instance"] == ["0.weight", "1.weight", "1.bias", "3.weight", "4.weight", "4.bias"]
    assert names["none"] == ["0.weight", "0.bias", "3.weight", "3.bias"]          # Identity keeps index 1
    assert isinstance(ConvBlock3d(2, 4, dropout=0.1)[-1], nn.Dropout3d)
    assert ConvBlock3d(2, 4)(torch.randn(1, 2, 4, 4, 4)).shape == (1, 4, 4, 4, 4)


def test_patch_discriminator_scores_patches():
    d = PatchDiscriminator3D(PatchDiscriminatorConfig(in_channels=1 + 3, features=(4, 8)))
    out = d(torch.randn(2, 1, 16, 16, 16), torch.rand(2, 3, 16, 16, 16))
    assert out.shape == (2, 1, 4, 4, 4)
    assert isinstance(d.net[1], nn.Identity) and isinstance(d.net[4], nn.InstanceNorm3d)   # none on the first layer
    with pytest.raises(ValueError, match="positive"):
        PatchDiscriminatorConfig(in_channels=0)


def test_check_condition():
    check_condition(None, 2, 0, "generator")
    check_condition(torch.zeros(2, 3), 2, 3, "generator")
    with pytest.raises(ValueError, match="cond_dim=0"):
        check_condition(torch.zeros(2, 3), 2, 0, "generator")
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        check_condition(torch.zeros(3, 3), 2, 3, "critic")
    with pytest.raises(ValueError, match="NaN"):
        check_condition(torch.full((2, 3), float("nan")), 2, 3, "generator")


class _Echo(nn.Module):
    """A 'generator' that returns its code, to see what sample_from_prior feeds it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, z, c=None):
        assert not self.training and not torch.is_grad_enabled()
        return z if c is None else torch.cat([z, c], 1)


def test_sample_from_prior_is_reproducible_and_restores_the_mode():
    g = _Echo().train()
    a = sample_from_prior(g, 3, 5, generator=torch.Generator().manual_seed(0))
    b = sample_from_prior(g, 3, 5, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 5) and torch.equal(a, b) and g.training
    assert sample_from_prior(g, 2, 4, torch.ones(2, 1)).shape == (2, 5)
    with pytest.raises(ValueError, match="positive number"):
        sample_from_prior(g, 0, 5)


def test_checks_of_pyramids_and_volumes():
    check_pyramid("cfg", (8, 16), 8, 32)
    with pytest.raises(ValueError, match="groups=3"):
        check_pyramid("cfg", (8, 16), 3, 32)
    with pytest.raises(ValueError, match="multiple"):
        check_pyramid("cfg", (8, 16), 8, 6)
    check_volumes(torch.zeros(2, 1, 4, 4, 4), 1, 4)
    for bad, match in ((torch.zeros(2, 1, 4, 4), "shape"), (torch.zeros(2, 1, 4, 4, 4, dtype=torch.long), "floating"),
                       (torch.full((1, 1, 4, 4, 4), float("inf")), "infinite"), ([0.0], "torch.Tensor")):
        with pytest.raises(ValueError, match=match):
            check_volumes(bad, 1, 4)


def test_one_hot_and_count_parameters():
    labels = torch.tensor([0, 2, 1, 2]).view(1, 1, 4)                           # (B, 1, *S), any number of axes
    oh = one_hot(labels, 3)
    assert oh.dtype == torch.float32 and oh.shape == (1, 3, 4)
    assert torch.equal(oh.argmax(1), labels[:, 0]) and torch.equal(oh.sum(1), torch.ones(1, 4))
    assert one_hot(torch.zeros(2, 1, 2, 2, 2, dtype=torch.int32), 4).shape == (2, 4, 2, 2, 2)
    lin = nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    assert count_parameters(lin) == 6                                             # trainable only


def test_models_import_blocks_and_no_private_names():
    """Model files share code through blocks; none reaches into another module's private names."""
    import ast
    from pathlib import Path

    import gen3d_lessons

    models = Path(gen3d_lessons.__file__).parent / "models"
    allowed = {"blocks", "profiles", "progress", "spatial"}   # the last three: dry-run caps, bars, warps
    for path in sorted(models.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                where = f"{path.name}: from {'.' * node.level}{node.module or ''}"
                assert not any(a.name.startswith("_") for a in node.names), where
                targets = [node.module] if node.module else [a.name for a in node.names]   # from .. import spatial
                assert node.level == 1 or all(t.split(".")[0] in allowed for t in targets), where
