"""python -m guidance.pointcloud.sample: picture -> .ply + preview, and its one-line refusals;
the shipped toy point model (models/toy/pointe) against the truth of held-out objects."""

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.datasets.point_clouds import read_cloud
from guidance.pointcloud.sample import main

TOY_CLIP = Path("models/toy/clip").resolve()
SHIPPED = Path("models/toy/pointe")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random image-vec model reading the toy CLIP's 64-d embedding."""
    from guidance.pointcloud.pretrained import save_point_model
    from guidance.pointcloud.transformer import PointModelConfig, PointTransformer

    torch.manual_seed(0)
    model = PointTransformer(PointModelConfig("image-vec", width=32, layers=1, heads=2,
                                              points=64, clip_dim=64))
    torch.nn.init.normal_(model.point_out.weight, std=0.02)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_point_model(model, folder, name="tiny", extra={
        "conditioner": str(TOY_CLIP), "input": {"image_size": 64, "object_fraction": 0.7},
        "world_scale": 1.6, "sampler": {"steps": 3, "guidance_scale": 3.0, "points": 64}})
    return folder


def test_sample_writes_a_coloured_ply_and_a_preview(tiny_model, tmp_path, capsys):
    out = tmp_path / "cloud.ply"
    assert main(["image=examples/toy/red-mug.png", f"out={out}", f"model={tiny_model}",
                 "seed=1"]) == 0
    printed = capsys.readouterr().out
    assert f"cloud: {out}" in printed and "preview:" in printed
    cloud = read_cloud(out)
    assert cloud.shape == (64, 6)
    assert np.abs(cloud[:, :3]).max() <= 1.6 + 1e-5          # clamped x0, world units
    assert (cloud[:, 3:] >= 0).all() and (cloud[:, 3:] <= 1).all()
    from PIL import Image

    with Image.open(out.with_suffix(".png")) as im:
        assert im.size[0] == 5 * im.size[1]                   # picture + 4 views
    # seeded: the same seed gives the same file, model: prefix and points= work
    again = tmp_path / "again.ply"
    assert main(["image=examples/toy/red-mug.png", f"out={again}", f"model=model:{tiny_model}",
                 "seed=1", f"preview={tmp_path / 'p.png'}"]) == 0
    assert again.read_bytes() == out.read_bytes()
    more = tmp_path / "more.ply"
    assert main(["image=examples/toy/red-mug.png", f"out={more}", f"model={tiny_model}",
                 "points=100", "steps=2", "guidance_scale=0"]) == 0
    assert read_cloud(more).shape == (100, 6)


@pytest.mark.parametrize("case", ["missing image", "corrupt image", "missing model",
                                  "not a model", "not ply", "bad scale", "empty image"])
def test_bad_inputs_are_one_line_exit_2(tiny_model, tmp_path, capsys, case):
    image, model, out = "examples/toy/red-mug.png", str(tiny_model), str(tmp_path / "c.ply")
    if case == "missing image":
        image = str(tmp_path / "none.png")
    elif case == "corrupt image":
        image = str(tmp_path / "bad.png")
        Path(image).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif case == "empty image":
        from PIL import Image

        image = str(tmp_path / "empty.png")
        Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(image)
    elif case == "missing model":
        model = str(tmp_path / "no-model")
    elif case == "not a model":
        model = str(TOY_CLIP)
    elif case == "not ply":
        out = str(tmp_path / "c.obj")
    args = [f"image={image}", f"model={model}", f"out={out}"]
    if case == "bad scale":
        args.append("guidance_scale=-3")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert not Path(out).exists()


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "image=PATH" in capsys.readouterr().out


def _truth(path: str) -> np.ndarray:
    import trimesh

    from engine.datasets.point_clouds import sample_surface

    return sample_surface(trimesh.load(path, process=False, force="mesh"), 2048, seed=0)


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no shipped toy model")
def test_shipped_toy_model_beats_a_ball_on_held_out_objects():
    """The four held-out examples (never trained on): under the benchmark's protocol (both
    normalised to a largest side of 1, the best turn about z) most clouds lie nearer their
    truth than a ball does (the mean-cloud baseline needs the training data; its 20-object
    comparison is in docs/pointe.md), and every cloud has the object's colour."""
    import sys

    from engine.datasets.point_clouds import colour_error
    from guidance.pointcloud.picture import PointCloudModel

    sys.path.insert(0, str(Path("benchmarks").resolve()))
    from bench_pointe_toy import protocol_chamfer

    model = PointCloudModel.load(SHIPPED)
    g = np.random.default_rng(0).normal(size=(512, 3))
    ball = 0.45 * g / np.linalg.norm(g, axis=1, keepdims=True)
    wins = 0
    for name in ["red-mug", "brown-box", "pink-vase", "blue-mushroom"]:
        truth = _truth(f"examples/toy/{name}.obj")
        cloud = model.cloud(model.picture(f"examples/toy/{name}.png").rgb, seed=0).numpy()
        wins += protocol_chamfer(cloud, truth, 10.0) < protocol_chamfer(ball, truth, 10.0)
        assert colour_error(cloud, truth) < 0.15, name
    assert wins >= 3
