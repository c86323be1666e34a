"""Signs of life and honest words about weights (issue 24, item 10): long waits show a bar on
a terminal, a download inside a run says so, and a missing model names every key that
needs it."""

from __future__ import annotations

import torch

from engine import progress
from engine.run import main


class CountingPrior:
    """Stands in for a MultiViewPrior: each sample advances the bar it is given."""

    def sample(self, cond, uncond, cam16, steps, scale, eta, generator, progress=None):
        for _ in range(steps):
            progress.update(1)
        return torch.ones(cam16.shape[0], 3, 8, 8)


def test_drawing_candidate_views_shows_a_bar(monkeypatch, capsys):
    from guidance.multiview.sample import draw_best_group

    monkeypatch.setattr(progress, "FORCE", True)      # as on a terminal
    draw_best_group(CountingPrior(), None, None, torch.zeros(4, 16), candidates=3, seed=0,
                    steps=5, scale=1.0, input_view=None)
    err = capsys.readouterr().err
    assert "drawing 3 candidate view groups" in err and "/15 " in err


def test_bars_stay_off_the_logs_when_not_on_a_terminal(capsys):
    from guidance.multiview.sample import draw_best_group

    draw_best_group(CountingPrior(), None, None, torch.zeros(4, 16), candidates=2, seed=0,
                    steps=3, scale=1.0, input_view=None)
    assert capsys.readouterr().err == ""


def test_a_hub_download_inside_a_run_is_announced(monkeypatch, capsys, tmp_path):
    import huggingface_hub

    from guidance.multiview import pretrained

    monkeypatch.setattr(pretrained, "_cached_hub_file", lambda repo, name: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name: str(tmp_path / name))
    pretrained._download_hub("pkunliu/Isotropic3D", "stages.nerf.guidance.model")
    err = capsys.readouterr().err
    assert "downloading pkunliu/Isotropic3D isotropic3d.ckpt" in err
    assert "stages.nerf.guidance.model=PATH" in err


def test_a_missing_model_names_every_key_that_needs_it(monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["recipe=isotropic3d", "image=examples/red-block.png", "device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "stages.nerf.guidance.model=PATH" in err and "stages.dmtet.guidance.model" in err
