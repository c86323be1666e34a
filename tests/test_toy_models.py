"""The one command that re-creates the toy models: the whole chain at a few steps each."""

from pathlib import Path

import numpy as np
import torch
import pytest

from guidance.training.toy_models import MODEL_NAMES, main


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy-models")
    # width 2 / batch 2: the knobs for a bigger model, at a few steps like the rest
    assert main([f"out={root / 'models'}", f"data={root / 'data'}", "count=6", "heldout=1",
                 "steps_scale=0.001", "width=2", "batch=2", "threads=1"]) == 0
    return root


@pytest.mark.slow
def test_chain_produces_loadable_models(chain):
    from guidance.conditioners import conditioner_for
    from guidance.multiview.model import MultiViewDiffusionModel

    models = chain / "models"
    for name in MODEL_NAMES:
        assert (models / name).is_dir(), name
    stage2 = MultiViewDiffusionModel.from_pretrained(models / "stage2")
    assert stage2.info.conditioning == "image" and stage2.info.space == "pixel"
    text = MultiViewDiffusionModel.from_pretrained(models / "text")
    assert text.info.conditioning == "text"
    # the stage-2 model's cross-attention takes the CLIP image embedding as its whole context
    clip = conditioner_for("image").from_pretrained(models / "clip")
    assert stage2.unet.config.cross_attention_dim == clip.embed_dim
    # width 2 doubled the shipped recipe's channels and heads; stages 1 and 2 inherited them
    stage1 = MultiViewDiffusionModel.from_pretrained(models / "stage1")
    for model in (text, stage1, stage2):
        assert list(model.unet.config.block_out_channels) == [64, 128, 256]
        assert list(model.unet.config.attention_head_dim) == [2, 4, 8]
    # batch 2 reached the diffusion trainings, not the CLIP's
    from engine.config import read_yaml

    runs = models / "runs"
    assert read_yaml(runs / "clip" / "config.yaml")["batch_size"] != 2
    for name in ("text", "stage1", "stage2", "pointe"):
        assert read_yaml(runs / name / "config.yaml")["batch_size"] == 2, name
    # the point model reads the chain's CLIP image tower (its own copy in conditioner/)
    from guidance.pointcloud.picture import PointCloudModel

    pointe = PointCloudModel.load(models / "pointe")
    assert pointe.base.config.kind == "image-grid"
    torch.manual_seed(0)
    pictures = torch.rand(2, 3, 32, 32)
    grid = pointe.encoder.grid(pictures)                 # [N, width, tokens]
    assert tuple(grid.shape[1:]) == (pointe.base.config.grid_dim, pointe.base.config.grid_tokens)
    # the same tower as the chain's CLIP: its pooled embedding of the pictures is CLIP's
    with torch.no_grad():
        expected = clip(pictures)[:, 0].float()           # [N, L, D]: the pooled token first
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert torch.allclose(pointe.encoder.embedding(pictures), expected, atol=1e-5)
    # Compress3D: its copies of the image tower and of the chain's autoencoder are those
    from safetensors.torch import load_file

    from guidance.compress3d.pipeline import Compress3D

    c3d = Compress3D.load(models / "compress3d")
    assert torch.allclose(c3d.encoder.embedding(pictures), expected, atol=1e-5)
    mine = load_file(str(models / "compress3d" / "autoencoder" / "model.safetensors"))
    chains = load_file(str(models / "triplane-ae" / "model.safetensors"))
    assert mine.keys() == chains.keys() and all(torch.equal(mine[k], chains[k]) for k in mine)
    assert read_yaml(runs / "compress3d" / "config.yaml")["batch_size"] == 2
    # the interpolation model is the chain's stage-2 model fine-tuned: same architecture
    anchors = MultiViewDiffusionModel.from_pretrained(models / "anchors")
    assert read_yaml(runs / "anchors" / "config.yaml")["model"]["init"] == str(
        runs / "stage2" / "model")
    assert anchors.unet.config == stage2.unet.config


@pytest.mark.slow
def test_one_model_alone_keeps_the_others_records(chain, tmp_path):
    """models=[pointe] re-makes the point model alone, from out/clip; the manifest keeps
    the other models' records."""
    import json
    import shutil

    out = tmp_path / "models"
    out.mkdir()
    for name in ("clip", "text", "stage1", "stage2", "pointe"):
        shutil.copytree(chain / "models" / name, out / name)
    shutil.copy(chain / "models" / "manifest.json", out / "manifest.json")
    assert main([f"out={out}", f"data={chain / 'data'}", "count=6", "heldout=1",
                 "steps_scale=0.001", "threads=1", "models=[pointe]"]) == 0
    assert not (out / "runs" / "clip").exists()
    record = json.loads((out / "manifest.json").read_text())
    assert set(record["models"]) == set(MODEL_NAMES)
    assert record["command"].endswith("models=[pointe]")


@pytest.mark.slow
def test_rerun_skips_finished_trainings(chain, capsys):
    assert main([f"out={chain / 'models'}", f"data={chain / 'data'}", "count=6", "heldout=1",
                 "steps_scale=0.001", "width=2", "batch=2"]) == 0
    out = capsys.readouterr().out
    assert out.count("already trained") == len(MODEL_NAMES)


def test_bad_keys_are_user_errors(capsys):
    assert main(["steps_scal=2"]) == 2
    assert "did you mean 'steps_scale'" in capsys.readouterr().err
    assert main(["count=10", "heldout=2", "heldout_pool=11"]) == 2
    assert "heldout_pool" in capsys.readouterr().err
    assert main(["width=0"]) == 2
    assert "width must be >= 1" in capsys.readouterr().err
    assert main(["models=[pointy]"]) == 2
    assert "pointe" in capsys.readouterr().err


def test_a_model_without_what_it_needs_is_refused_before_anything_is_made(tmp_path, capsys):
    assert main([f"out={tmp_path / 'models'}", f"data={tmp_path / 'data'}",
                 "models=[pointe]"]) == 2
    assert "pointe needs the clip model" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_manifest_records_command_and_trainings(chain):
    import json

    record = json.loads((chain / "models" / "manifest.json").read_text())
    assert record["command"] == ("python -m guidance.training.toy_models count=6 heldout=1 "
                                 "steps_scale=0.001 width=2 batch=2")
    assert set(record["models"]) == set(MODEL_NAMES)
    for name, info in record["models"].items():
        assert info["steps"] >= 2 and info["mib"] > 0 and np.isfinite(info["final_loss"]), name
