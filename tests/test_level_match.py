"""representations.lib.level_match and DMTet's ``init_level: silhouette``: hand-made rays with
an exact best cut, and a Gaussian blob whose matching level is known in closed form."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engine.errors import ConfigError
from representations.dmtet import DMTet
from representations.lib.encodings import HashGridConfig
from representations.lib.level_match import best_silhouette_level, silhouette_level
from representations.lib.fields import ColorField

SMALL_GRID = dict(n_levels=2, n_features=2, log2_table_size=10, base_resolution=4,
                  per_level_scale=2.0, backend="torch")


class GaussianBlob(nn.Module):
    """density = amplitude * exp(-|x|^2 / s^2): along a line passing the centre at distance
    b the integral is amplitude * s sqrt(pi) exp(-b^2 / s^2) and the peak amplitude *
    exp(-b^2 / s^2), so opacity 0.5 (integral ln 2) is reached exactly where the peak is
    ln 2 / (s sqrt(pi)), for every amplitude."""

    def __init__(self, amplitude: float, s: float = 0.3, isosurface_threshold: float = 10.0):
        super().__init__()
        self.amplitude, self.s = amplitude, s
        self.cfg = SimpleNamespace(radius=1.0, isosurface_threshold=isosurface_threshold)
        self.color_field = ColorField(HashGridConfig(**SMALL_GRID), hidden=8, bound=1.0)

    def density(self, points):
        return self.amplitude * torch.exp(-(points * points).sum(-1) / self.s ** 2)

    def level(self) -> float:
        return math.log(2.0) / (self.s * math.sqrt(math.pi))

    def silhouette_radius(self) -> float:
        """Where the opacity is 0.5: b with amplitude s sqrt(pi) exp(-b^2/s^2) = ln 2."""
        return self.s * math.sqrt(math.log(self.amplitude * self.s * math.sqrt(math.pi)
                                           / math.log(2.0)))


def _dmtet_cfg(**kw):
    base = dict(resolution=32, init_shape="none", init_clamp=0.0, color_hidden=16,
                color=HashGridConfig(**SMALL_GRID), marching_backend="torch",
                raster_backend="torch")
    base.update(kw)
    return DMTet.Config(**base)


def test_best_cut_on_hand_made_rays():
    # peaks fall ray by ray; opaque rays are the 1st, 2nd and 4th. Taking in the top k rays
    # scores IoU 1/3, 2/3, 2/4, 3/4, 3/5: the best takes four, cutting between peaks 2 and 1
    opacity = torch.tensor([0.9, 0.8, 0.2, 0.7, 0.1])
    peak = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    match = best_silhouette_level(opacity, peak)
    assert match.level == pytest.approx(1.5)
    assert match.iou == pytest.approx(0.75)
    assert (match.rays, match.opaque) == (5, 3)
    # the order of the rays does not matter
    perm = torch.tensor([3, 0, 4, 2, 1])
    assert best_silhouette_level(opacity[perm], peak[perm]).level == pytest.approx(1.5)


def test_rays_of_equal_peak_enter_together():
    # no level separates two rays of peak 3, so the only cut takes both (IoU 1/2)
    match = best_silhouette_level(torch.tensor([0.9, 0.1]), torch.tensor([3.0, 3.0]))
    assert match.level == pytest.approx(1.5)
    assert match.iou == pytest.approx(0.5)


def test_ties_in_iou_go_to_the_higher_level():
    # opaque: the 1st and 4th of four. Top-1 scores 1/2, top-2 1/3, top-3 1/4, top-4 2/4:
    # top-1 and top-4 tie and the higher cut (between peaks 4 and 3) wins
    match = best_silhouette_level(torch.tensor([0.9, 0.1, 0.1, 0.9]),
                                  torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert match.level == pytest.approx(3.5)
    assert match.iou == pytest.approx(0.5)


def test_nothing_opaque_has_no_level():
    assert best_silhouette_level(torch.tensor([0.2, 0.4]), torch.tensor([3.0, 1.0])) is None
    blob = GaussianBlob(amplitude=0.01)
    assert silhouette_level(blob.density, radius=1.0) is None


@pytest.mark.parametrize("amplitude", [20.0, 80.0])
def test_gaussian_blob_level_is_the_closed_form(amplitude):
    blob = GaussianBlob(amplitude)
    # 96 px: fine enough that the gap between neighbouring rays' peaks, where the cut falls,
    # is under 1% of the level (at the default 32 px it is ~5%, under a DMTet cell in radius)
    match = silhouette_level(blob.density, radius=1.0, size=96)
    assert match.level == pytest.approx(blob.level(), rel=0.01)   # 1.30 for either amplitude
    assert match.iou > 0.99


def test_dmtet_starts_from_the_matched_level(capsys):
    blob = GaussianBlob(amplitude=20.0)      # opacity 0.5 at radius 0.50; level 10 at 0.25
    fixed = DMTet.create_from(blob, _dmtet_cfg())
    matched = DMTet.create_from(blob, _dmtet_cfg(init_level="silhouette"))
    assert fixed.start_level == 10.0 and fixed.start_match is None
    assert matched.start_level == pytest.approx(blob.level(), rel=0.1)
    assert f"density level {matched.start_level:.3g}," in capsys.readouterr().err
    cell = 2.0 / 32
    radius_fixed = fixed.surface(0)[0].norm(dim=-1)
    radius_matched = matched.surface(0)[0].norm(dim=-1)
    assert radius_fixed.mean().item() == pytest.approx(0.3 * math.sqrt(math.log(2.0)),
                                                       abs=cell)
    assert radius_matched.mean().item() == pytest.approx(blob.silhouette_radius(), abs=cell)
    assert (radius_matched - blob.silhouette_radius()).abs().max() < 1.5 * cell


def test_dmtet_falls_back_to_the_fixed_level_on_an_empty_stage(capsys):
    blob = GaussianBlob(amplitude=0.01, isosurface_threshold=6.0)
    rep = DMTet.create_from(blob, _dmtet_cfg(init_level="silhouette"))
    assert rep.start_match is None and rep.start_level == 6.0
    assert "renders nothing opaque" in capsys.readouterr().err
    explicit = DMTet.create_from(blob, _dmtet_cfg(init_level="silhouette", init_threshold=3.0))
    assert explicit.start_level == 3.0


def test_init_level_must_be_known():
    with pytest.raises(ConfigError, match="init_level: 'auto' is not one of fixed, silhouette"):
        _dmtet_cfg(init_level="auto")
