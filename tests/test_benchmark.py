"""The held-out toy benchmark (`python -m engine.evaluate bench=toy ...`): tables, pictures,
failed rows kept, user errors, and the single-pair mode still in place."""

import json
import math
import shutil
from pathlib import Path

import pytest
import trimesh
from PIL import Image

from engine.evaluate.benchmark import DATA_SIZE, means
from engine.evaluate import main

SMALL = ["stages.fit.steps=5", "stages.fit.resolution=16", "inputs.image_size=32",
         "export.mesh_resolution=24", "export.texture_size=32",
         "export.turntable.enabled=false", "system.threads=1", "samples=2000"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench=toy", "recipe=initial", "recipe=fit-image", f"out={out}", "objects=1",
                 *SMALL])
    return out, code


@pytest.mark.slow
def test_bench_writes_tables_chart_and_sheet(bench):
    out, code = bench
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert [(r["recipe"], r["ok"]) for r in rows] == [("initial", True), ("fit-image", True)]
    assert rows[0]["object"] == rows[1]["object"]
    heldout = json.loads((out / "data" / "dataset.json").read_text())["splits"]["heldout"]
    assert rows[0]["object"] == heldout[0]     # the first held-out object
    for r in rows:
        for k in ("chamfer", "volume_iou", "f_score", "psnr", "ssim", "seconds"):
            assert math.isfinite(r[k]), (k, r)
        assert 0.0 <= r["volume_iou"] <= 1.0 and 0.0 <= r["f_score"] <= 1.0
        assert r["chamfer"] > 0.0 and -1.0 <= r["ssim"] <= 1.0 and r["psnr"] > 5.0
        assert Path(r["mesh"]).is_file()
        assert (Path(r["run"]) / "bench" / "view0.png").is_file()
    # a single row's mean is the row itself
    assert result["means"]["fit-image"]["chamfer"] == rows[1]["chamfer"]
    assert result["means"]["initial"]["failed"] == 0
    assert result["settings"]["overrides"][0] == "stages.fit.steps=5"
    assert result["command"].startswith("python -m engine.evaluate bench=toy")
    md = (out / "results.md").read_text()
    assert "| recipe | object | chamfer" in md
    assert md.count(f"| initial | {rows[0]['object']} |") == 1
    assert md.count(f"| fit-image | {rows[0]['object']} |") == 1
    assert f"{rows[1]['chamfer']:.4f}" in md
    with Image.open(out / "chart.png") as im:
        assert im.width > 100 and im.height > 100
    with Image.open(out / "contact_sheet.png") as im:
        # label column + 5 tiles wide, header + one row of tiles per result row
        assert im.size == (150 + 5 * 96, 16 + 2 * 96)


@pytest.mark.slow
def test_failed_row_is_kept_and_exit_code_is_1(bench, tmp_path):
    src, _ = bench
    data = tmp_path / "data"
    shutil.copytree(src / "data", data)
    heldout = json.loads((data / "dataset.json").read_text())["splits"]["heldout"]
    (data / heldout[1] / "mesh.obj").unlink()          # the second object cannot be scored
    out = tmp_path / "bench"
    code = main(["bench=toy", "recipe=initial", f"out={out}", "objects=2", f"data={data}",
                 *SMALL])
    assert code == 1
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert [(r["object"], r["ok"]) for r in rows] == [(heldout[0], True), (heldout[1], False)]
    assert "mesh.obj" in rows[1]["error"]
    assert math.isfinite(rows[0]["chamfer"])
    assert result["means"]["initial"]["failed"] == 1
    assert result["means"]["initial"]["chamfer"] == rows[0]["chamfer"]
    assert "failed" in (out / "results.md").read_text()
    assert (out / "contact_sheet.png").is_file() and (out / "chart.png").is_file()
    assert not (out / "data").exists()                  # data= is reused, not regenerated


def test_means_skip_failed_rows():
    rows = [{"recipe": "a", "ok": True, "chamfer": 0.1, "volume_iou": 0.5, "f_score": 0.2,
             "psnr": 20.0, "ssim": 0.5, "seconds": 1.0},
            {"recipe": "a", "ok": True, "chamfer": 0.3, "volume_iou": 0.7, "f_score": 0.4,
             "psnr": 30.0, "ssim": 0.7, "seconds": 3.0},
            {"recipe": "a", "ok": False}, {"recipe": "b", "ok": False}]
    m = means(rows, ["a", "b"])
    assert m["a"]["chamfer"] == pytest.approx(0.2) and m["a"]["psnr"] == pytest.approx(25.0)
    assert (m["a"]["rows"], m["a"]["failed"]) == (3, 1)
    assert m["b"]["chamfer"] is None and m["b"]["failed"] == 1


@pytest.mark.parametrize("args", [["recipe=no-such-recipe"], ["recipe=initial", "oops"],
                                  ["recipe=initial", "objects=0"],
                                  ["recipe=initial", "stages.nosuch.steps=3"],
                                  ["recipe=initial", "objects=many"], ["recipe="], [],
                                  ["recipe=initial", "image=x.png"],
                                  ["recipe=initial", "--objects", "2"],
                                  ["recipe=initial", "seed=1", "seed=2"]])
def test_user_errors_exit_2_with_one_line(args, tmp_path, capsys):
    assert main(["bench=toy", f"out={tmp_path / 'b'}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()   # nothing generated before validation
    if args and args[0] == "recipe=no-such-recipe":
        assert "no-such-recipe" in err


def test_bench_help_and_bad_bench(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench=toy", "--help"])
    assert exit_info.value.code == 0
    assert "recipe=NAME [recipe=NAME ...]" in capsys.readouterr().out
    assert main(["bench=tyo", "recipe=initial"]) == 2
    assert "bench: 'tyo' is not one of toy (did you mean 'toy'?)" in capsys.readouterr().err


def test_pair_mode_still_works(tmp_path, capsys):
    path = tmp_path / "box.obj"
    trimesh.creation.box(extents=(1.0, 0.6, 0.4)).export(path)
    assert main([str(path), str(path), "samples=2000", f"json={tmp_path / 's.json'}"]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    # a mesh against itself: only the two independent surface samples differ
    assert scores["chamfer"] < 0.03 and scores["yaw"] == 0.0
    assert scores["volume_iou"] == pytest.approx(1.0) and scores["f_score"] > 0.99
    assert "chamfer" in capsys.readouterr().out


@pytest.mark.slow
def test_dataset_size_is_the_render_size(bench):
    out, _ = bench
    row = json.loads((out / "results.json").read_text())["rows"][1]
    with Image.open(Path(row["run"]) / "bench" / "view0.png") as im:
        assert im.size == (DATA_SIZE, DATA_SIZE)


@pytest.mark.slow
def test_export_failure_is_a_recorded_row(bench, tmp_path):
    src, _ = bench
    out = tmp_path / "bench"
    code = main(["bench=toy", "recipe=initial", "recipe=fit-image", f"out={out}", "objects=1",
                 f"data={src / 'data'}", *SMALL,
                 "stages.fit.representation.isosurface_threshold=1e6"])   # nothing that dense
    assert code == 1
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["recipe"], r["ok"]) for r in rows] == [("initial", False), ("fit-image", False)]
    assert all("isosurface_threshold" in r["error"] or "surface" in r["error"] for r in rows)
    assert all(r["seconds"] >= 0.0 for r in rows)


def test_shape_checks_prefer_own_truths(tmp_path):
    from engine.evaluate.benchmark import shape_checks

    shapes = {"tall": (0.2, 0.3, 1.0), "flat": (1.0, 0.8, 0.2), "also-tall": (0.25, 0.2, 0.9)}
    objects, rows = {}, []
    for name, ext in shapes.items():
        obj = tmp_path / name
        obj.mkdir()
        trimesh.creation.box(extents=ext).export(obj / "mesh.obj")
        kind = "flat" if name == "flat" else "tall"
        (obj / "object.json").write_text(json.dumps({"kind": kind}))
        objects[name] = obj
        # recipe "right": each mesh a slightly different box of its own shape;
        # recipe "wrong": only tall and flat, their meshes exchanged
        right = tmp_path / f"right-{name}.obj"
        trimesh.creation.box(extents=[e * 1.1 for e in ext]).export(right)
        rows.append({"recipe": "right", "object": name, "ok": True, "mesh": str(right)})
    wrong = {"tall": rows[1]["mesh"], "flat": rows[0]["mesh"]}
    rows += [{"recipe": "wrong", "object": n, "ok": True, "mesh": m} for n, m in wrong.items()]
    rows.append({"recipe": "broken", "object": "tall", "ok": False})
    # recipe "blob": one mesh for every object, as the untrained initial shape
    rows += [{"recipe": "blob", "object": n, "ok": True, "mesh": rows[0]["mesh"]}
             for n in shapes]
    checks = shape_checks(rows, objects, ["right", "wrong", "broken", "blob"], samples=1000)
    # pairs of different kinds: (tall, flat) and (flat, also-tall); tall/also-tall left out
    assert checks["right"]["shape_swap"] == 1.0
    assert checks["wrong"]["shape_swap"] == 0.0
    assert checks["broken"]["shape_swap"] is None
    # every right mesh lies unusually near a truth of its kind (tall may pick also-tall);
    # chance: a blob for all would score 2/3 + 1/3 + 2/3
    assert checks["right"]["right_kind"] == 3.0
    assert checks["right"]["right_kind_chance"] == pytest.approx(5 / 3)
    assert checks["right"]["kind_rows"] == 3
    assert rows[1]["nearest_truth"] == "flat"
    assert rows[0]["nearest_truth"] in ("tall", "also-tall")
    # the exchanged meshes each lie near the other kind's truth
    assert checks["wrong"]["right_kind"] == 0.0
    assert [r["nearest_truth"] for r in rows[3:5]] == ["flat", "tall"]
    assert checks["broken"]["right_kind"] is None
    # the blob is equally near-or-far from each truth whatever the object: chance, no nearest
    assert checks["blob"]["right_kind"] == pytest.approx(checks["blob"]["right_kind_chance"])
    assert checks["blob"]["shape_swap"] == 0.5
    assert [r["nearest_truth"] for r in rows[-3:]] == [None, None, None]


def test_bench_world_holds_out_what_the_toy_models_never_saw():
    """The benchmark makes a smaller world than the models trained on; its held-out split
    must still be exactly theirs (else it would score objects they trained on)."""
    from engine.evaluate.benchmark import DATA_COUNT, DATA_HELDOUT
    from guidance.training.toy_models import DEFAULTS
    from engine.datasets.toy_world import split_ids

    ids = [f"obj_{i:05d}" for i in range(DEFAULTS["count"])]
    trained_on = split_ids(ids, DEFAULTS["heldout"], DEFAULTS["seed"], DEFAULTS["heldout_pool"])
    bench = split_ids(ids[:DATA_COUNT], DATA_HELDOUT, DEFAULTS["seed"])
    assert bench["heldout"] == trained_on["heldout"]
    assert not set(bench["heldout"]) & set(trained_on["train"])


def test_means_table_shows_the_shape_checks():
    from engine.evaluate.benchmark import markdown

    row = {"recipe": "r", "object": "obj_1", "ok": True, "chamfer": 0.1, "volume_iou": 0.3,
           "f_score": 0.2, "psnr": 13.0, "ssim": 0.6, "seconds": 9.0}
    mean = means([row], ["r"])
    mean["r"].update(shape_swap=0.75, right_kind=2.5, right_kind_chance=1.5, kind_rows=4)
    md = markdown([row], mean, "cmd")
    assert "| shape swap ↑ | right kind ↑ | seconds |" in md
    assert "| 0.750 | 2.5 / 4 (1.5) | 9.0 |" in md
    # without the checks (a table written while rows still run) neither column is there
    assert "right kind" not in markdown([row], means([row], ["r"]), "cmd")
