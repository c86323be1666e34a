"""The sampled-views guidance (views drawn once from the multi-view model, picked by the input
picture, then plain L2) and NeRF.create_from, which lets a later stage refine its result."""

import pytest
import torch

from engine import config as engine_config
from engine import registry
from engine.cameras import Cameras
from engine.config import PROJECT_ROOT
from engine.errors import ConfigError
from engine.plugin import ReferenceImage, RunInputs, StepInfo
from guidance import sampled_views as sv
from guidance.multiview import targets
from representations.lib.encodings import HashGridConfig
from representations.nerf import NeRF, NeRFConfig, OccupancyConfig

STAGE2 = PROJECT_ROOT / "models" / "toy" / "stage2"
STEP = StepInfo("views", 0, 0, 10, 0)


def group(elevation=0.0):
    return Cameras.from_spherical(elevation, torch.tensor([0.0, 90.0, 180.0, 270.0]), 2.75,
                                  40.0, views_per_object=4)


def picture(rgb, size=32) -> RunInputs:
    """An input picture of one flat colour filling the middle half of the frame."""
    mask = torch.zeros(size, size, 1)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 1.0
    colour = torch.tensor(rgb).view(1, 1, 3)
    return RunInputs(image=ReferenceImage(mask * colour + (1 - mask), mask, "picture.png"))


def test_mask_from_white_reads_grain_as_background_and_pale_colours_as_object():
    rgb = torch.tensor([[1.0, 1.0, 1.0],       # white
                        [0.95, 0.97, 0.96],    # the sampler's grain on the background
                        [0.86, 0.86, 0.86],    # half-way up the ramp (deficit 0.14)
                        [0.74, 0.74, 0.76],    # the toy world's grey
                        [0.96, 0.84, 0.12]])   # yellow: only its blue channel is far from 1
    mask = targets.mask_from_white(rgb.view(1, 5, 1, 3), 0.08, 0.2).flatten()
    assert torch.allclose(mask, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]), atol=1e-5)
    clean, m = targets.clean_views(rgb.view(1, 5, 1, 3), 0.08, 0.2)
    assert torch.equal(clean.view(5, 3)[1], torch.ones(3))          # grain -> white
    assert torch.allclose(clean.view(5, 3)[3], rgb[3])              # object kept


def test_match_error_ranks_the_candidate_that_looks_like_the_picture_first():
    inputs = picture([0.2, 0.3, 0.9])
    rgb, mask = inputs.image.rgb, inputs.image.mask
    shifted = torch.roll(rgb, 4, dims=1), torch.roll(mask, 4, dims=1)
    red = mask * torch.tensor([0.9, 0.1, 0.1]) + (1 - mask)
    views = torch.stack([red, shifted[0], rgb])
    masks = torch.stack([mask, shifted[1], mask])
    err = targets.match_error(views, masks, rgb, mask)
    assert err[2] == 0 and err[1] > 0 and err[0] > 0
    assert int(err.argmin()) == 2


@pytest.fixture
def fake_sampler(monkeypatch):
    """guidance.multiview.sample.sample_views replaced: candidate k (seed k) is every view in one flat
    colour over the middle half; seed 2's colour is the picture's."""
    colours = {0: [0.9, 0.1, 0.1], 1: [0.1, 0.8, 0.1], 2: [0.2, 0.3, 0.9], 3: [0.9, 0.9, 0.1]}
    calls = []

    def fake(model, cond, uncond, cam16, n, steps, scale, eta, generator, clip_sample=None,
             progress=None):
        seed = int(generator.initial_seed())
        if progress is not None:
            progress.update(steps)
        calls.append((seed, steps, scale, tuple(cam16.shape)))
        img = picture(colours[seed % 4]).image.rgb.permute(2, 0, 1)
        return img[None].expand(n, -1, -1, -1).clone()

    import guidance.multiview.sample
    monkeypatch.setattr(guidance.multiview.sample, "sample_views", fake)
    return calls


def test_draws_once_keeps_the_candidate_most_like_the_picture(fake_sampler):
    cfg = sv.SampledViewsL2.Config(model=str(STAGE2), candidates=4, sample_steps=7,
                                   guidance_scale=1.5)
    g = sv.SampledViewsL2(cfg, device="cpu", inputs=picture([0.2, 0.3, 0.9]))
    cams = group()
    target = picture([0.2, 0.3, 0.9]).image
    rgb = target.rgb[None].expand(4, -1, -1, -1).clone().requires_grad_(True)
    opacity = target.mask[None].expand(4, -1, -1, -1).clone().requires_grad_(True)
    losses = g({"rgb": rgb, "opacity": opacity}, cams, STEP)
    assert g.chosen == 2 and len(fake_sampler) == 4
    assert [c[0] for c in fake_sampler] == [0, 1, 2, 3]
    assert all(c[1:] == (7, 1.5, (4, 16)) for c in fake_sampler)
    assert float(losses["rgb"].detach()) < 1e-10 and float(losses["mask"].detach()) < 1e-10
    # a render unlike the kept views costs, and the loss reaches the render
    wrong = {"rgb": torch.ones_like(rgb).requires_grad_(True),
             "opacity": torch.zeros_like(opacity).requires_grad_(True)}
    losses = g(wrong, cams, STEP)
    (losses["rgb"] + losses["mask"]).backward()
    assert float(losses["rgb"].detach()) > 0.01 and float(losses["mask"].detach()) > 0.1
    assert wrong["rgb"].grad.abs().sum() > 0 and wrong["opacity"].grad.abs().sum() > 0
    assert len(fake_sampler) == 4                       # drawn once, not every step
    # targets follow the render size
    small = g({"rgb": torch.ones(4, 16, 16, 3), "opacity": torch.zeros(4, 16, 16, 1)}, cams,
              STEP)
    assert torch.isfinite(small["rgb"]) and float(small["mask"]) > 0.1


def test_without_an_input_view_the_first_candidate_is_kept(fake_sampler):
    cfg = sv.SampledViewsL2.Config(model=str(STAGE2), candidates=3, input_view=None)
    g = sv.SampledViewsL2(cfg, device="cpu", inputs=picture([0.2, 0.3, 0.9]))
    g.draw(group())
    assert g.chosen == 0 and g.errors is None


def test_cameras_must_be_one_fixed_group(fake_sampler):
    cfg = sv.SampledViewsL2.Config(model=str(STAGE2), candidates=1)
    g = sv.SampledViewsL2(cfg, device="cpu", inputs=picture([0.5, 0.5, 0.5]))
    out = {"rgb": torch.ones(4, 32, 32, 3), "opacity": torch.zeros(4, 32, 32, 1)}
    two_groups = Cameras.from_spherical(0.0, torch.arange(8.0) * 45, 2.75, 40.0,
                                        views_per_object=4)
    with pytest.raises(ConfigError, match="one group"):
        g({"rgb": torch.ones(8, 32, 32, 3), "opacity": torch.zeros(8, 32, 32, 1)},
          two_groups, STEP)
    g(out, group(), STEP)
    with pytest.raises(ConfigError, match="same every step"):
        g(out, group(elevation=20.0), STEP)


def test_config_errors():
    assert registry.get("guidance", "sampled-views") is sv.SampledViewsL2
    for bad, key in (({"candidates": 0}, "candidates"), ({"sample_steps": 0}, "sample_steps"),
                     ({"mask_low": 0.3, "mask_high": 0.2}, "mask_low"),
                     ({"input_view": -1}, "input_view"), ({"guidance_scale": -1}, "guidance")):
        with pytest.raises(ConfigError, match=key):
            engine_config.validate_component("guidance", {"type": "sampled-views", **bad}, "g")
    with pytest.raises(ConfigError, match="image=PATH"):
        sv.SampledViewsL2(sv.SampledViewsL2.Config(model=str(STAGE2)), device="cpu",
                          inputs=RunInputs())


def test_the_shipped_model_draws_a_group_of_the_pictures_colour():
    """With the shipped toy model for real: the kept views show an object (a foreground of
    plausible size) whose colour is the input's, and the kept one is the best match."""
    from engine.images import load_reference_image

    image = load_reference_image(str(PROJECT_ROOT / "examples" / "toy" / "brown-box.png"),
                                 64, 0.7)
    cfg = sv.SampledViewsL2.Config(model=str(STAGE2), candidates=2, sample_steps=10)
    g = sv.SampledViewsL2(cfg, device="cpu", inputs=RunInputs(image=image))
    g.draw(group())
    assert g.rgb.shape == (4, 32, 32, 3) and g.mask.shape == (4, 32, 32, 1)
    assert int(g.errors.argmin()) == g.chosen
    share = g.mask.mean(dim=(1, 2, 3))
    assert bool(((share > 0.05) & (share < 0.7)).all()), share
    inside = g.mask[..., 0] > 0.99
    mean_colour = g.rgb[inside].mean(dim=0)
    box = image.rgb[image.mask[..., 0] > 0.99].mean(dim=0)
    assert float((mean_colour - box).abs().max()) < 0.2, (mean_colour, box)


def tiny_nerf(**kw):
    kw.setdefault("hash_grid", HashGridConfig(n_levels=4, log2_table_size=12, base_resolution=4,
                                              per_level_scale=2.0, backend="torch"))
    kw.setdefault("mlp_hidden", 16)
    kw.setdefault("occupancy", OccupancyConfig(resolution=16))
    return NeRF(NeRFConfig(**kw))


def test_nerf_create_from_a_nerf_continues_its_field():
    torch.manual_seed(0)
    first = tiny_nerf(samples_per_ray=32)
    with torch.no_grad():
        first.encoding.table.uniform_(-0.5, 0.5)
    first.update_occupancy()
    second = NeRF.create_from(first, NeRFConfig(**{**vars(first.cfg), "samples_per_ray": 16}))
    points = torch.rand(200, 3) * 2 - 1
    assert torch.equal(first.density(points), second.density(points))
    assert torch.equal(first.albedo(points), second.albedo(points))
    assert torch.equal(first.occupancy.occupied, second.occupancy.occupied)
    assert second.cfg.samples_per_ray == 16                   # this stage's own settings
    second.encoding.table.data.add_(1.0)                      # a copy, not shared weights
    assert not torch.equal(first.encoding.table, second.encoding.table)
    with pytest.raises(ConfigError, match="same hash_grid"):
        NeRF.create_from(first, tiny_nerf(mlp_hidden=32).cfg)


def test_sample_cli_keeps_the_candidate_most_like_the_picture(fake_sampler, tmp_path, capsys):
    """python -m guidance.multiview.sample candidates=K previews exactly the group the recipe fits."""
    import numpy as np
    from PIL import Image

    from guidance.multiview.sample import main, read_views

    size = 64
    inputs = picture([0.2, 0.3, 0.9], size)
    rgba = torch.cat([inputs.image.rgb, inputs.image.mask], dim=-1)
    Image.fromarray((rgba.numpy() * 255).round().astype(np.uint8)).save(tmp_path / "in.png")
    grid = tmp_path / "views.png"
    assert main([f"image={tmp_path / 'in.png'}", f"out={grid}", f"model={STAGE2}",
                 "candidates=4", "seed=0", "steps=5", "object_fraction=0.5", "device=cpu"]) == 0
    assert "kept seed 2 of 0..3" in capsys.readouterr().out
    views = read_views(grid)
    assert views.shape[0] == 4
    middle = views[0, 16, 16].astype(int)          # seed 2's colour, the picture's
    assert abs(middle - np.array([51, 76, 230])).max() <= 3, middle
    assert main(["prompt=a mug", f"out={grid}", f"model={STAGE2}", "candidates=2"]) == 2
    assert "needs image=PATH" in capsys.readouterr().err


def test_drawn_views_keep_the_newest_and_give_none_for_unknown_keys():
    from guidance.multiview.targets import DrawnViews

    drawn = DrawnViews(2)
    assert drawn.get("a") is None
    assert drawn.put("a", 1) == 1
    drawn.put("b", 2)
    drawn.put("a", 3)                 # put again: replaced, and now the newest
    drawn.put("c", 4)                 # so the oldest is "b", which goes
    assert len(drawn) == 2 and drawn.get("b") is None
    assert drawn.get("a") == 3 and drawn.get("c") == 4
    drawn.clear()
    assert len(drawn) == 0
