"""What the shipped toy models (models/toy, made by python -m engine.toy_models) have learnt,
judged on held-out objects (examples/toy) against their ground truth."""

import json

import numpy as np
import pytest

from engine import view_scores as vs
from engine.config import PROJECT_ROOT

MODELS = PROJECT_ROOT / "models" / "toy"
EXAMPLES = PROJECT_ROOT / "examples" / "toy"
NAMES = ("red-mug", "pink-vase", "brown-box", "blue-mushroom")


def ground_truth_views(name: str, size: int) -> np.ndarray:
    """uint8 [4, size, size, 4]: the example's ground truth at guidance.sample's cameras."""
    import trimesh

    mesh = trimesh.load(EXAMPLES / f"{name}.obj", force="mesh", process=False)
    return vs.ground_truth_views(mesh, size)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """{example: uint8 [4, S, S, 3] views sampled by guidance.sample from its picture}."""
    from PIL import Image

    from guidance.sample import main

    out = tmp_path_factory.mktemp("samples")
    views = {}
    for name in NAMES:
        grid = out / f"{name}.png"
        assert main([f"image={EXAMPLES / name}.png", f"out={grid}",
                     f"model={MODELS / 'stage2'}", "steps=30", "scale=2", "seed=0",
                     "device=cpu", f"elevation={vs.SAMPLE_ELEVATION}",
                     "object_fraction=0.7"]) == 0
        tiles = np.asarray(Image.open(grid).convert("RGB"))
        size = tiles.shape[0]
        views[name] = np.stack([tiles[:, (k + 1) * size:(k + 2) * size] for k in range(4)])
    return views


def test_shipped_models_are_the_documented_chain():
    from guidance.model import MultiViewDiffusionModel

    for name in ("clip", "text", "stage1", "stage2"):
        assert (MODELS / name).is_dir(), f"models/toy/{name} is missing"
    stage2 = MultiViewDiffusionModel.from_pretrained(MODELS / "stage2")
    assert stage2.info.conditioning == "image" and stage2.info.space == "pixel"
    assert MultiViewDiffusionModel.from_pretrained(MODELS / "text").info.conditioning == "text"
    record = json.loads((MODELS / "manifest.json").read_text())
    assert record["command"].startswith("python -m engine.toy_models")
    for f in MODELS.rglob("*"):
        assert f.suffix not in (".pt", ".pth", ".ckpt", ".bin"), f"pickled weights: {f}"


def test_sampled_views_have_the_input_colour_and_sit_where_the_object_is(samples):
    """What the shipped model has learnt, measured against the ground truth seen from the same
    cameras: the colour of the object in the picture (every example's views have the hue of
    its own object, nearer than any other example's), and an object of the right size in the
    right place in every view (silhouette IoU with the truth). The shape class is NOT reliably
    right yet (a mug comes out as a ball): see the figures in README, The shipped toy models."""
    size = next(iter(samples.values())).shape[1]
    truth = {n: ground_truth_views(n, size) for n in NAMES}
    gt_hue = {n: vs.truth_hue(truth[n]) for n in NAMES}
    for name in NAMES:
        fg = vs.foreground(samples[name])
        assert all(0.03 < f.mean() < 0.6 for f in fg), (name, [f.mean() for f in fg])
        seen = vs.sample_hue(samples[name])
        nearest = min(NAMES, key=lambda n: vs.hue_distance(seen, gt_hue[n]))
        assert nearest == name, (name, seen, gt_hue)
        ious = vs.view_ious(samples[name], truth[name])
        assert ious.mean() > 0.25 and ious.min() > 0.1, (name, ious)


def test_isotropic3d_toy_beats_the_initial_blob(tmp_path):
    """A shortened isotropic3d-toy run on a held-out picture ends closer to the ground-truth
    mesh (Chamfer, volume IoU after yaw alignment) than the shape it starts from."""
    from engine.benchmark import _initial
    from engine.metrics import compare_files
    from engine.run import main

    image, truth = EXAMPLES / "brown-box.png", EXAMPLES / "brown-box.obj"
    short = ["stages.nerf.steps=200", "stages.dmtet.steps=30", "export.texture_size=64",
             "export.turntable.enabled=false", "output.progress=false", "system.threads=1"]
    assert main(["recipe=isotropic3d-toy", f"image={image}", f"out={tmp_path / 'run'}",
                 *short]) == 0
    result = compare_files(str(tmp_path / "run" / "export" / "mesh.glb"), str(truth),
                           samples=5000)
    _, blob_mesh = _initial("isotropic3d-toy", tmp_path / "initial", short, image)
    blob = compare_files(str(blob_mesh), str(truth), samples=5000)
    assert result.chamfer < blob.chamfer, (result, blob)
    assert result.volume_iou > blob.volume_iou, (result, blob)
