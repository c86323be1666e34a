"""The multi-view dataset format: writer -> loader round trip, validation, collate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from engine.cameras import Cameras
from engine.errors import InputError
from engine.datasets.mvdataset import MultiViewDataset, collate, write_index, write_object


def _rgba(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    img = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
    img[:4, :, 3] = 0          # some fully transparent and some opaque pixels
    img[-4:, :, 3] = 255
    return img


def _views(rng, groups: int = 2, references: int = 2, size: int = 32):
    """(views, group index lists, reference indices) with engine cameras."""
    views, group_idx = [], []
    for g in range(groups):
        el, off, fov = rng.uniform(0, 30), rng.uniform(0, 360), rng.uniform(30, 50)
        cams = Cameras.from_spherical(el, (off + 90.0 * np.arange(4)) % 360, 2.5 + g, fov)
        group_idx.append(list(range(len(views), len(views) + 4)))
        views += [(_rgba(rng, size), cams[k]) for k in range(4)]
    ref_idx = []
    for _ in range(references):
        cam = Cameras.from_spherical(rng.uniform(-10, 40), rng.uniform(0, 360), 2.2, 40.0)
        ref_idx.append(len(views))
        views.append((_rgba(rng, size), cam))
    return views, group_idx, ref_idx


def _white(rgba: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(rgba).permute(2, 0, 1).float() / 255.0
    return t[:3] * t[3:] + (1.0 - t[3:])


@pytest.fixture
def dataset(tmp_path: Path):
    rng = np.random.default_rng(0)
    written = {}
    for i in range(3):
        views, groups, refs = _views(rng, references=0 if i == 2 else 2)
        oid = f"obj_{i}"
        mesh = trimesh.creation.box() if i == 0 else None
        write_object(tmp_path, oid, views, groups, refs, caption=f"thing {i}" if i else None,
                     mesh=mesh)
        written[oid] = (views, groups, refs)
    write_index(tmp_path, list(written), {"train": ["obj_0", "obj_2"], "heldout": ["obj_1"]},
                image_size=32)
    return tmp_path, written


def test_round_trip_exact(dataset):
    root, written = dataset
    ds = MultiViewDataset(root)
    assert ds.ids == ["obj_0", "obj_1", "obj_2"] and ds.skipped == [] and len(ds) == 3
    torch.manual_seed(0)
    seen_groups = set()
    for _ in range(6):
        for i, oid in enumerate(ds.ids):
            s = ds[i]
            views, groups, refs = written[oid]
            g = s["group"]
            seen_groups.add((oid, g))
            assert s["id"] == oid
            assert s["caption"] == ("" if i == 0 else f"thing {i}")
            idx = groups[g]
            exp = torch.stack([_white(views[j][0]) for j in idx])
            assert s["images"].shape == (4, 3, 32, 32)
            assert torch.equal(s["images"], exp)   # composited on white, exactly
            alpha = torch.stack([torch.from_numpy(views[j][0][..., 3]).float()[None] / 255
                                 for j in idx])
            assert torch.equal(s["masks"], alpha)
            cams = [views[j][1] for j in idx]
            assert torch.equal(s["c2w"], torch.cat([c.c2w for c in cams]))
            for k in ("elevation", "azimuth", "distance"):
                assert torch.equal(s[k], torch.cat([getattr(c, k) for c in cams]))
            assert torch.allclose(s["fovy"], torch.rad2deg(torch.cat([c.fovy for c in cams])),
                                  atol=1e-5)
            if refs:
                match = [j for j in refs if torch.equal(views[j][1].c2w[0], s["reference_c2w"])]
                assert len(match) == 1
                assert torch.equal(s["reference"], _white(views[match[0]][0]))
                assert float(s["reference_azimuth"]) == float(views[match[0]][1].azimuth[0])
            else:
                assert "reference" not in s
    assert {g for o, g in seen_groups if o == "obj_0"} == {0, 1}   # the group is random
    assert ds.mesh_path(0).endswith("mesh.obj") and ds.mesh_path(1) is None
    assert len(trimesh.load(ds.mesh_path(0)).faces) == 12


def test_cameras_and_collate(dataset):
    root, written = dataset
    ds = MultiViewDataset(root)
    torch.manual_seed(1)
    items = [ds[0], ds[2], ds[1]]
    cams = ds.cameras(items[0])
    assert len(cams) == 4 and cams.views_per_object == 4
    assert torch.equal(cams.c2w, items[0]["c2w"])
    views, groups, _ = written["obj_0"]
    ref = torch.cat([views[j][1].fovy for j in groups[items[0]["group"]]])
    assert torch.allclose(cams.fovy, ref, atol=1e-6)

    batch = collate(items)
    assert batch["images"].shape == (3, 4, 3, 32, 32) and batch["c2w"].shape == (3, 4, 4, 4)
    assert batch["id"] == ["obj_0", "obj_2", "obj_1"] and batch["caption"][2] == "thing 1"
    assert batch["group"].dtype == torch.long and batch["group"].shape == (3,)
    # obj_2 has no reference: filled in, and flagged
    assert batch["has_reference"].tolist() == [True, False, True]
    assert torch.equal(batch["reference"][1], torch.ones(3, 32, 32))
    assert torch.equal(batch["reference_c2w"][1], torch.eye(4))
    assert torch.equal(batch["reference"][0], items[0]["reference"])
    bc = ds.cameras(batch)
    assert len(bc) == 12 and bc.views_per_object == 4
    assert torch.equal(bc.c2w[4:8], items[1]["c2w"])
    rc = ds.reference_cameras(batch)
    assert len(rc) == 3 and torch.equal(rc.c2w[2], items[2]["reference_c2w"])
    # a DataLoader with it as collate_fn
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=MultiViewDataset.collate)
    assert [b["images"].shape[0] for b in loader] == [2, 1]


def test_splits_resize_and_no_reference(dataset):
    root, _ = dataset
    assert MultiViewDataset(root, split="train").ids == ["obj_0", "obj_2"]
    assert MultiViewDataset(root, split="heldout").ids == ["obj_1"]
    with pytest.raises(InputError, match="no split 'heldot'.*did you mean 'heldout'"):
        MultiViewDataset(root, split="heldot")
    ds = MultiViewDataset(root, image_size=16, with_reference=False)
    s = ds[0]
    assert s["images"].shape == (4, 3, 16, 16) and s["masks"].shape == (4, 1, 16, 16)
    assert "reference" not in s
    assert float(s["images"].min()) >= 0.0 and float(s["images"].max()) <= 1.0
    # transparent top rows stay white after premultiplied resampling
    assert torch.allclose(s["images"][:, :, :1], torch.ones(4, 3, 1, 16))


def _break(root: Path):
    """Six broken copies of obj_1 and what the loader should say about each."""
    good = root / "obj_1"
    cases = {}

    def clone(name):
        dst = root / name
        dst.mkdir()
        for f in good.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        return dst

    d = clone("missing_png")
    (d / "g1_v2.png").unlink()
    cases["missing_png"] = "missing image g1_v2.png"
    d = clone("garbage_png")
    (d / "g0_v1.png").write_bytes(b"not a png at all" * 10)
    cases["garbage_png"] = "corrupt image g0_v1.png"
    d = clone("truncated_png")
    data = (d / "r1.png").read_bytes()
    (d / "r1.png").write_bytes(data[: len(data) // 2])
    cases["truncated_png"] = "corrupt image r1.png"
    d = clone("broken_json")
    (d / "object.json").write_text((d / "object.json").read_text()[:-20])
    cases["broken_json"] = "object.json is not valid JSON"
    d = clone("three_views")
    rec = json.loads((d / "object.json").read_text())
    rec["groups"][1]["views"].pop()
    (d / "object.json").write_text(json.dumps(rec))
    cases["three_views"] = "group 1: has 3 views, expected 4"
    d = clone("y_up")
    rec = json.loads((d / "object.json").read_text())
    c2w = np.array(rec["groups"][0]["views"][0]["c2w"])
    swap = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], float)
    rec["groups"][0]["views"][0]["c2w"] = (swap @ c2w).tolist()
    (d / "object.json").write_text(json.dumps(rec))
    cases["y_up"] = "check the conventions"
    return cases


def test_validation_skips_and_counts(dataset, capsys):
    root, _ = dataset
    cases = _break(root)
    ids = ["obj_0", *cases, "obj_1", "nonexistent"]
    write_index(root, ids, image_size=32)
    ds = MultiViewDataset(root)
    assert ds.ids == ["obj_0", "obj_1"]
    reasons = dict(ds.skipped)
    assert len(ds.skipped) == 7 and reasons["nonexistent"] == "folder missing"
    for oid, expected in cases.items():
        assert expected in reasons[oid], (oid, reasons[oid])
        assert "\n" not in reasons[oid]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 7 of 9 objects" in err[0] and "missing_png" in err[0]
    # every epoch runs through without an error
    torch.manual_seed(0)
    for _ in range(3):
        for b in torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate):
            assert b["images"].shape[1:] == (4, 3, 32, 32)


def test_validation_strict_one_line(dataset):
    root, _ = dataset
    _break(root)
    write_index(root, ["obj_0", "three_views", "missing_png"], image_size=32)
    with pytest.raises(InputError) as info:
        MultiViewDataset(root, strict=True)
    msg = str(info.value)
    assert "\n" not in msg and "object three_views" in msg and "has 3 views" in msg
    # with num_views=3 that group is the only fine one... but the other group has 4 views
    write_index(root, ["three_views"], image_size=32)
    with pytest.raises(InputError, match="no usable objects.*group 0: has 4 views, expected 3"):
        MultiViewDataset(root, num_views=3)


def test_bad_index_is_fatal(tmp_path):
    with pytest.raises(InputError, match="dataset.json not found"):
        MultiViewDataset(tmp_path)
    (tmp_path / "dataset.json").write_text('{"format": "engine-multiview", "version": 1, ')
    with pytest.raises(InputError, match="not valid JSON"):
        MultiViewDataset(tmp_path)
    (tmp_path / "dataset.json").write_text('{"format": "other", "version": 1, "objects": []}')
    with pytest.raises(InputError, match="'format' must be"):
        MultiViewDataset(tmp_path)
    write_index(tmp_path, [], image_size=8)
    with pytest.raises(InputError, match="no usable objects"):
        MultiViewDataset(tmp_path)


def test_group_spacing_and_shared_camera_checked(dataset):
    root, _ = dataset
    folder = root / "obj_1"
    rec = json.loads((folder / "object.json").read_text())
    # views given in another order are fine (the set of azimuths is what matters)
    rec["groups"][0]["views"] = rec["groups"][0]["views"][::-1]
    (folder / "object.json").write_text(json.dumps(rec))
    write_index(root, ["obj_1"], image_size=32)
    assert MultiViewDataset(root).ids == ["obj_1"]
    # a view 60 degrees from its neighbour is not a 4-view group
    rng = np.random.default_rng(3)
    cams = Cameras.from_spherical(10.0, [0.0, 60.0, 180.0, 270.0], 2.0, 40.0)
    write_object(root, "bad_spacing", [(_rgba(rng), cams[k]) for k in range(4)], [[0, 1, 2, 3]])
    cams = Cameras.from_spherical([10.0, 10.0, 20.0, 10.0], [0, 90, 180, 270], 2.0, 40.0)
    write_object(root, "bad_elevation", [(_rgba(rng), cams[k]) for k in range(4)],
                 [[0, 1, 2, 3]])
    write_index(root, ["bad_spacing", "bad_elevation"], image_size=32)
    with pytest.raises(InputError, match="not 90 degrees apart"):
        MultiViewDataset(root, strict=True)
    write_index(root, ["bad_elevation"], image_size=32)
    with pytest.raises(InputError, match="must share elevation"):
        MultiViewDataset(root, strict=True)


def test_file_broken_after_validation_does_not_stop_the_epoch(dataset, capsys):
    root, _ = dataset
    ds = MultiViewDataset(root, split="train")
    for f in (root / "obj_0").glob("g*.png"):
        f.write_bytes(b"gone bad")
    torch.manual_seed(0)
    s = ds[0]
    assert s["id"] == "obj_2"
    assert "obj_0 failed to load" in capsys.readouterr().err


def test_writer_rejects_bad_input(tmp_path):
    rng = np.random.default_rng(0)
    cam = Cameras.from_spherical(0.0, 0.0, 2.0, 40.0)
    with pytest.raises(ValueError, match="uint8"):
        write_object(tmp_path, "a", [(np.zeros((8, 8, 3), np.uint8), cam)], [[0]])
    with pytest.raises(ValueError, match="plain folder name"):
        write_object(tmp_path, "../a", [(_rgba(rng), cam)], [[0]])
    with pytest.raises(ValueError, match="out of range"):
        write_object(tmp_path, "a", [(_rgba(rng), cam)], [[0, 1]])
