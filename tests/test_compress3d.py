"""Compress3D's shape prior and triplane latent diffusion (guidance.compress3d.latent_diffusion),
their training mode (triplane-diffusion), the picture -> mesh command
(python -m guidance.sample_triplane) and the triplane's init: compress3d."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from guidance.compress3d.autoencoder import TriplaneAEConfig, TriplaneAutoencoder
from guidance.compress3d.latent_diffusion import (Compress3DDiffusion, LatentDiffusionConfig,
                                                  shape_embedding, timestep_embedding)
from guidance.training.command import main as train_main

ROOT = Path(__file__).resolve().parent.parent
TOY_MODEL = ROOT / "models" / "toy" / "compress3d"


def test_timestep_embedding_is_cos_then_sin_of_geometric_frequencies():
    e = timestep_embedding(torch.tensor([0, 10]), 6)
    assert torch.allclose(e[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    freqs = [10000 ** (-k / 3) for k in range(3)]
    expect = [math.cos(10 * f) for f in freqs] + [math.sin(10 * f) for f in freqs]
    assert torch.allclose(e[1], torch.tensor(expect), atol=1e-5)


def test_shape_embedding_is_the_texel_mean_per_plane_and_channel():
    z = torch.zeros(1, 3, 2, 2, 2)
    z[0, 1, 0] = torch.tensor([[1.0, 2.0], [3.0, 6.0]])     # plane xz, channel 0: mean 3
    z[0, 2, 1] = 4.0                                          # plane yz, channel 1: mean 4
    assert shape_embedding(z).tolist() == [[0.0, 0.0, 3.0, 0.0, 0.0, 4.0]]
    ae = TriplaneAutoencoder(TriplaneAEConfig(volume=4, width=4, heads=1, latent_channels=2))
    assert torch.equal(ae.shape_embedding(z), shape_embedding(z))


def _tiny(shape_condition=True, cond_dim=4, latent=(3, 2, 2, 2)):
    torch.manual_seed(0)
    return Compress3DDiffusion(LatentDiffusionConfig(
        latent_shape=list(latent), cond_dim=cond_dim, width=32, layers=2, heads=2,
        prior_width=32, prior_layers=2, shape_condition=shape_condition, timesteps=100))


def test_statistics_normalise_each_plane_channel_and_the_shape_embedding():
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 5.0, 0.2, 3.0, 2.0, 7.0]).reshape(3, 2, 1, 1)
    latents = torch.randn(64, 3, 2, 2, 2, generator=g) * scale + 2.0
    model.set_statistics(latents)
    z, s = model.normalise(latents)
    assert torch.allclose(z.mean(dim=(0, 3, 4)), torch.zeros(3, 2), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 3, 4)), torch.ones(3, 2), atol=1e-4)
    assert torch.allclose(s.mean(0), torch.zeros(6), atol=1e-5)
    assert torch.allclose(s.std(0), torch.ones(6), atol=1e-4)


def test_dropped_conditions_make_the_loss_blind_to_the_picture():
    model = _tiny()
    torch.nn.init.normal_(model.denoiser.x_out.weight, std=0.1)   # zero at init: blind anyway
    latents = torch.randn(4, 3, 2, 2, 2)
    a = model.losses(latents, torch.randn(4, 4), torch.Generator().manual_seed(1), 1.0)
    b = model.losses(latents, torch.randn(4, 4), torch.Generator().manual_seed(1), 1.0)
    assert all(torch.equal(a[k], b[k]) for k in ("prior", "latent"))
    c = model.losses(latents, torch.randn(4, 4), torch.Generator().manual_seed(1), 0.0)
    assert not torch.equal(a["latent"], c["latent"])


def test_two_pictures_two_shapes_the_models_learn_which_is_which():
    """Two embeddings, two latents (a 'sphere' and a 'box' pattern): after a short training
    both samplers draw the latent (and shape embedding) of the picture they are given."""
    torch.manual_seed(0)
    model = _tiny()
    pos = torch.linspace(-1, 1, 2)
    a = torch.ones(3, 2, 2, 2) * pos[None, None, :, None]
    latents = torch.stack([a, -a + 0.5])                                   # [2, 3, 2, 2, 2]
    embeddings = torch.eye(4)[:2]
    model.set_statistics(latents.repeat(8, 1, 1, 1, 1) + 0.01 * torch.randn(16, 3, 2, 2, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, 2, (32,), generator=g)
        losses = model.losses(latents[idx], embeddings[idx], g, cfg_dropout=0.1)
        opt.zero_grad()
        (losses["latent"] + losses["prior"]).backward()
        opt.step()
    model.eval()
    z, s = model.sample(embeddings, steps=20, guidance_scale=2.0,
                        generator=torch.Generator().manual_seed(3))
    err_right = (z - latents).abs().mean(dim=(1, 2, 3, 4))
    err_swapped = (z - latents.flip(0)).abs().mean(dim=(1, 2, 3, 4))
    assert bool((err_right < 0.25).all()) and bool((err_right * 3 < err_swapped).all())
    s_true = model.normalise(latents)[1]
    assert ((s - s_true).abs().mean(1) < (s - s_true.flip(0)).abs().mean(1)).all()


def test_a_model_without_the_shape_embedding_samples_from_the_picture_alone():
    model = _tiny(shape_condition=False).eval()
    z, s = model.sample(torch.randn(2, 4), steps=3, generator=torch.Generator().manual_seed(0))
    assert s is None and z.shape == (2, 3, 2, 2, 2) and torch.isfinite(z).all()
    assert model.denoiser.shape is None


def test_saved_models_load_and_sample_the_same(tmp_path):
    from engine.errors import UserError

    model = _tiny()
    model.set_statistics(torch.randn(8, 3, 2, 2, 2) * 3 + 1)
    model.save_pretrained(tmp_path / "m", extra={"sampler": {"steps": 4}})
    again = Compress3DDiffusion.from_pretrained(tmp_path / "m")
    e = torch.randn(2, 4)
    z1, _ = model.eval().sample(e, 4, generator=torch.Generator().manual_seed(5))
    z2, _ = again.sample(e, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(z1, z2)
    with pytest.raises(UserError, match="not a Compress3D model folder"):
        Compress3DDiffusion.from_pretrained(tmp_path)
    record = json.loads((tmp_path / "m" / "config.json").read_text())
    record["config"]["width"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="does not fit"):
        Compress3DDiffusion.from_pretrained(tmp_path / "m")


# -- the training mode ------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from engine.datasets.toy_world import generate

    root = tmp_path_factory.mktemp("c3d") / "data"
    generate(root, count=3, heldout=1, seed=0, size=32, groups=1, references=1)
    ae = tmp_path_factory.mktemp("c3d-ae") / "ae"
    torch.manual_seed(0)
    TriplaneAutoencoder(TriplaneAEConfig(volume=4, width=8, heads=1, latent_channels=2,
                                         decoder_hidden=8)).save_pretrained(ae)
    return root, ae


def run_args(world, out, *extra):
    root, ae = world
    return ["recipe=toy-compress3d", f"data.root={root}", f"out={out}",
            f"model.latent.autoencoder={ae}", "model.latent.width=16", "model.latent.layers=1",
            "model.latent.heads=2", "model.latent.prior_width=16", "model.latent.prior_layers=1",
            "points.pool=256", "points.cloud_points=64", "points.image_size=32",
            "points.sample_steps=2", "batch_size=3", "steps=4", "checkpoint_every=2",
            "log_every=1", "warmup=0", "sample_every=-1", "average_decay=0", *extra]


def test_training_resumes_to_the_same_model_and_saves_a_complete_folder(world, tmp_path):
    from safetensors.torch import load_file

    from guidance.compress3d.pipeline import Compress3D

    full = tmp_path / "full"
    assert train_main(run_args(world, full)) == 0
    part = tmp_path / "part"
    shutil.copytree(full, part)
    assert train_main([f"resume={part / 'checkpoints' / '00-triplane-diffusion-0000002.safetensors'}"]) == 0
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(part / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["prior"]) and np.isfinite(r["latent"]) for r in rows)
    # the statistics are the training latents': not the defaults
    assert not torch.equal(a["latent_std"], torch.ones_like(a["latent_std"]))
    model = Compress3D.load(full / "model")
    assert model.diffusion.config.latent_shape == [3, 2, 2, 2]
    assert model.encoder.embed_dim == model.diffusion.config.cond_dim
    assert model.steps == 2


def test_training_mistakes_are_one_line(world, tmp_path, capsys):
    assert train_main(run_args(world, tmp_path / "a", "model.latent.heads=3")) == 2
    assert "heads" in capsys.readouterr().err
    assert train_main(run_args(world, tmp_path / "b", f"model.latent.autoencoder={tmp_path}")) == 2
    assert "not a triplane autoencoder folder" in capsys.readouterr().err
    assert train_main(run_args(world, tmp_path / "c", "model.latent.cond_dim=8")) == 2
    assert "set by the run" in capsys.readouterr().err
    assert train_main(run_args(world, tmp_path / "d", "model.latent.prior_weight=-1")) == 2
    assert "prior_weight" in capsys.readouterr().err
    assert train_main(run_args(world, tmp_path / "e", "loss_weighting=min-snr")) == 2
    assert "triplane-diffusion" in capsys.readouterr().err
    assert train_main(run_args(world, tmp_path / "f", f"model.init={tmp_path}")) == 2
    assert "not a Compress3D model folder" in capsys.readouterr().err
    assert not any((tmp_path / n / "model").exists() for n in "abcdef")


# -- the command and the representation's start --------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "guidance.sample_triplane", *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_sample_triplane_refuses_bad_input_in_one_line(tmp_path):
    r = _cli(f"image={tmp_path / 'none.png'}", f"out={tmp_path / 'o'}")
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.png").write_bytes(b"not a png")
    r = _cli(f"image={tmp_path / 'bad.png'}", f"model={tmp_path}", f"out={tmp_path / 'o'}")
    assert r.returncode == 2 and "not a Compress3D model folder" in r.stderr
    r = _cli("image=examples/toy/red-mug.png", "resolution=4", f"out={tmp_path / 'o'}")
    assert r.returncode == 2 and "resolution" in r.stderr
    assert not (tmp_path / "o").exists()


def test_the_run_refuses_a_missing_model_before_writing(tmp_path, capsys):
    from engine.run import main as run_main

    code = run_main(["recipe=compress3d-toy", "image=examples/toy/red-mug.png",
                     f"out={tmp_path / 'run'}",
                     f"stages.triplane.representation.compress3d.model={tmp_path / 'nope'}"])
    assert code == 2
    assert "compress3d.model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


needs_toy = pytest.mark.skipif(not (TOY_MODEL / "model.safetensors").is_file(),
                               reason="models/toy/compress3d is not built")


@pytest.mark.slow
@needs_toy
def test_the_toy_model_makes_a_red_mug_of_the_red_mug(tmp_path):
    """The shipped model, end to end: a mesh of the right colour and a mug-sized extent."""
    import trimesh

    r = _cli("image=examples/toy/red-mug.png", f"out={tmp_path / 'o'}")
    assert r.returncode == 0, r.stderr
    mesh = trimesh.load(str(tmp_path / "o" / "mesh.ply"), process=False)
    rgb = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(float) / 255
    assert rgb[:, 0].mean() > rgb[:, 1].mean() + 0.2 and rgb[:, 0].mean() > rgb[:, 2].mean() + 0.2
    extent = mesh.bounds[1] - mesh.bounds[0]
    assert 0.3 < extent.max() < 2.0
    assert (tmp_path / "o" / "mesh.glb").is_file() and (tmp_path / "o" / "preview.png").is_file()


@pytest.mark.slow
@needs_toy
def test_a_triplane_started_by_compress3d_holds_the_decoded_shape():
    """init: compress3d distils the decoded field: the triplane's density at its threshold
    agrees with the decoded occupancy on a grid, and its colour with the decoded colour."""
    from engine.config import validate_component
    from engine.config import build as build_component
    from guidance.compress3d.autoencoder import occupancy_grid_points
    from guidance.compress3d.pipeline import Compress3D

    image = str(ROOT / "examples" / "toy" / "red-mug.png")
    spec = {"type": "triplane", "init": "compress3d", "resolution": 32, "channels": 8,
            "isosurface_threshold": 10.0, "blob_density": 30.0, "blob_radius": 0.5,
            "compress3d": {"model": str(TOY_MODEL), "image": image, "seed": 0}}
    rep = build_component("representation", validate_component("representation", spec, "rep"),
                          device=torch.device("cpu"))
    model = Compress3D.load(TOY_MODEL)
    latents, _ = model.latent(model.picture(image).rgb.permute(2, 0, 1)[None], seed=0)
    field = model.field(latents[0], level=10.0)
    pts = occupancy_grid_points(24, 1.0) * 0.95
    with torch.no_grad():
        truth = field.density(pts) > 10.0
        mine = rep.density(pts) > 10.0
        iou = float((truth & mine).sum() / (truth | mine).sum())
        inside = pts[truth]
        colour_err = float((rep.albedo(inside) - field.albedo(inside)).abs().mean())
    assert iou > 0.6 and colour_err < 0.15, (iou, colour_err)


def test_group_rows_take_each_group_in_every_cyclic_order(tmp_path):
    """Two objects: one group of 4 views + a reference, then two groups + no reference; the
    rows index the pairs (groups' views first per object, then references) of each group in
    its 4 cyclic orders."""
    from types import SimpleNamespace

    from engine.errors import InputError
    from guidance.training.triplane_diffusion import group_rows

    def obj(name, groups, refs):
        (tmp_path / name).mkdir()
        record = {"groups": [{"views": [{"file": f"g{g}_v{v}.png"} for v in range(4)]}
                             for g in range(groups)],
                  "references": [{"file": f"r{r}.png"} for r in range(refs)]}
        (tmp_path / name / "object.json").write_text(json.dumps(record))

    obj("a", 1, 1)
    obj("b", 2, 0)
    pairs = SimpleNamespace(root=tmp_path, ids=["a", "b"],
                            object_index=torch.tensor([0] * 5 + [1] * 8))
    rows = group_rows(pairs, 4)
    assert rows[:4] == [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]]
    assert rows[4] == [5, 6, 7, 8] and rows[8] == [9, 10, 11, 12] and rows[11] == [12, 9, 10, 11]
    assert len(rows) == 12
    with pytest.raises(InputError, match="not data.num_views=3"):
        group_rows(pairs, 3)


def test_a_views_conditioned_model_reads_a_group_of_embeddings(world, tmp_path):
    """points.views=groups trains a model whose condition is the K views of a group; it
    refuses a single embedding and samples from a group."""
    from guidance.compress3d.pipeline import Compress3D

    out = tmp_path / "views"
    assert train_main(run_args(world, out, "points.views=groups", "data.num_views=4",
                               "batch_size=2", "checkpoint_every=0")) == 0
    model = Compress3D.load(out / "model")
    assert model.views == 4 and model.record["views"]["views"] == 4
    e = torch.nn.functional.normalize(torch.randn(1, 4, model.diffusion.config.cond_dim), dim=-1)
    z, _ = model.diffusion.sample(e, 2, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, *model.diffusion.config.latent_shape) and torch.isfinite(z).all()
    with pytest.raises(ValueError, match="4 embedding"):
        model.diffusion.sample(e[:, 0], 2)
    assert train_main(run_args(world, tmp_path / "x", "points.views=groups",
                               "mode=points")) == 2
