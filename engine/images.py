"""Loading the input picture: format checks, a mask, re-centring and scaling.

* PNG / JPEG / WebP (anything Pillow reads). RGBA uses its alpha as the mask.
* RGB on a plain background: the border colour is taken as background and the mask is every
  pixel that differs from it (holes inside the object filled). A busy background cannot be
  separated reliably, so it is an error asking for an RGBA cut-out.
* The object is re-centred and scaled so its largest side is ``object_fraction`` of the frame,
  composited on white (Isotropic3D conditions on white), and resized to ``size`` x ``size``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from engine.errors import InputError
from engine.plugin import ReferenceImage

MIN_SIDE = 32
MAX_SIDE = 8192
# a border is "plain" when its pixels stay this close (0..255 scale) to their median colour
BORDER_TOLERANCE = 24.0  # JPEG ringing near an object reaches ~20
PLAIN_BORDER_FRACTION = 0.9


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise InputError(f"image not found: {path}; check the path given to image=")
    if path.is_dir():
        raise InputError(f"image= points to a folder, not a file: {path}")
    Image.MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE
    try:
        img = Image.open(path)
        img.load()
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


def mask_from_plain_background(rgb: np.ndarray, path: Path) -> np.ndarray:
    """Mask [H, W] float in {0, 1} for an RGB image on a plain background (uint8 [H, W, 3])."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).astype(np.float32)
    bg = np.median(border, axis=0)
    plain = (np.abs(border - bg).max(axis=1) <= BORDER_TOLERANCE).mean()
    if plain < PLAIN_BORDER_FRACTION:
        raise InputError(f"image {path} has no alpha channel and its background is not a plain "
                         "colour; give an RGBA PNG with the object cut out")
    diff = np.abs(rgb.astype(np.float32) - bg).max(axis=2)
    mask = diff > BORDER_TOLERANCE * 1.5
    mask = ndimage.binary_opening(mask, iterations=1)
    mask = ndimage.binary_fill_holes(mask)
    return mask.astype(np.float32)


def load_reference_image(path: str | Path, size: int = 256,
                         object_fraction: float = 0.85) -> ReferenceImage:
    """Load, mask, re-centre and scale an input picture.

    Returns:
        ReferenceImage with rgb [size, size, 3] in [0, 1] composited on white and mask
        [size, size, 1] in [0, 1].
    """
    path = Path(path)
    img = _open(path)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        rgb, alpha = rgba[..., :3], rgba[..., 3]
    else:
        rgb8 = np.asarray(img.convert("RGB"))
        alpha = mask_from_plain_background(rgb8, path)
        rgb = rgb8.astype(np.float32) / 255.0
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
    channels = [Image.fromarray(crop[..., c]).resize((new_w, new_h), Image.BICUBIC)
                for c in range(4)]
    obj = np.clip(np.stack([np.asarray(c) for c in channels], axis=-1), 0.0, 1.0)
    canvas = np.zeros((size, size, 4), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = obj
    alpha_out = canvas[..., 3:]
    rgb_out = canvas[..., :3] + (1.0 - alpha_out)  # premultiplied over white
    return ReferenceImage(rgb=torch.from_numpy(np.clip(rgb_out, 0, 1)).float(),
                          mask=torch.from_numpy(alpha_out).float(), path=str(path))
