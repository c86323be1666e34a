"""Tests of the example plugin package: its maths on hand-built tensors, then the engine's
contract kit (engine.testing) on the guidance and on a 2-step run of the shipped recipe.

Run from the engine's repository root after ``pip install -e examples/plugin-example``:

    python -m pytest examples/plugin-example/tests -q
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import ConfigError
from engine.plugin import ReferenceImage, RunInputs
from engine_plugin_example.guidance import ExampleL1, l1_reference_losses, resize_square


def _reference(size: int = 16) -> ReferenceImage:
    """A red square on white; the mask is 1 on its middle half."""
    rgb = torch.ones(size, size, 3)
    mask = torch.zeros(size, size, 1)
    q = size // 4
    rgb[q:-q, q:-q] = torch.tensor([0.9, 0.1, 0.1])
    mask[q:-q, q:-q] = 1.0
    return ReferenceImage(rgb, mask, "red-square.png")


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    """48x48 RGBA: an opaque green 16x24 block, transparent elsewhere."""
    a = np.zeros((48, 48, 4), np.uint8)
    a[12:36, 16:32] = [40, 200, 60, 255]
    path = tmp_path / "block.png"
    Image.fromarray(a).save(path)
    return path


# -- the maths -------------------------------------------------------------------------------

def test_l1_losses_exact_values():
    # 2x2 picture, object on the left column; one render.
    target_rgb = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
                               [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])
    target_mask = torch.tensor([[[1.0], [0.0]], [[1.0], [0.0]]])
    rgb = torch.tensor([[[[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]],
                         [[1.0, 0.3, 0.0], [1.0, 1.0, 1.0]]]])
    opacity = torch.tensor([[[[0.5], [1.0]], [[1.0], [0.0]]]])

    masked = l1_reference_losses(rgb, opacity, target_rgb, target_mask)
    # object pixels: |0.5-1|/3 = 1/6 and |0.3-0|/3 = 0.1 -> mean over 2 pixels
    assert masked["rgb_l1"].item() == pytest.approx((1 / 6 + 0.1) / 2)
    # mask: |0.5-1| + |1-0| + 0 + 0 over 4 pixels
    assert masked["mask_l1"].item() == pytest.approx(1.5 / 4)

    everywhere = l1_reference_losses(rgb, opacity, target_rgb, target_mask, masked_rgb=False)
    # all 12 channel values: 0.5 + 0.3 + (1 + 1 + 1) on the black background pixel
    assert everywhere["rgb_l1"].item() == pytest.approx(3.8 / 12)


def test_huber_matches_l1_far_away_and_l2_near():
    target = torch.zeros(1, 1, 3)
    mask = torch.ones(1, 1, 1)
    far = l1_reference_losses(torch.full((1, 1, 1, 3), 0.8), torch.ones(1, 1, 1, 1),
                              target, mask, huber_delta=0.1)
    assert far["rgb_l1"].item() == pytest.approx(0.8 - 0.05)    # |d| - delta/2
    near = l1_reference_losses(torch.full((1, 1, 1, 3), 0.05), torch.ones(1, 1, 1, 1),
                               target, mask, huber_delta=0.1)
    assert near["rgb_l1"].item() == pytest.approx(0.5 * 0.05 ** 2 / 0.1)
    assert near["mask_l1"].item() == 0.0


def test_gradient_reaches_render_only_where_it_should():
    ref = _reference(8)
    rgb = torch.rand(2, 8, 8, 3, requires_grad=True)
    opacity = torch.rand(2, 8, 8, 1, requires_grad=True)
    losses = l1_reference_losses(rgb, opacity, ref.rgb, ref.mask)
    (losses["rgb_l1"] + losses["mask_l1"]).backward()
    outside = ref.mask[..., 0] == 0
    assert torch.all(rgb.grad[:, outside] == 0)          # masked colour loss
    assert torch.all(rgb.grad[:, ~outside].abs() > 0)
    assert torch.all(opacity.grad.abs() > 0)


def test_resize_square_averages_when_shrinking():
    image = torch.arange(16.0).view(4, 4, 1)
    small = resize_square(image, 2)
    assert small[..., 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert resize_square(image, 4) is image


def test_config_rejects_negative_delta_with_full_key():
    from engine.config import validate_component

    with pytest.raises(ConfigError, match=r"stages\.fit\.guidance\.huber_delta: must be >= 0"):
        validate_component("guidance", {"type": "example-l1", "huber_delta": -1.0},
                           "stages.fit.guidance")


def test_needs_an_image():
    with pytest.raises(ConfigError, match="needs an input image"):
        ExampleL1(ExampleL1.Config(), inputs=RunInputs(prompt="a cat"))


# -- discovery ------------------------------------------------------------------------------

def test_entry_points_are_declared():
    guidance = {ep.name: ep.value for ep in entry_points(group="engine.guidance")}
    recipes = {ep.name: ep.value for ep in entry_points(group="engine.recipes")}
    assert guidance["example-l1"] == "engine_plugin_example.guidance:ExampleL1"
    assert recipes["example-fit"] == "engine_plugin_example:example_fit_recipe"


def test_registry_and_recipe_resolve():
    from engine import config, registry

    assert registry.get("guidance", "example-l1") is ExampleL1
    cfg, resolved = config.load("example-fit", [])
    assert cfg.stages["fit"].guidance["type"] == "example-l1"
    # plugin defaults are filled in the resolved config
    assert resolved.stages.fit.guidance.masked_rgb is True
    assert set(cfg.stages["fit"].losses) == {"rgb_l1", "mask_l1", "opacity_sparsity"}


# -- the engine's contract kit --------------------------------------------------------------

def test_contract_guidance():
    testing = pytest.importorskip("engine.testing", reason="engine.testing not available")
    testing.check_guidance(ExampleL1, inputs=RunInputs(image=_reference(16)))
    testing.check_guidance(ExampleL1, ExampleL1.Config(masked_rgb=False, huber_delta=0.05),
                           inputs=RunInputs(image=_reference(16)))


def test_contract_recipe_two_steps(tmp_path: Path, picture: Path):
    testing = pytest.importorskip("engine.testing", reason="engine.testing not available")
    run_dir = Path(testing.run_recipe_steps(
        "example-fit", steps=2, out=tmp_path / "run", image=picture,
        overrides=["stages.fit.representation.resolution=8", "stages.fit.resolution=16"]))
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1]
    assert all(np.isfinite(l["loss/rgb_l1"]) and np.isfinite(l["loss/mask_l1"]) for l in lines)
