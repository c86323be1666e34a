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
    a[35:45, 38:42] = [240, 240, 240]       # a background-coloured hole through it (40 px)
    for ext in ("png", "jpg", "webp"):
        path = tmp_path / f"obj.{ext}"
        Image.fromarray(a).save(path, quality=90) if ext != "png" else Image.fromarray(a).save(path)
        ref = load_reference_image(path, size=80, object_fraction=0.5)
        covered = float(ref.mask.sum()) / (80 * 80)
        # a 40x20 object scaled so 40 px -> 40 px: 800 px less the 40 px hole it encloses
        assert covered == pytest.approx(760 / 6400, rel=0.1), ext


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


# -- inputs read as meant: EXIF orientation, enclosed background, every pixel format ---------

def _two_tone(h=96, w=64):
    """Upright picture on white: a red block above a blue one (which way is up is visible)."""
    a = np.full((h, w, 3), 255, np.uint8)
    a[16:48, 16:48] = [220, 30, 30]
    a[48:80, 16:48] = [30, 30, 220]
    return a


def test_exif_orientation_is_applied(tmp_path):
    upright = Image.fromarray(_two_tone())
    stored = upright.transpose(Image.Transpose.ROTATE_90)   # as a phone stores a portrait
    exif = Image.Exif()
    exif[0x0112] = 6                                      # "rotate 90 clockwise to view"
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=95, exif=exif)
    lines = []
    ref = load_reference_image(path, size=64, object_fraction=0.8, log=lines.append)
    plain = load_reference_image(_save(tmp_path / "upright.png", upright), size=64,
                                 object_fraction=0.8, log=None)
    assert float((ref.mask - plain.mask).abs().mean()) < 0.02
    top, bottom = ref.rgb[20, 32], ref.rgb[44, 32]
    assert top[0] > 0.7 and top[2] < 0.3 and bottom[2] > 0.7 and bottom[0] < 0.3
    assert len(lines) == 1 and "EXIF orientation 6 applied" in lines[0]


def _ring(size=128, outer=40, inner=18, fg=(60, 60, 60), bg=(235, 235, 235)):
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    r = np.hypot(yy, xx)
    mask = (r <= outer) & (r >= inner)
    a = np.empty((size, size, 3), np.uint8)
    a[...] = bg
    a[mask] = fg
    return a, mask


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_background_enclosed_by_the_object_stays_background(tmp_path, ext):
    a, mask = _ring()
    path = _save(tmp_path / f"ring.{ext}", Image.fromarray(a), quality=92)
    lines = []
    ref = load_reference_image(path, size=128, object_fraction=80 / 128, log=lines.append)
    m = ref.mask[..., 0]
    assert float(m[62:66, 62:66].max()) < 0.05           # the hole is background
    assert float(m[64, 64 + 29]) > 0.95                  # the ring is object
    assert float(m.sum()) == pytest.approx(mask.sum(), rel=0.05)
    assert "mask from the plain background (235,235,235), 1 enclosed background region kept" \
        in lines[0]


def test_background_coloured_specks_inside_the_object_are_filled(tmp_path):
    a = np.full((96, 96, 3), 240, np.uint8)
    a[24:72, 24:72] = [20, 100, 200]
    a[40:42, 50:52] = 240                                 # a 4-px glint, not a hole
    ref = load_reference_image(_save(tmp_path / "glint.png", Image.fromarray(a)), size=96,
                               object_fraction=0.5, log=None)
    assert float(ref.mask[36:46, 46:56].min()) > 0.99          # the glint stays object


def _modes(rgb: np.ndarray, mask: np.ndarray):
    """The same grey picture in each Pillow mode: (name, image, file suffix)."""
    grey = rgb[..., 0]
    alpha = (mask * 255).astype(np.uint8)
    rgba = np.dstack([rgb, alpha])
    rgb_img = Image.fromarray(rgb)
    palette = rgb_img.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    keyed = palette.copy()
    keyed.info["transparency"] = int(np.asarray(keyed)[0, 0])   # the background's index
    return [
        ("L", Image.fromarray(grey), "png"),
        ("I;16", Image.fromarray(grey.astype(np.uint16) * 257), "png"),
        ("LA", Image.fromarray(np.dstack([grey, alpha])).convert("LA"), "png"),
        ("P", palette, "png"),
        ("P+transparency", keyed, "png"),
        ("CMYK", rgb_img.convert("CMYK"), "tiff"),
        ("RGBA", Image.fromarray(rgba), "png"),
        ("RGBA opaque", Image.fromarray(np.dstack([rgb, np.full_like(grey, 255)])), "png"),
    ]


@pytest.mark.parametrize("mode", ["L", "I;16", "LA", "P", "P+transparency", "CMYK", "RGBA",
                                  "RGBA opaque"])
def test_every_pixel_format_reads_like_the_rgb_version(tmp_path, mode):
    rgb, mask = _ring(fg=(70, 70, 70))
    rgb = np.ascontiguousarray(rgb)
    truth = load_reference_image(_save(tmp_path / "rgb.png", Image.fromarray(rgb)), size=64,
                                 log=None)
    name, img, suffix = next(m for m in _modes(rgb, mask) if m[0] == mode)
    path = _save(tmp_path / f"pic.{suffix}", img)
    with Image.open(path) as back:                       # the file holds the mode under test
        assert back.mode == name.split("+")[0].split(" ")[0]
    ref = load_reference_image(path, size=64, log=None)
    assert float((ref.mask - truth.mask).abs().max()) < 0.02, mode
    assert float((ref.rgb - truth.rgb).abs().max()) < 0.02, mode


def test_the_loader_says_what_it_decided_in_one_line(tmp_path):
    a = np.full((100, 120, 3), 250, np.uint8)
    a[10:50, 70:90] = [200, 40, 40]                       # 20 x 40 px, up and to the right
    lines = []
    load_reference_image(_save(tmp_path / "off.png", Image.fromarray(a)), size=64,
                         object_fraction=0.5, log=lines.append)
    assert len(lines) == 1 and "\n" not in lines[0]
    line = lines[0]
    assert "120x100 RGB" in line and "mask from the plain background (250,250,250)" in line
    assert "object 20x40 px re-centred (it was +20, -20 px off centre)" in line
    assert "scaled x0.8 to 50% of 64 px" in line


def _save(path, img, **kw):
    img.save(path, **(kw if path.suffix == ".jpg" else {}))
    return path


def test_the_run_saves_the_input_as_the_engine_sees_it(tmp_path):
    """RUN/input.png is the loaded picture (upright, masked, re-centred, scaled): RGB over white
    and the mask as alpha, at inputs.image_size, equal to what the loader returns."""
    from engine.testing import run_recipe_steps

    run = run_recipe_steps("fit-image-quick", steps=1, out=tmp_path / "run",
                           image="examples/red-block.png", overrides=["inputs.image_size=48"])
    saved = np.asarray(Image.open(run / "input.png"))
    assert saved.shape == (48, 48, 4)
    ref = load_reference_image("examples/red-block.png", 48, log=None)
    want = np.concatenate([ref.rgb.numpy(), ref.mask.numpy()], axis=-1) * 255.0
    assert np.abs(saved.astype(np.float64) - want).max() <= 0.51
    assert saved[..., 3].min() == 0 and saved[..., 3].max() == 255      # background and object
