"""Mode points of python -m guidance.training: (picture, cloud) pairs from a toy world, a
seeded and resumable training, the saved point-model folder; and the toy point recipes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from guidance.training.command import main

TOY_CLIP = str(Path("models/toy/clip").resolve())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from engine.datasets.toy_world import generate

    root = tmp_path_factory.mktemp("points") / "data"
    generate(root, count=3, heldout=1, seed=0, size=32, groups=1, references=1)
    return root


def run_args(world, out, *extra):
    return ["recipe=toy-pointe", f"data.root={world}", f"out={out}",
            f"model.conditioner.model={TOY_CLIP}", "model.point.width=16",
            "model.point.layers=1", "model.point.points=32", "points.cloud_points=16",
            "points.pool=256", "batch_size=3", "steps=4", "checkpoint_every=2",
            "sample_every=-1", "log_every=1", "warmup=0", *extra]


def test_pairs_are_every_view_with_the_cloud_in_its_frame(world):
    from engine.datasets.point_clouds import rotate_z
    from guidance.pointcloud.picture import PointImageEncoder
    from guidance.training.points import ToyPointPairs

    enc = PointImageEncoder.load(Path(TOY_CLIP))
    pairs = ToyPointPairs(world, "train", enc, pool=256, cloud_points=256, image_size=32,
                          kind="image-grid")
    assert len(pairs) == 2 * (4 + 2)                     # 2 objects x (4 views + 2 references)
    assert pairs.grids.shape[1:] == (64, 64) and pairs.embeddings.shape[1:] == (64,)
    record = json.loads((world / pairs.ids[0] / "object.json").read_text())
    azimuth = record["groups"][0]["views"][1]["azimuth"]
    assert float(pairs.azimuth[1]) == pytest.approx(azimuth)
    g = torch.Generator().manual_seed(0)
    cloud = pairs.cloud(1, g)                            # all 256 points, turned, rgb 0..255
    pool = pairs.pools[0]
    back = rotate_z(cloud, azimuth)
    assert torch.allclose(back[:, :3].sort(0).values, pool[:, :3].sort(0).values, atol=1e-5)
    assert cloud[:, 3:].max() > 1.0 and np.linalg.norm(pool[:, :3], axis=1).max() <= 0.5 + 1e-4


def test_points_training_resumes_to_the_same_model(world, tmp_path):
    from safetensors.torch import load_file

    from guidance.pointcloud.picture import PointCloudModel

    import shutil

    full = tmp_path / "full"
    assert main(run_args(world, full)) == 0
    part = tmp_path / "part"                 # the same run, continued from its step 2
    shutil.copytree(full, part)
    assert main([f"resume={part / 'checkpoints' / '00-points-0000002.safetensors'}"]) == 0
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(part / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    # the folder is a point model with its image tower and settings
    model = PointCloudModel.load(full / "model")
    assert model.base.config.kind == "image-grid" and model.settings.image_size == 64
    assert (full / "model" / "conditioner" / "open_clip_config.json").is_file()
    cloud = model.cloud(torch.ones(64, 64, 3), steps=2)
    assert cloud.shape == (32, 6)


def test_points_mode_mistakes_are_one_line(world, tmp_path, capsys):
    assert main(run_args(world, tmp_path / "a", "model.point.kind=upsample")) == 2
    assert "model.point.kind" in capsys.readouterr().err
    assert main(run_args(world, tmp_path / "b", "model.point.clip_dim=8")) == 2
    assert "model.point.clip_dim" in capsys.readouterr().err
    assert main(run_args(world, tmp_path / "c", f"data.root={tmp_path}")) == 2
    assert "dataset.json" in capsys.readouterr().err
    assert main(run_args(world, tmp_path / "d", "points.views=side")) == 2
    assert "points.views" in capsys.readouterr().err


def test_x0_weighting():
    from guidance.pointcloud.diffusion import PointDiffusion
    from guidance.training.points import timestep_weights

    d = PointDiffusion("cosine")
    t = torch.tensor([0, 300, 700, 1000])
    assert torch.equal(timestep_weights(d, t, "uniform"), torch.ones(4))
    w = timestep_weights(d, t, "x0", 20.0)
    ab = d.alphas_cumprod[t].float()
    assert w[0] == 1.0 and w[-1] == 20.0                 # clean: eps loss; very noisy: clamped
    assert w[2] == pytest.approx(float((1 - ab[2]) / ab[2]))   # noisy: the x0 loss
    m = timestep_weights(d, t, "min-snr", 5.0)
    assert m[-1] == pytest.approx(1.0) and m[0] < 1e-3


def _run(recipe, image, out, *extra):
    from engine.run import main as run_main

    return run_main([f"recipe={recipe}", f"image={image}", f"out={out}",
                     "output.progress=false", *extra])


@pytest.mark.slow
@pytest.mark.skipif(not Path("models/toy/pointe/config.json").is_file(),
                    reason="no shipped toy point model")
def test_point_e_toy_recipe_end_to_end(tmp_path):
    """Picture -> cloud -> NeRF occupancy -> textured mesh, nearer the truth than a ball."""
    from engine.evaluate.metrics import compare_files

    out = tmp_path / "run"
    assert _run("point-e-toy", "examples/toy/red-mug.png", out) == 0
    mesh = out / "export" / "mesh.glb"
    assert mesh.is_file() and (out / "export" / "mesh.obj").is_file()
    scores = compare_files(str(mesh), "examples/toy/red-mug.obj", samples=3000)
    assert scores.chamfer < 0.12 and scores.volume_iou > 0.2


@pytest.mark.slow
@pytest.mark.skipif(not Path("models/toy/pointe/config.json").is_file(),
                    reason="no shipped toy point model")
def test_isotropic3d_toy_pointe_recipe_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert _run("isotropic3d-toy-pointe", "examples/toy/brown-box.png", out,
                "stages.nerf.steps=6", "stages.dmtet.steps=3",
                "export.turntable.enabled=false") == 0
    assert (out / "export" / "mesh.glb").is_file()
    config = (out / "config.yaml").read_text()
    assert "model:models/toy/pointe" in config
