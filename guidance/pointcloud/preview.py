"""Preview pictures of coloured clouds: each cloud seen from a few directions, splatted as
small discs in depth order (far first) on white; pure numpy + Pillow, no renderer needed.

The views are the engine's: z up, azimuth from +x towards +y, a view at azimuth 0 looks from
+x at the origin (where the input picture's camera is), so the first panel of a cloud sampled
from a picture shows the side the picture shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

#: (azimuth, elevation) in degrees of the preview panels
VIEWS = ((0.0, 15.0), (90.0, 15.0), (180.0, 15.0), (270.0, 15.0))


def splat(cloud, azimuth: float = 0.0, elevation: float = 15.0, size: int = 160,
          extent: float = 1.0, dot: int = 0) -> np.ndarray:
    """An orthographic view [size, size, 3] uint8 of a cloud [N, >=6] (xyz within about
    +-``extent``, rgb in [0, 1]) from (azimuth, elevation), on white."""
    c = np.asarray(cloud, dtype=np.float64)
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    if c.shape[0] == 0:
        return img
    az, el = np.radians(azimuth), np.radians(elevation)
    back = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])  # to eye
    right = np.array([-np.sin(az), np.cos(az), 0.0])
    up = np.cross(back, right)
    xyz = c[:, :3]
    u = xyz @ right
    v = xyz @ up
    depth = xyz @ back
    px = np.round((u / extent * 0.5 + 0.5) * (size - 1)).astype(int)
    py = np.round((0.5 - v / extent * 0.5) * (size - 1)).astype(int)
    rgb = np.clip(np.round(c[:, 3:6] * 255), 0, 255).astype(np.uint8) if c.shape[1] >= 6 \
        else np.full((len(c), 3), 128, np.uint8)
    # shade a little by depth so the shape reads
    shade = 0.75 + 0.25 * (depth - depth.min()) / max(float(np.ptp(depth)), 1e-9)
    rgb = np.clip(rgb * shade[:, None], 0, 255).astype(np.uint8)
    r = dot or max(1, size // 80)
    for i in np.argsort(depth):                         # far first, near drawn over
        y0, y1 = max(py[i] - r, 0), min(py[i] + r + 1, size)
        x0, x1 = max(px[i] - r, 0), min(px[i] + r + 1, size)
        if y0 < y1 and x0 < x1:
            img[y0:y1, x0:x1] = rgb[i]
    return img


def preview_rows(rows: Sequence[Tuple[object, List[object]]], path, size: int = 128,
                 scale: float = 1.0, views=VIEWS) -> Path:
    """A PNG: one row per (picture [H, W, 3] in [0, 1] or None, [clouds]) with the picture
    then each cloud from every view. ``scale`` multiplies xyz (model units -> world)."""
    from PIL import Image

    panels = []
    for picture, clouds in rows:
        row = []
        if picture is not None:
            if hasattr(picture, "detach"):
                picture = picture.detach().cpu().numpy()
            pic = np.clip(np.asarray(picture, dtype=np.float64) * 255, 0, 255).astype(np.uint8)
            row.append(np.asarray(Image.fromarray(pic).resize((size, size), Image.BICUBIC)))
        for cloud in clouds:
            if hasattr(cloud, "detach"):                 # a tensor
                cloud = cloud.detach().cpu().numpy()
            c = np.array(cloud, dtype=np.float64)
            c[:, :3] *= scale
            row += [splat(c, az, el, size) for az, el in views]
        panels.append(np.concatenate(row, axis=1))
    width = max(p.shape[1] for p in panels)
    panels = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255)
              for p in panels]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from engine.atomic import atomic_write

    image = Image.fromarray(np.concatenate(panels, axis=0))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


__all__ = ["splat", "preview_rows", "VIEWS"]
