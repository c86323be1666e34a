"""The one command that re-creates the toy models: the whole chain at a few steps each."""

from pathlib import Path

import numpy as np
import pytest

from engine.toy_models import main


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy-models")
    assert main([f"out={root / 'models'}", f"data={root / 'data'}", "count=6", "heldout=1",
                 "steps_scale=0.001", "threads=1"]) == 0
    return root


def test_chain_produces_loadable_models(chain):
    from guidance.conditioners import OpenCLIPImageConditioner
    from guidance.model import MultiViewDiffusionModel

    models = chain / "models"
    for name in ("clip", "text", "stage1", "stage2"):
        assert (models / name).is_dir(), name
    stage2 = MultiViewDiffusionModel.from_pretrained(models / "stage2")
    assert stage2.info.conditioning == "image" and stage2.info.space == "pixel"
    text = MultiViewDiffusionModel.from_pretrained(models / "text")
    assert text.info.conditioning == "text"
    # the stage-2 model's cross-attention takes the CLIP image embedding as its whole context
    clip = OpenCLIPImageConditioner.from_pretrained(models / "clip")
    assert stage2.unet.config.cross_attention_dim == clip.embed_dim


def test_rerun_skips_finished_trainings(chain, capsys):
    assert main([f"out={chain / 'models'}", f"data={chain / 'data'}", "count=6", "heldout=1",
                 "steps_scale=0.001"]) == 0
    out = capsys.readouterr().out
    assert out.count("already trained") == 4


def test_bad_keys_are_user_errors(capsys):
    assert main(["steps_scal=2"]) == 2
    assert "did you mean 'steps_scale'" in capsys.readouterr().err
    assert main(["count=10", "heldout=2", "heldout_pool=11"]) == 2
    assert "heldout_pool" in capsys.readouterr().err


def test_manifest_records_command_and_trainings(chain):
    import json

    record = json.loads((chain / "models" / "manifest.json").read_text())
    assert record["command"] == "python -m engine.toy_models count=6 heldout=1 steps_scale=0.001"
    assert set(record["models"]) == {"clip", "text", "stage1", "stage2"}
    for name, info in record["models"].items():
        assert info["steps"] >= 2 and info["mib"] > 0 and np.isfinite(info["final_loss"]), name
