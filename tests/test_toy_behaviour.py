"""What the shipped toy models (models/toy, made by python -m engine.toy_models) have learnt,
judged on held-out objects (examples/toy) against their ground truth."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import PROJECT_ROOT

MODELS = PROJECT_ROOT / "models" / "toy"
EXAMPLES = PROJECT_ROOT / "examples" / "toy"
NAMES = ("red-mug", "pink-vase", "brown-box", "blue-mushroom")
#: the views guidance.sample draws by default: elevation 15, azimuths 0/90/180/270
ELEVATION, AZIMUTHS = 15.0, (0.0, 90.0, 180.0, 270.0)

# TEMPORARY while the first trained models are being made; removed when they are committed
pytestmark = pytest.mark.skipif(not (MODELS / "stage2").is_dir(), reason="models/toy not yet shipped")


def ground_truth_views(name: str, size: int) -> np.ndarray:
    """uint8 [4, size, size, 4] renders of the example's ground-truth object at the sampled
    cameras, with the toy world's framing (fovy 40, sphere filling 80% of the frame)."""
    import trimesh

    from engine.cameras import Cameras
    from engine.toy_world import FRONT_FILL, FRONT_FOVY, camera_distance, render_object

    mesh = trimesh.load(EXAMPLES / f"{name}.obj", force="mesh", process=False)
    cams = Cameras.from_spherical([ELEVATION] * 4, list(AZIMUTHS),
                                  camera_distance(FRONT_FOVY, FRONT_FILL), FRONT_FOVY)
    return render_object(mesh, cams, size)


def foreground(rgb: np.ndarray) -> np.ndarray:
    """[..., H, W] bool: pixels visibly different from the white background."""
    return (1.0 - rgb.astype(np.float32) / 255.0).max(axis=-1) > 0.15


def silhouette_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


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
                     f"model={MODELS / 'stage2'}", "steps=20", "scale=5", "seed=0",
                     "device=cpu", f"elevation={ELEVATION}", "object_fraction=0.7"]) == 0
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


def test_sampled_views_show_the_input_object_from_each_side(samples):
    """Each of the 4 views matches the ground-truth object seen from that camera (so they
    agree with each other), and each example's views match its own object best."""
    size = next(iter(samples.values())).shape[1]
    truth = {n: ground_truth_views(n, size) for n in NAMES}
    scores = np.zeros((len(NAMES), len(NAMES)))
    for i, name in enumerate(NAMES):
        fg = foreground(samples[name])
        for j, other in enumerate(NAMES):
            gt = truth[other][..., 3] > 127
            scores[i, j] = np.mean([silhouette_iou(fg[k], gt[k]) for k in range(4)])
        per_view = [silhouette_iou(fg[k], truth[name][k, ..., 3] > 127) for k in range(4)]
        assert min(per_view) > 0.5, (name, per_view)
        # the right colour: mean foreground colour near the ground truth's (shaded) colour
        gt_fg = truth[name][..., 3] > 127
        colour = samples[name][fg].mean(axis=0) / 255.0
        gt_colour = truth[name][..., :3][gt_fg].mean(axis=0) / 255.0
        assert np.abs(colour - gt_colour).max() < 0.2, (name, colour, gt_colour)
    assert (scores.argmax(axis=1) == np.arange(len(NAMES))).all(), scores


def test_isotropic3d_toy_beats_the_initial_blob(tmp_path):
    """A shortened isotropic3d-toy run on a held-out picture ends closer to the ground-truth
    mesh (Chamfer, volume IoU after yaw alignment) than the shape it starts from."""
    from engine.benchmark import _initial
    from engine.metrics import compare_files
    from engine.run import main

    image, truth = EXAMPLES / "red-mug.png", EXAMPLES / "red-mug.obj"
    short = ["stages.nerf.steps=150", "stages.dmtet.steps=30", "export.texture_size=64",
             "export.turntable.enabled=false", "output.progress=false", "system.threads=1"]
    assert main(["recipe=isotropic3d-toy", f"image={image}", f"out={tmp_path / 'run'}",
                 *short]) == 0
    result = compare_files(str(tmp_path / "run" / "export" / "mesh.glb"), str(truth),
                           samples=5000)
    _, blob_mesh = _initial("isotropic3d-toy", tmp_path / "initial", short, image)
    blob = compare_files(str(blob_mesh), str(truth), samples=5000)
    assert result.chamfer < blob.chamfer, (result, blob)
    assert result.volume_iou > blob.volume_iou, (result, blob)
