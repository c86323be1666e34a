"""The toy world generator: objects, renders, cameras, splits, determinism, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from engine.datasets import toy_world as tw
from engine.cameras import Cameras, ndc_to_pixel
from engine.datasets.mvdataset import MultiViewDataset


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    a = tw.generate(root / "a", count=6, heldout=2, seed=5, size=48, groups=2, references=1)
    tw.generate(root / "b", count=6, heldout=2, seed=5, size=48, groups=2, references=1)
    tw.generate(root / "c", count=6, heldout=2, seed=6, size=48, groups=2, references=1)
    return root, a


def _files(folder: Path):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def test_same_seed_is_byte_identical_and_other_seed_differs(generated):
    root, _ = generated
    fa, fb = _files(root / "a"), _files(root / "b")
    assert fa == fb and len(fa) == 1 + 6 * (8 + 2 + 2)   # index + views, object.json, mesh
    for f in fa:
        assert (root / "a" / f).read_bytes() == (root / "b" / f).read_bytes(), f
    differ = [f for f in fa if f.suffix in (".json", ".png") and f.name != "dataset.json"
              and (root / "a" / f).read_bytes() != (root / "c" / f).read_bytes()]
    assert len(differ) == len([f for f in fa if f.suffix in (".json", ".png")]) - 1


def test_splits_disjoint_and_loadable(generated):
    root, summary = generated
    index = json.loads((root / "a" / "dataset.json").read_text())
    train, held = index["splits"]["train"], index["splits"]["heldout"]
    assert len(held) == 2 and not set(train) & set(held)
    assert sorted(train + held) == index["objects"] == summary["ids"]
    assert tw.split_ids(summary["ids"], 2, 5) == index["splits"]   # a seeded subset
    ds = MultiViewDataset(root / "a", split="train", strict=True)
    assert ds.ids == train and ds.image_size == 48
    torch.manual_seed(0)
    s = ds[0]
    assert s["images"].shape == (4, 3, 48, 48) and s["reference"].shape == (3, 48, 48)


def _records(root: Path):
    index = json.loads((root / "dataset.json").read_text())
    for oid in index["objects"]:
        yield oid, json.loads((root / oid / "object.json").read_text())


def test_cameras_spacing_elevations_and_front_view(generated):
    root, _ = generated
    for oid, rec in _records(root / "a"):
        assert len(rec["groups"]) == 2 and len(rec["references"]) == 2
        for g in rec["groups"]:
            v = g["views"]
            for a, b in zip(v, v[1:]):
                assert abs((b["azimuth"] - a["azimuth"]) % 360.0 - 90.0) < 1e-3
            assert len({c["elevation"] for c in v}) == 1 and 0 <= v[0]["elevation"] <= 30
            assert len({c["fovy"] for c in v}) == 1 and len({c["distance"] for c in v}) == 1
        front = rec["references"][0]
        assert (front["file"], front["elevation"], front["azimuth"]) == ("r0.png", 0.0, 0.0)
        assert rec["front_view"] == "r0.png"
        assert -10 <= rec["references"][1]["elevation"] <= 40


def test_captions_name_colours_and_class(generated):
    root, _ = generated
    for oid, rec in _records(root / "a"):
        display = tw.display_name(rec["kind"])
        assert rec["caption"].endswith(display)
        for c in rec["colors"]:
            assert c in tw.PALETTE and c in rec["caption"]
        # kind + colours rebuild the caption exactly: the zero-shot CLIP bench builds the
        # other kinds' captions this way
        assert tw.caption_for(display, rec["colors"]) == rec["caption"]
    assert tw.display_name("lshape") == "L-shaped block"
    assert tw.caption_for("snowman", ["orange", "blue"]) == "an orange and blue snowman"
    assert tw.caption_for("mug", ["red", "red"]) == "a red mug"


def _load_rgba(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGBA")).astype(np.float32) / 255.0


def test_alpha_coverage_and_reprojection_of_the_ground_truth(generated):
    root, _ = generated
    for oid, rec in _records(root / "a"):
        mesh = trimesh.load(root / "a" / oid / "mesh.obj", force="mesh")
        assert mesh.is_watertight
        assert abs(np.linalg.norm(mesh.vertices, axis=1).max() - tw.OBJECT_RADIUS) < 1e-4
        verts = torch.tensor(mesh.vertices, dtype=torch.float32)
        points = torch.tensor(trimesh.sample.sample_surface(mesh, 3000, seed=0)[0],
                              dtype=torch.float32)
        for cam in [c for g in rec["groups"] for c in g["views"]] + rec["references"]:
            alpha = _load_rgba(root / "a" / oid / cam["file"])[..., 3]
            size = alpha.shape[0]
            covered = alpha > 0
            frac = covered.mean()
            assert 0.03 < frac < 0.75, (oid, cam["file"], frac)
            # nothing touches the border: the bounding sphere fills at most 85% of the frame
            assert not (covered[0].any() or covered[-1].any() or covered[:, 0].any()
                        or covered[:, -1].any())
            cams = Cameras(torch.tensor([cam["c2w"]]), torch.tensor([math.radians(cam["fovy"])]),
                           torch.tensor([cam["elevation"]]), torch.tensor([cam["azimuth"]]),
                           torch.tensor([cam["distance"]]))
            mvp = cams.world_to_clip(size, size)[0]

            def project(x):
                clip = torch.cat([x, torch.ones(len(x), 1)], dim=1) @ mvp.T
                return ndc_to_pixel(clip[:, :2] / clip[:, 3:], size, size).numpy()

            # surface points fall in the mask (grown by one pixel for the silhouette's
            # antialiasing, where coverage can round to zero)
            px = project(points)
            col, row = np.floor(px[:, 0]).astype(int), np.floor(px[:, 1]).astype(int)
            grown = np.pad(covered, 1)
            grown = np.max([grown[1 + dy:size + 1 + dy, 1 + dx:size + 1 + dx]
                            for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
            inside = grown[np.clip(row, 0, size - 1), np.clip(col, 0, size - 1)]
            assert inside.mean() > 0.995, (oid, cam["file"], inside.mean())
            # and the silhouette's extent is the projected mesh's
            px = project(verts)
            ys, xs = np.nonzero(alpha > 0.5)
            assert abs(px[:, 0].min() - xs.min()) < 1.5 and abs(px[:, 0].max() - xs.max() - 1) < 1.5
            assert abs(px[:, 1].min() - ys.min()) < 1.5 and abs(px[:, 1].max() - ys.max() - 1) < 1.5


def test_make_object_every_kind():
    for kind in tw.KINDS:
        for seed in range(2):
            mesh, caption, k = tw.make_object(np.random.default_rng(seed), kind)
            assert k == kind and mesh.is_watertight and mesh.volume > 0.01
            lo, hi = mesh.bounds
            assert np.allclose((lo + hi) / 2, 0, atol=1e-6)
            assert abs(np.linalg.norm(mesh.vertices, axis=1).max() - tw.OBJECT_RADIUS) < 1e-6
            names = mesh.metadata["colours"]
            allowed = {tuple(np.round(np.asarray(tw.PALETTE[n]) * 255).astype(int)) for n in names}
            assert {tuple(c) for c in mesh.visual.vertex_colors[:, :3].tolist()} <= allowed
            assert all(n in caption for n in names)
    rng = np.random.default_rng(0)
    assert len({tw.make_object(rng)[2] for _ in range(12)}) > 4   # kind=None: random kinds
    with pytest.raises(Exception, match="did you mean 'table'"):
        tw.make_object(np.random.default_rng(0), "tabel")


def _slot_vertices(mesh, slot):
    rgb = np.round(np.asarray(tw.PALETTE[mesh.metadata["colours"][slot]]) * 255).astype(int)
    parts = mesh.metadata["render_parts"]
    return parts.vertices[(parts.visual.vertex_colors[:, :3] == rgb).all(1)]


def test_front_faces_plus_x():
    rng = np.random.default_rng(0)
    for _ in range(3):
        chair = tw.make_object(rng, "chair")[0]
        top = chair.vertices[chair.vertices[:, 2] > chair.vertices[:, 2].max() - 0.05]
        assert top[:, 0].max() < 0          # the back stands at -x
        lshape = tw.make_object(rng, "lshape")[0]
        low = lshape.vertices[lshape.vertices[:, 2] < lshape.vertices[:, 2].min() + 0.05]
        assert low[:, 0].max() > 0.3        # the arm reaches to +x
    for kind, slot in (("snowman", 1), ("lamp", 0)):   # nose, shade
        for seed in range(3):
            m = tw.make_object(np.random.default_rng([seed, 1]), kind)[0]
            if len(set(m.metadata["colours"])) == 2:
                x = _slot_vertices(m, slot)[:, 0]
                assert x.max() > 0.2 and (x.min() + x.max()) / 2 > 0.05, kind


def test_shading_of_a_flat_face_is_exact():
    mesh, _, _ = tw.make_object(np.random.default_rng(0), "box")
    cams = Cameras.from_spherical([0.0, 0.0], [0.0, 180.0], 3.0, 40.0)
    rgba = tw.render_object(mesh, cams, 32)
    albedo = np.asarray(tw.PALETTE[mesh.metadata["colours"][0]])
    # +x face: lit by the light's x component; -x face: ambient only
    for view, shade in ((0, tw.AMBIENT + (1 - tw.AMBIENT) * tw.LIGHT[0]), (1, tw.AMBIENT)):
        expected = np.round(np.round(albedo * 255) / 255 * shade * 255)
        assert np.abs(rgba[view, 16, 16, :3].astype(float) - expected).max() <= 1
        assert rgba[view, 16, 16, 3] == 255 and rgba[view, 0, 0, 3] == 0


def test_cli(tmp_path, capsys):
    out = tmp_path / "ds"
    assert tw.main([f"out={out}", "count=2", "heldout=1", "size=32", "groups=1",
                    "references=0"]) == 0
    assert "wrote 2 objects (1 train, 1 held out)" in capsys.readouterr().out
    rec = json.loads((out / "obj_00001" / "object.json").read_text())
    assert len(rec["groups"]) == 1 and [r["file"] for r in rec["references"]] == ["r0.png"]
    assert Image.open(out / "obj_00001" / "r0.png").size == (32, 32)
    assert tw.main([f"out={out}", "cuont=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "did you mean 'count'" in err
    assert tw.main([f"out={out}", "count=2", "heldout=3"]) == 2
    assert tw.main([f"out={out}", "count=4", "heldout=2", "heldout_pool=5"]) == 2
    assert "heldout_pool" in capsys.readouterr().err
    assert tw.main([f"out={out}", "count=4", "heldout=3", "heldout_pool=2"]) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("keep me")
    assert tw.main([f"out={tmp_path / 'other'}"]) == 2
    assert (tmp_path / "other" / "x.txt").read_text() == "keep me"


def test_heldout_pool_keeps_a_smaller_worlds_split():
    small = [f"obj_{i:05d}" for i in range(200)]
    big = [f"obj_{i:05d}" for i in range(2000)]
    held = tw.split_ids(small, 20, 0)["heldout"]
    # the shipped toy models' held-out set (README, examples/toy): it must not move
    assert held[:5] == ["obj_00015", "obj_00021", "obj_00029", "obj_00045", "obj_00047"]
    bigger = tw.split_ids(big, 20, 0, pool=200)
    assert bigger["heldout"] == held
    assert len(bigger["train"]) == 1980 and not set(bigger["train"]) & set(held)
    assert tw.split_ids(big, 20, 0)["heldout"] != held        # no pool: drawn from all 2000
