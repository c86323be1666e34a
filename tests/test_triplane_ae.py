"""Compress3D's triplane autoencoder (guidance.compress3d.autoencoder) and its trainer (mode
triplane-ae of python -m guidance.training): hand-built fixtures for the scatter, the plane
projection and the plane reading; the labels; learning a shape; resume; the folder; errors."""

import json

import numpy as np
import pytest
import torch

from guidance.compress3d.autoencoder import (TriplaneAEConfig, TriplaneAutoencoder,
                                             decode_mesh, scatter_to_volume, volume_to_planes)
from guidance.training.command import main


def test_scatter_averages_features_per_cell_and_counts_points():
    # a 2^3 grid over [-1, 1]^3: cell (i, j, k) holds x in [-1, 0) for i = 0, [0, 1] for i = 1
    points = torch.tensor([[[-0.5, -0.5, -0.5], [-0.2, -0.9, -0.1], [0.5, 0.5, 0.5],
                            [2.0, 2.0, 2.0]]])                    # the last: outside -> border
    feats = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [5.0, 50.0], [7.0, 70.0]]])
    vol = scatter_to_volume(points, feats, volume=2, bound=1.0)     # [1, 3, 2, 2, 2]
    assert vol.shape == (1, 3, 2, 2, 2)
    assert vol[0, :, 0, 0, 0].tolist() == [2.0, 20.0, 0.5]          # mean of two, 2 / 4 points
    assert vol[0, :, 1, 1, 1].tolist() == [6.0, 60.0, 0.5]          # (5 + 7) / 2
    empty = torch.ones(2, 2, 2, dtype=torch.bool)
    empty[0, 0, 0] = empty[1, 1, 1] = False
    assert torch.all(vol[0][:, empty] == 0)


def test_planes_are_axis_averages_in_xy_xz_yz_order():
    vol = torch.zeros(1, 1, 2, 2, 2)
    vol[0, 0, 1, 0, 1] = 4.0                                        # x = 1, y = 0, z = 1
    planes = volume_to_planes(vol)[0, :, 0]                         # [3, 2, 2]
    assert planes[0].tolist() == [[0, 0], [2.0, 0]]                 # xy: [x, y], mean over z
    assert planes[1].tolist() == [[0, 0], [0, 2.0]]                 # xz: [x, z]
    assert planes[2].tolist() == [[0, 2.0], [0, 0]]                 # yz: [y, z]


def test_a_texel_is_read_at_its_own_position():
    """The decoder reads plane [c, i, j] at (first, second) = node (i, j): a feature put at
    the xy texel of x = +bound, y = -bound is read at such points whatever z is."""
    ae = TriplaneAutoencoder(TriplaneAEConfig(volume=4, width=2, heads=1, upsample=1))
    planes = torch.zeros(1, 3, 2, 4, 4)
    planes[0, 0, 0, 3, 0] = 1.0                                     # xy plane, x last, y first
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, feats):
            seen.append(feats)
            return torch.zeros(*feats.shape[:-1], 4)

    ae.decoder_mlp = Spy()
    points = torch.tensor([[[1.0, -1.0, 0.3], [-1.0, 1.0, 0.3], [1.0, 1.0, -0.7]]])
    ae.query(planes, points)
    assert seen[0][0, :, 0].tolist() == [1.0, 0.0, 0.0]


def test_labels_come_from_the_cell_a_point_falls_in():
    import trimesh

    from engine.evaluate.metrics import occupancy
    from guidance.training.triplane_ae import grid_labels

    box = trimesh.creation.box(extents=(0.8, 0.8, 0.8))           # [-0.4, 0.4]^3
    grid = torch.from_numpy(occupancy(box, 32, 1.0))
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.3, -0.3, 0.35], [0.5, 0.0, 0.0], [0.0, 0.0, -0.9],
                        [1.5, 0.0, 0.0]])
    assert grid_labels(grid, pts, 1.0).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]


def _sphere_cloud(n, radius=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=g)
    xyz = d / d.norm(dim=1, keepdim=True) * radius
    rgb = torch.where(xyz[:, 2:3] > 0, torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.1,
                                                                                    0.9]))
    return torch.cat([xyz, rgb], dim=1)


@pytest.mark.slow
def test_the_autoencoder_learns_a_shape_and_its_colours():
    """Fitted to a two-coloured sphere for 150 steps: the decoded mesh is that
    sphere (IoU against it) and red above, blue below."""
    import trimesh

    from engine.evaluate.metrics import volume_iou

    torch.manual_seed(0)
    ae = TriplaneAutoencoder(TriplaneAEConfig(volume=8, width=16, heads=2, latent_channels=2,
                                              decoder_hidden=32))
    opt = torch.optim.Adam(ae.parameters(), lr=5e-3)
    cloud = _sphere_cloud(512)[None]
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        q = torch.rand(1, 512, 3, generator=g) * 2 - 1
        label = (q.norm(dim=-1) < 0.5).float()
        logit, rgb, post = ae(cloud, torch.cat([q, cloud[..., :3]], 1), generator=g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit[:, :512], label) + \
            (rgb[:, 512:] - cloud[..., 3:]).abs().mean() + 1e-4 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ae.eval()
    mesh = decode_mesh(ae, ae.encode(cloud).mode()[0], resolution=32)
    assert mesh is not None and mesh.volume > 0                      # closed, outward
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    assert volume_iou(mesh, sphere, resolution=32) > 0.8
    colours = np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0
    top, bottom = mesh.vertices[:, 2] > 0.2, mesh.vertices[:, 2] < -0.2
    assert colours[top, 0].mean() > 0.6 and colours[top, 2].mean() < 0.4
    assert colours[bottom, 2].mean() > 0.6 and colours[bottom, 0].mean() < 0.4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from engine.datasets.toy_world import generate

    root = tmp_path_factory.mktemp("shapes") / "data"
    generate(root, count=3, heldout=1, seed=0, size=32, groups=1, references=1)
    return root


def run_args(world, out, *extra):
    return ["recipe=toy-triplane-ae", f"data.root={world}", f"out={out}",
            "model.autoencoder.volume=4", "model.autoencoder.width=8",
            "model.autoencoder.heads=1", "model.autoencoder.latent_channels=2",
            "model.autoencoder.decoder_hidden=8", "shapes.pool=256", "shapes.cloud_points=64",
            "shapes.near_points=32", "shapes.uniform_points=32", "shapes.color_points=16",
            "shapes.grid=16", "batch_size=2", "steps=4", "checkpoint_every=2", "log_every=1",
            "warmup=0", *extra]


def test_training_resumes_to_the_same_model_and_saves_a_loadable_folder(world, tmp_path):
    import shutil

    from safetensors.torch import load_file

    full = tmp_path / "full"
    assert main(run_args(world, full)) == 0
    part = tmp_path / "part"
    shutil.copytree(full, part)
    assert main([f"resume={part / 'checkpoints' / '00-triplane-ae-0000002.safetensors'}"]) == 0
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(part / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["occupancy"]) for r in rows)
    ae = TriplaneAutoencoder.from_pretrained(full / "model")
    assert ae.config.volume == 4 and ae.config.latent_shape == (3, 2, 2, 2)
    record = json.loads((full / "model" / "config.json").read_text())
    assert record["source"]["step"] == 4


def test_mistakes_are_one_line(world, tmp_path, capsys):
    assert main(run_args(world, tmp_path / "a", "model.autoencoder.volume=5")) == 2
    assert "volume" in capsys.readouterr().err
    assert main(run_args(world, tmp_path / "b", "shapes.grid=0")) == 2
    assert "shapes.grid" in capsys.readouterr().err
    assert main(run_args(world, tmp_path / "c", f"data.root={tmp_path}")) == 2
    assert "dataset.json" in capsys.readouterr().err
    assert main(run_args(world, tmp_path / "d", "loss_weighting=min-snr")) == 2
    assert "triplane-ae" in capsys.readouterr().err
    assert main(run_args(world, tmp_path / "e", f"model.init={tmp_path}")) == 2
    assert "not a triplane autoencoder folder" in capsys.readouterr().err
    TriplaneAutoencoder(TriplaneAEConfig(volume=4, width=8, heads=1, latent_channels=2,
                                         decoder_hidden=16)).save_pretrained(tmp_path / "m")
    assert main(run_args(world, tmp_path / "f", f"model.init={tmp_path / 'm'}")) == 2
    assert "decoder_hidden" in capsys.readouterr().err             # 16 there, 8 asked for
    assert not any((tmp_path / n / "model").exists() for n in "abcdef")


def test_a_folder_of_another_model_is_refused(tmp_path):
    from engine.errors import UserError

    folder = tmp_path / "m"
    TriplaneAutoencoder(TriplaneAEConfig(volume=4, width=4, heads=1)).save_pretrained(folder)
    record = json.loads((folder / "config.json").read_text())
    record["kind"] = "point-e"
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="not a triplane autoencoder"):
        TriplaneAutoencoder.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    record["kind"] = "compress3d-triplane-autoencoder"
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="does not fit"):
        TriplaneAutoencoder.from_pretrained(folder)
