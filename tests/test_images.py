"""Input picture loading: masks, re-centring, and every bad-file error."""

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import InputError
from engine.images import load_reference_image


def test_rgba_is_recentred_and_scaled(rgba_image):
    ref = load_reference_image(rgba_image, size=64, object_fraction=0.5)
    ys, xs = torch.nonzero(ref.mask[..., 0] > 0.5, as_tuple=True)
    height = ys.max() - ys.min() + 1
    assert abs(int(height) - 32) <= 1                        # 0.5 of 64, the block's long side
    assert abs((ys.min() + ys.max()) / 2 - 31.5) <= 1        # centred
    assert abs((xs.min() + xs.max()) / 2 - 31.5) <= 1
    centre = ref.rgb[32, 32]
    assert torch.allclose(centre, torch.tensor([220, 40, 30]) / 255.0, atol=0.02)
    assert torch.allclose(ref.rgb[0, 0], torch.ones(3))     # background composited on white


def test_rgb_on_plain_background_gets_a_mask(tmp_path):
    a = np.full((80, 80, 3), 240, np.uint8)
    a[20:60, 30:50] = [10, 120, 200]
    a[35:45, 38:42] = [240, 240, 240]                        # a background-coloured patch inside
    for ext in ("png", "jpg", "webp"):
        path = tmp_path / f"obj.{ext}"
        Image.fromarray(a).save(path, quality=90) if ext != "png" else Image.fromarray(a).save(path)
        ref = load_reference_image(path, size=80, object_fraction=0.5)
        covered = float(ref.mask.sum()) / (80 * 80)
        # a 40x20 object scaled so 40 px -> 40 px: area 800 px = 1/8 of the frame, holes filled
        assert covered == pytest.approx(800 / 6400, rel=0.15), ext


def test_busy_background_asks_for_rgba(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    with pytest.raises(InputError, match="give an RGBA PNG"):
        load_reference_image(path)


@pytest.mark.parametrize("make, words", [
    (lambda p: None, "image not found"),
    (lambda p: p.write_text("hello, not a picture"), "not an image"),
    (lambda p: p.write_bytes(_truncated_png()), "corrupt or truncated"),
    (lambda p: Image.new("RGBA", (20, 40)).save(p, format="PNG"), "too small"),
    (lambda p: Image.new("L", (8200, 33)).save(p, format="PNG"), "too large"),
    (lambda p: Image.new("RGBA", (64, 64)).save(p, format="PNG"), "shows no object"),
])
def test_bad_files_give_clear_errors(tmp_path, make, words):
    path = tmp_path / "in.png"
    make(path)
    with pytest.raises(InputError, match=words) as e:
        load_reference_image(path)
    assert "\n" not in str(e.value)


def _truncated_png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 4), 128, np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]
