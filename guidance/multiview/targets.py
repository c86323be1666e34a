"""Fixed views as fitting targets (library): resizing, masks of views drawn on white, and
the choice among sampled groups.

Used by the guidances that fit renders to a set of views (``dataset-l2``: a dataset's views;
``sampled-views``: views the multi-view model drew), by ``reference-view`` (the picture at the
render's size) and by ``python -m guidance.multiview.sample candidates=K``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Optional

import torch.nn.functional as F
from torch import Tensor

#: default ramp of mask_from_white: the sampler's background grain stays below MASK_LOW, the
#: toy world's palest colour (grey, deficit 0.26) above MASK_HIGH
MASK_LOW, MASK_HIGH = 0.08, 0.2


def resize_image(image: Tensor, size: int) -> Tensor:
    """[H, W, C] -> [size, size, C] with area averaging (antialiased downscale).

    Differentiable with respect to ``image``.
    """
    x = image.permute(2, 0, 1)[None]
    mode = "area" if size <= image.shape[0] else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x, size=(size, size), mode=mode, **kwargs)[0].permute(1, 2, 0)


def resize_views(views: Tensor, size: int) -> Tensor:
    """[N, S, S, C] -> [N, size, size, C], bilinear (antialiased when shrinking); unchanged
    when already that size. Differentiable with respect to ``views``."""
    if views.shape[2] == size:
        return views
    x = F.interpolate(views.permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                      align_corners=False, antialias=views.shape[2] > size)
    return x.permute(0, 2, 3, 1)


class DrawnViews:
    """Views drawn in this process, by a key of everything that decided them, the oldest
    dropped beyond ``size``: a later stage with the same settings (a refinement after a views
    stage) takes the same views without sampling again.

    Example::

        DRAWN = DrawnViews(4)
        views = DRAWN.get(key)
        if views is None:
            views = DRAWN.put(key, draw())
    """

    def __init__(self, size: int):
        self.size = size
        self._items: "OrderedDict[Hashable, object]" = OrderedDict()

    def get(self, key: Hashable) -> Optional[object]:
        return self._items.get(key)

    def put(self, key: Hashable, value: object) -> object:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class ViewTargets:
    """Mixin of the guidances that fit renders to a fixed set of views: ``self.rgb`` [N, S, S,
    3] and ``self.mask`` [N, S, S, 1] (buffers), ``self._resized`` a dict; :meth:`targets`
    gives them at a render's size, resized once per size."""

    def targets(self, size: int):
        """All views at ``size`` px: (rgb [N, size, size, 3], mask [N, size, size, 1])."""
        if size not in self._resized:
            self._resized[size] = (resize_views(self.rgb, size), resize_views(self.mask, size))
        return self._resized[size]


def mask_from_white(rgb: Tensor, low: float, high: float) -> Tensor:
    """Object mask of views drawn on white: rgb [N, S, S, 3] in [0, 1] -> [N, S, S, 1].

    A pixel's distance from white is its largest channel deficit ``max(1 - rgb)``; below
    ``low`` it is background (0), above ``high`` object (1), linear in between, so the grain a
    small sampler leaves on the background is not read as fog. Differentiable with respect
    to ``rgb`` (zero gradient outside the ramp).
    """
    deficit = (1.0 - rgb).amax(dim=-1, keepdim=True)
    return ((deficit - low) / max(high - low, 1e-6)).clamp(0.0, 1.0)


def clean_views(rgb: Tensor, low: float, high: float):
    """(rgb on pure white, mask) of sampled views rgb [N, S, S, 3]: the background's grain is
    replaced by white where the mask is 0. Not differentiable (targets)."""
    mask = mask_from_white(rgb, low, high)
    return mask * rgb + (1.0 - mask), mask


def match_error(view_rgb: Tensor, view_mask: Tensor, rgb: Tensor, mask: Tensor) -> Tensor:
    """How unlike a picture each candidate view is: view_rgb [K, S, S, 3], view_mask
    [K, S, S, 1] against rgb [S, S, 3], mask [S, S, 1] -> [K] (mean squared colour error plus
    mean squared mask error). Lower is a better match."""
    colour = ((view_rgb - rgb[None]) ** 2).flatten(1).mean(dim=1)
    silhouette = ((view_mask - mask[None]) ** 2).flatten(1).mean(dim=1)
    return colour + silhouette
