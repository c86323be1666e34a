"""guidance/compress3d/folders.py: the Compress3D models' folders, written and refused."""

import json
from dataclasses import dataclass

import pytest
import torch

from engine.errors import UserError
from guidance.compress3d.folders import (CONFIG_FILE, WEIGHTS_FILE, build_and_load,
                                         read_model_record, save_model_folder)


@dataclass
class TinyConfig:
    width: int = 3


class Tiny(torch.nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.config = cfg
        self.lin = torch.nn.Linear(cfg.width, 2)


def _read(folder):
    return read_model_record(folder, "tiny", "tiny model", "make one", key="stages.x.model")


def test_a_saved_folder_loads_back_equal_with_its_extra_record(tmp_path):
    torch.manual_seed(0)
    model = Tiny(TinyConfig(4))
    save_model_folder(model, tmp_path / "m", "tiny", model.config, {"steps": 7})
    record = _read(tmp_path / "m")
    assert record == {"kind": "tiny", "config": {"width": 4}, "steps": 7}
    back = build_and_load(Tiny, TinyConfig, record, tmp_path / "m")
    assert not back.training
    torch.testing.assert_close(back.lin.weight, model.lin.weight, rtol=0, atol=0)


def test_a_save_cut_short_is_no_model(tmp_path, monkeypatch):
    model = Tiny(TinyConfig())
    save_model_folder(model, tmp_path, "tiny", model.config)
    import safetensors.torch

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError):                    # the second save dies writing weights
        save_model_folder(model, tmp_path, "tiny", model.config)
    assert not (tmp_path / CONFIG_FILE).exists()    # so the folder is no longer a model
    with pytest.raises(UserError, match="is not a tiny model folder"):
        _read(tmp_path)


@pytest.mark.parametrize("config_text, words", [
    (None, f"is not a tiny model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}); make one"),
    ("{not json", "cannot be read"),
    ("[1, 2]", "holds a None model, not a tiny model"),
    (json.dumps({"kind": "other", "config": {}}), "holds a 'other' model, not a tiny model"),
])
def test_folders_that_are_not_models_are_one_line_naming_the_key(tmp_path, config_text, words):
    (tmp_path / WEIGHTS_FILE).write_bytes(b"")
    if config_text is not None:
        (tmp_path / CONFIG_FILE).write_text(config_text)
    with pytest.raises(UserError) as info:
        _read(tmp_path)
    text = str(info.value)
    assert "\n" not in text and text.startswith("stages.x.model: ") and words in text


def test_a_config_or_weights_that_do_not_fit_are_one_line(tmp_path):
    model = Tiny(TinyConfig(4))
    save_model_folder(model, tmp_path, "tiny", model.config)
    with pytest.raises(UserError, match="has a bad config"):
        build_and_load(Tiny, TinyConfig, {"config": {"depth": 2}}, tmp_path)
    with pytest.raises(UserError, match="does not fit its config"):
        build_and_load(Tiny, TinyConfig, {"config": {"width": 5}}, tmp_path)
