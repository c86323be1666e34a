"""The DMTet representation: regularisers on hand-built meshes, analytic init, rendering
and gradients, empty meshes, create_from a NeRF-like stage, checkpoint round trip."""

import math

import pytest
import torch
from torch import nn

from engine.cameras import orbit
from engine.config import validate
from engine.errors import ConfigError
from engine.plugin import StepInfo
from engine import registry
from representations.backgrounds import SolidBackground
from representations.dmtet import (DMTet, adjacent_face_pairs, laplacian_loss,
                                   normal_consistency)
from representations.lib.encodings import HashGridConfig
from representations.lib.fields import ColorField

SMALL_GRID = dict(n_levels=2, n_features=2, log2_table_size=10, base_resolution=4,
                  per_level_scale=2.0, backend="torch")


def _cfg(**kw):
    base = dict(resolution=12, color=HashGridConfig(**SMALL_GRID), color_hidden=16,
                marching_backend="torch", raster_backend="torch")
    base.update(kw)
    return DMTet.Config(**base)


def _bg(*rgb):
    return SolidBackground(SolidBackground.Config(list(rgb)))


def _step(step=0):
    return StepInfo(stage="mesh", stage_index=1, step=step, stage_steps=100, global_step=step)


# -- regularisers on hand-built meshes ----------------------------------------------------

def test_normal_consistency_flat_and_folded():
    flat = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    assert torch.equal(adjacent_face_pairs(faces), torch.tensor([[0, 1]]))
    assert normal_consistency(flat, faces).item() == pytest.approx(0.0, abs=1e-7)
    # fold the second triangle up by 90 degrees about the shared edge: 1 - cos 90 = 1
    folded = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    assert normal_consistency(folded, faces).item() == pytest.approx(1.0, abs=1e-6)


def test_laplacian_of_a_tetrahedron_surface():
    v = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], requires_grad=True)
    faces = torch.tensor([[1, 2, 3], [0, 3, 2], [0, 1, 3], [0, 2, 1]])
    # each vertex neighbours the 3 others: mean(others) - v = -4/3 v (centroid 0), |v|^2 = 3
    loss = laplacian_loss(v, faces)
    assert loss.item() == pytest.approx(16 / 9 * 3, rel=1e-6)
    loss.backward()
    # d/dv_j of (1/4) sum_i |S/3 - 4/3 v_i|^2 at S = sum v = 0 is 8/9 v_j
    assert torch.allclose(v.grad, 8 / 9 * v.detach(), atol=1e-6)
    # a closed tetrahedron: every edge shared by two faces, folded at the dihedral angle
    pairs = adjacent_face_pairs(faces)
    assert pairs.shape == (6, 2)
    assert normal_consistency(v, faces).item() == pytest.approx(1 - (-1 / 3), abs=1e-5)


# -- config, registry ----------------------------------------------------------------------

def test_registered_and_config_validation():
    assert registry.get("representation", "dmtet") is DMTet
    cfg = validate(DMTet.Config, {"resolution": 16, "color": {"n_levels": 4}})
    assert cfg.resolution == 16 and cfg.color.n_levels == 4
    with pytest.raises(ConfigError, match="init_shape"):
        validate(DMTet.Config, {"init_shape": "cube"})
    with pytest.raises(ConfigError, match="marching_backend"):
        validate(DMTet.Config, {"marching_backend": "cuda"})
    with pytest.raises(ConfigError, match="init_radius"):
        validate(DMTet.Config, {"init_radius": 1.5})
    with pytest.raises(ConfigError, match="diagonal: 'long' is not one of angle"):
        validate(DMTet.Config, {"diagonal": "long"})


def test_diagonal_setting_reaches_marching_tets():
    """The same surface cut by another diagonal rule: the same vertices, other triangles, and
    the angle rule's smallest angle is at least the fixed table's."""
    import numpy as np

    def min_angles(verts, faces):
        tri = verts[faces].double()
        out = []
        for i in range(3):
            a, b, c = tri[:, i], tri[:, (i + 1) % 3], tri[:, (i + 2) % 3]
            u, v = b - a, c - a
            cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1)).clamp_min(1e-12)
            out.append(torch.rad2deg(torch.acos(cos.clamp(-1, 1))))
        return torch.stack(out, -1).min(-1).values

    meshes = {}
    for rule in ("angle", "fixed"):
        rep = DMTet(_cfg(resolution=16, init_radius=0.55, diagonal=rule))
        with torch.no_grad():
            rep.deformation.copy_(torch.randn(rep.deformation.shape,
                                              generator=torch.Generator().manual_seed(0)))
        meshes[rule] = rep.surface(0)
    (va, fa), (vf, ff) = meshes["angle"], meshes["fixed"]
    assert torch.allclose(va, vf) and fa.shape == ff.shape
    assert not torch.equal(fa, ff)
    assert float(np.percentile(min_angles(va, fa).numpy(), 1)) >= \
        float(np.percentile(min_angles(vf, ff).numpy(), 1))


# -- geometry -------------------------------------------------------------------------------

def test_sphere_init_surface_and_deformation_bound():
    rep = DMTet(_cfg(resolution=16, init_radius=0.55))
    verts, faces = rep.surface(0)
    assert faces.shape[0] > 100
    assert (verts.norm(dim=-1) - 0.55).abs().max() < 0.02
    _, directed = _edge_use(faces)
    assert set(directed.values()) == {1}
    assert set(_edge_use(faces)[0].values()) == {2}            # closed

    with torch.no_grad():
        rep.deformation.fill_(100.0)                        # saturates tanh
    cell = 2.0 / 16
    moved = rep.deformed_vertices() - rep.grid_vertices
    assert torch.allclose(moved, torch.full_like(moved, cell * rep.cfg.deform_scale), atol=1e-6)
    assert rep.surface(0)[0].shape[0] > 0


def test_param_groups_and_checkpoint_round_trip():
    rep = DMTet(_cfg())
    groups = rep.param_groups()
    assert set(groups) == {"geometry", "color"}
    assert groups["geometry"][0] is rep.sdf and groups["geometry"][1] is rep.deformation
    assert {id(p) for p in groups["color"]} == {id(p) for p in rep.color_field.parameters()}
    state = rep.state_dict()
    assert "grid_vertices" not in state and "tets" not in state
    with torch.no_grad():
        rep.sdf.add_(0.05 * torch.randn_like(rep.sdf))
        rep.deformation.normal_()
    other = DMTet(_cfg(init_shape="none"))
    other.load_state_dict(rep.state_dict())
    a, b = rep.surface(0), other.surface(0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- rendering -----------------------------------------------------------------------------

def test_render_outputs_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    rep = DMTet(_cfg())
    cams = orbit(2, elevation_deg=20.0, distance=2.5, fovy_deg=40.0)
    out = rep.render(cams, 24, 24, background=SolidBackground(), step=_step())
    assert out["rgb"].shape == (2, 24, 24, 3) and out["opacity"].shape == (2, 24, 24, 1)
    assert out["depth"].shape == (2, 24, 24, 1) and out["normal"].shape == (2, 24, 24, 3)
    # the sphere of radius 0.5 at distance 2.5, fovy 40: centre covered, corners empty
    assert out["opacity"][:, 12, 12, 0].min() == 1.0 and out["opacity"][:, 0, 0, 0].max() == 0.0
    assert torch.allclose(out["rgb"][:, 0, 0], torch.ones(2, 3))
    centre_depth = out["depth"][:, 12, 12, 0]
    assert torch.allclose(centre_depth, torch.full((2,), 2.0), atol=0.03)
    # normals at the centre face the camera
    to_cam = torch.nn.functional.normalize(cams.position, dim=-1)
    assert ((out["normal"][:, 12, 12] * to_cam).sum(-1) > 0.95).all()

    target = torch.rand(2, 24, 24, 3, generator=torch.Generator().manual_seed(1))
    loss = (out["rgb"] - target).pow(2).mean()
    regs = rep.regularizers(out, _step())
    (loss + regs["normal_consistency"] + regs["laplacian"]).backward()
    assert rep.sdf.grad.abs().sum() > 0
    assert rep.deformation.grad.abs().sum() > 0
    for name, p in rep.color_field.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in rep.color_field.parameters())
    # sdf gradients only where the surface passes (a cell diagonal of the sphere)
    far = (rep.sdf.detach()).abs() > 2.0 / 12 * math.sqrt(3) + 1e-6
    assert (rep.sdf.grad[far] == 0).all()


def test_silhouette_loss_moves_the_surface_outwards():
    # a loss asking for more coverage reaches the sdf only through the antialiased silhouette,
    # and every sdf it touches must go down (grow the object) under gradient descent.
    # A coarse grid: the rasteriser's silhouette blending needs triangles of a few pixels.
    rep = DMTet(_cfg(resolution=8, init_radius=0.55))
    cams = orbit(1, elevation_deg=0.0, distance=2.5, fovy_deg=40.0)
    out = rep.render(cams, 32, 32, background=SolidBackground(), step=_step())
    partial = (out["opacity"] > 0) & (out["opacity"] < 1)
    assert partial.any()
    (-out["opacity"].sum()).backward()
    g = rep.sdf.grad
    touched = g != 0
    assert touched.any()
    assert (g[touched] > 0).all()


def test_textureless_shading_after_ambient_steps():
    from representations.lib.shading import ShadingConfig

    rep = DMTet(_cfg(shading=ShadingConfig(ambient_only_steps=0, textureless_prob=1.0)))
    rep.train()
    cams = orbit(1, elevation_deg=10.0, distance=2.5, fovy_deg=40.0)
    out = rep.render(cams, 24, 24, background=_bg(0.0, 0.0, 0.0),
                     step=_step(10))
    centre = out["rgb"][0, 12, 12]
    assert torch.allclose(centre, centre[:1].expand(3), atol=1e-5)    # white albedo: grey
    rep.eval()
    out_eval = rep.render(cams, 24, 24, background=_bg(0.0, 0.0, 0.0),
                          step=_step(10))
    # eval renders are unshaded: the albedo itself where covered
    assert torch.allclose(out_eval["rgb"][0, 12, 12], out_eval["albedo"][0, 12, 12])


def test_empty_mesh_renders_background_and_still_steps():
    rep = DMTet(_cfg(init_shape="none"))
    cams = orbit(2, distance=2.5)
    out = rep.render(cams, 16, 16, background=_bg(0.2, 0.4, 0.6), step=_step())
    assert torch.allclose(out["rgb"], torch.tensor([0.2, 0.4, 0.6]).expand(2, 16, 16, 3))
    assert (out["opacity"] == 0).all() and (out["depth"] == 0).all()
    regs = rep.regularizers(out, _step())
    assert regs["normal_consistency"].item() == 0.0 and regs["laplacian"].item() == 0.0
    loss = out["rgb"].mean() + out["opacity"].mean() + sum(regs.values())
    assert loss.requires_grad
    loss.backward()
    assert (rep.sdf.grad == 0).all()
    v, f = rep.surface(0)
    assert v.shape == (0, 3) and f.shape == (0, 3)


# -- create_from ---------------------------------------------------------------------------

class _NerfStub(nn.Module):
    """Dense (density 50) inside an axis-aligned box, empty (0) outside."""

    def __init__(self):
        super().__init__()
        self.color_field = ColorField(HashGridConfig(**SMALL_GRID), hidden=8, bound=1.0)

    def density(self, points):
        inside = (points.abs() < torch.tensor([0.5, 0.3, 0.4])).all(-1)
        return inside.float() * 50.0


def test_create_from_nerf_like_stage():
    stub = _NerfStub()
    rep = DMTet.create_from(stub, _cfg(init_shape="none", init_threshold=10.0, init_clamp=0.0))
    box = (rep.grid_vertices.abs() < torch.tensor([0.5, 0.3, 0.4])).all(-1)
    assert torch.allclose(rep.sdf.detach()[box], torch.tensor(-40.0))
    assert torch.allclose(rep.sdf.detach()[~box], torch.tensor(10.0))
    clamped = DMTet.create_from(stub, _cfg(init_shape="none", init_clamp=1.0))
    assert clamped.sdf.detach().abs().max() == 1.0
    # colour field: an independent deep copy giving the same albedo
    assert rep.color_field is not stub.color_field
    pts = torch.rand(64, 3) * 2 - 1
    assert torch.equal(rep.albedo(pts), stub.color_field(pts))
    with torch.no_grad():
        next(rep.color_field.parameters()).add_(1.0)
    assert not torch.equal(rep.albedo(pts), stub.color_field(pts))
    # the mesh is the box, within a cell
    verts, faces = rep.surface(0)
    assert faces.shape[0] > 0
    half = torch.tensor([0.5, 0.3, 0.4])
    assert ((verts.abs() - half).max(-1).values.abs() <= 2.0 / 12 + 1e-5).all()


def test_create_from_the_registered_nerf():
    from representations.nerf import NeRF, NeRFConfig

    torch.manual_seed(0)
    nerf = NeRF(NeRFConfig(hash_grid=HashGridConfig(**SMALL_GRID), mlp_hidden=8,
                           isosurface_threshold=6.0))
    rep = DMTet.create_from(nerf, _cfg(init_shape="none", init_clamp=0.0))
    with torch.no_grad():
        expected = 6.0 - nerf.density(rep.grid_vertices)      # threshold taken from the NeRF
    assert torch.allclose(rep.sdf.detach(), expected, atol=1e-5)
    # the blob (10 (1 - |x| / 0.5)) makes the centre dense and the corners empty
    assert rep.sdf[rep.grid_vertices.norm(dim=-1).argmin()] < 0
    assert rep.sdf[rep.grid_vertices.norm(dim=-1).argmax()] > 0
    pts = torch.rand(32, 3) * 2 - 1
    assert torch.allclose(rep.albedo(pts), nerf.albedo(pts))
    assert rep.surface(0)[1].shape[0] > 0


def test_create_from_rejects_a_stage_without_density():
    with pytest.raises(ConfigError):
        DMTet.create_from(nn.Linear(1, 1), _cfg())


# -- helpers -------------------------------------------------------------------------------

def _edge_use(faces):
    from collections import Counter

    directed = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2).tolist()
    return Counter(tuple(sorted(e)) for e in directed), Counter(map(tuple, directed))
