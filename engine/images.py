"""Loading the input picture: format checks, a mask, re-centring and scaling.

* PNG / JPEG / WebP (anything Pillow reads), turned upright by its EXIF orientation (a
  phone's portrait photo is stored sideways with a tag saying so). Every pixel format reads
  as it looks: 8- and 16-bit grey, grey + alpha, palette (with or without transparency), RGB,
  RGBA, CMYK.
* With an alpha channel (or a transparent palette / colour key) the alpha is the mask.
* RGB on a plain background: the border colour is taken as background. The background is what
  a flood fill from the border reaches through pixels of that colour; regions of the background
  colour enclosed by the object (the hole in a mug's handle) stay background too, unless they
  are specks (under ``MIN_HOLE_PIXELS`` / ``MIN_HOLE_FRACTION`` of the picture: noise, filled).
  A busy background cannot be separated reliably, so it is an error asking for an RGBA cut-out.
* The object is re-centred and scaled so its largest side is ``object_fraction`` of the frame,
  composited on white (Isotropic3D conditions on white), and resized to ``size`` x ``size``.

What the loader decided (orientation, pixel format, mask source, re-centring, scale) is
printed in one line (``log``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from engine.errors import InputError
from engine.plugin import ReferenceImage

MIN_SIDE = 32
MAX_SIDE = 8192
# a border is "plain" when its pixels stay this close (0..255 scale) to their median colour
BORDER_TOLERANCE = 24.0  # JPEG ringing near an object reaches ~20
PLAIN_BORDER_FRACTION = 0.9
# a background-coloured region enclosed by the object stays background from this size on
MIN_HOLE_PIXELS = 16
MIN_HOLE_FRACTION = 5e-4
_GREY16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _open(path: Path) -> Image.Image:
    import stat

    try:   # stat, not exists(): a folder that may not be searched raises PermissionError
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"image not found: {path}; check the path given to image=") from None
    except OSError as exc:
        raise InputError(f"image {path} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"image= points to a folder, not a file: {path}")
    Image.MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE
    try:
        img = Image.open(path)
        img.load()
    except PermissionError:
        raise InputError(f"image {path} cannot be read: permission denied") from None
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        if isinstance(exc, Image.DecompressionBombError):
            raise InputError(f"image {path} is too large (more than {MAX_SIDE}x{MAX_SIDE} "
                             "pixels); downscale it first")
        raise InputError(f"{path} is not an image Pillow can read (PNG, JPEG or WebP "
                         "expected)")
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"image {path} is corrupt or truncated ({exc}); re-export it")
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise InputError(f"image {path} is {w}x{h}, too small: both sides must be at least "
                         f"{MIN_SIDE} px")
    if max(w, h) > MAX_SIDE:
        raise InputError(f"image {path} is {w}x{h}, too large: sides must be at most "
                         f"{MAX_SIDE} px; downscale it first")
    return img


def _upright(img: Image.Image, path: Path, notes: List[str]) -> Image.Image:
    """The picture turned as its EXIF orientation tag says (a no-op without one)."""
    try:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:                      # unreadable EXIF: the pixels as stored
        return img
    if orientation == 1:
        return img
    try:
        turned = ImageOps.exif_transpose(img)
    except Exception as exc:
        raise InputError(f"image {path}: cannot apply its EXIF orientation {orientation} "
                         f"({exc}); re-export it without the tag")
    notes.append(f"EXIF orientation {orientation} applied")
    return turned if turned is not None else img


def to_rgb_alpha(img: Image.Image, path: Path, notes: List[str]
                 ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(rgb [H, W, 3] float in [0, 1], alpha [H, W] in [0, 1] or None) of any Pillow mode:
    16-bit grey scaled from its full range (not clipped at 255), transparency of palette and
    colour-keyed pictures as alpha, CMYK and the rest through Pillow's conversion to RGB."""
    mode = img.mode
    if mode in _GREY16 or mode == "F":
        grey = np.asarray(img, dtype=np.float64)
        if mode == "F":
            top = 1.0 if grey.max() <= 1.0 else (255.0 if grey.max() <= 255.0 else 65535.0)
        else:
            top = 65535.0 if mode != "I" or grey.max() > 255 else 255.0
        notes.append(f"{mode} grey read as 0..{top:g}")
        grey = np.clip(grey / top, 0.0, 1.0).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=2), None
    has_alpha = (mode in ("RGBA", "RGBa", "LA", "La", "PA")
                 or (mode in ("P", "L", "RGB", "1") and "transparency" in img.info))
    try:
        if has_alpha:
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
            if mode not in ("RGBA", "RGB"):
                notes.append(f"{mode} read as RGBA")
            return rgba[..., :3], rgba[..., 3]
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (ValueError, OSError) as exc:
        raise InputError(f"image {path} has pixel mode {mode}, which cannot be converted to "
                         f"RGB ({exc}); save it as an RGB or RGBA PNG")
    if mode != "RGB":
        notes.append(f"{mode} read as RGB")
    return rgb, None


def mask_from_plain_background(rgb: np.ndarray, path: Path,
                               notes: Optional[List[str]] = None) -> np.ndarray:
    """Mask [H, W] float in {0, 1} for an RGB image on a plain background (uint8 [H, W, 3]).

    Object: the pixels that differ from the border's median colour (after an opening that
    drops single-pixel noise). Background: what a flood fill from the border reaches through
    the other pixels, and every enclosed region of them of at least ``MIN_HOLE_PIXELS`` and
    ``MIN_HOLE_FRACTION`` of the picture whose mean colour is within the border's tolerance
    (a hole through the object shows the background); smaller or off-colour regions are
    filled as part of the object.
    """
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).astype(np.float32)
    bg = np.median(border, axis=0)
    plain = (np.abs(border - bg).max(axis=1) <= BORDER_TOLERANCE).mean()
    if plain < PLAIN_BORDER_FRACTION:
        raise InputError(f"image {path} has no alpha channel and its background is not a plain "
                         "colour; give an RGBA PNG with the object cut out")
    diff = np.abs(rgb.astype(np.float32) - bg).max(axis=2)
    obj = ndimage.binary_opening(diff > BORDER_TOLERANCE * 1.5, iterations=1)
    # background regions, 4-connected (so a diagonal gap in an outline does not leak)
    labels, count = ndimage.label(~obj)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    ids = np.arange(1, count + 1)
    inner = ids[~np.isin(ids, edge)]
    kept = np.zeros(0, dtype=ids.dtype)
    if inner.size:
        area = ndimage.sum_labels(np.ones_like(diff), labels, inner)
        tone = ndimage.mean(diff, labels, inner)
        least = max(MIN_HOLE_PIXELS, MIN_HOLE_FRACTION * diff.size)
        kept = inner[(area >= least) & (tone <= BORDER_TOLERANCE)]
    mask = obj | np.isin(labels, inner[~np.isin(inner, kept)])
    if notes is not None:
        colour = ",".join(str(int(round(c))) for c in bg)
        holes = (f", {kept.size} enclosed background region{'s' * (kept.size != 1)} kept"
                 if kept.size else "")
        notes.append(f"mask from the plain background ({colour}){holes}")
    return mask.astype(np.float32)


def load_reference_image(path: str | Path, size: int = 256, object_fraction: float = 0.85,
                         log: Optional[Callable[[str], None]] = print) -> ReferenceImage:
    """Load, mask, re-centre and scale an input picture.

    ``log`` gets one line saying what was decided (None: silent).

    Returns:
        ReferenceImage with rgb [size, size, 3] in [0, 1] composited on white and mask
        [size, size, 1] in [0, 1].
    """
    path = Path(path)
    notes: List[str] = []
    img = _upright(_open(path), path, notes)
    rgb, alpha = to_rgb_alpha(img, path, notes)
    if alpha is not None and float(alpha.min()) >= 254.0 / 255.0:
        notes.append("alpha opaque everywhere: ignored")      # says nothing about the object
        alpha = None
    if alpha is None:
        rgb8 = (rgb * 255.0 + 0.5).astype(np.uint8)
        alpha = mask_from_plain_background(rgb8, path, notes)
    else:
        notes.append("mask from the alpha channel")
    ys, xs = np.nonzero(alpha > 0.5)
    if ys.size == 0:
        raise InputError(f"image {path} shows no object: its alpha (or mask) is empty")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.concatenate([rgb[y0:y1, x0:x1], alpha[y0:y1, x0:x1, None]], axis=-1)
    # premultiply so resampling does not bleed background colour into the object's edge
    crop[..., :3] *= crop[..., 3:]
    side = max(y1 - y0, x1 - x0)
    scale = object_fraction * size / side
    new_h = max(1, round((y1 - y0) * scale))
    new_w = max(1, round((x1 - x0) * scale))
    channels = [Image.fromarray(np.ascontiguousarray(crop[..., c])).resize(
        (new_w, new_h), Image.BICUBIC) for c in range(4)]
    obj = np.clip(np.stack([np.asarray(c) for c in channels], axis=-1), 0.0, 1.0)
    canvas = np.zeros((size, size, 4), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = obj
    alpha_out = canvas[..., 3:]
    rgb_out = canvas[..., :3] + (1.0 - alpha_out)  # premultiplied over white
    if log is not None:
        h, w = alpha.shape
        dx, dy = int(round((x0 + x1 - w) / 2.0)), int(round((y0 + y1 - h) / 2.0))
        log(f"image {path.name}: {w}x{h} {img.mode}; " + "; ".join(notes)
            + f"; object {x1 - x0}x{y1 - y0} px re-centred (it was {dx:+d}, {dy:+d} px "
            f"off centre), scaled x{scale:.3g} to {object_fraction:.0%} of {size} px")
    return ReferenceImage(rgb=torch.from_numpy(np.clip(rgb_out, 0, 1)).float(),
                          mask=torch.from_numpy(alpha_out).float(), path=str(path))
