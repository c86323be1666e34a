"""Judging sampled views of a toy object against its ground truth, seen from the same cameras.

``python -m guidance.multiview.sample`` draws V views of the object in a picture; for a toy-world object
we know what they should look like. These scores say whether the views show the right object:

* silhouette IoU between a sampled view's foreground (pixels visibly off the white background)
  and the ground-truth mesh's coverage at the same camera - size, place and shape, per view;
* the hue of the sampled foreground against the truth's - the colour.

Across several objects, the matrix of "object i's views against object j's truth" says whether
the views are the right shape: row i peaking at i (identified), and above all the swap test
(:func:`swap_test_accuracy`), which is blind to size. benchmarks/bench_toy_views.py reports
both on the held-out split; tests/test_toy_behaviour.py uses them on examples/toy.

Cameras follow guidance.multiview.sample's defaults: elevation 15, azimuths 0/90/180/270, framed as the
toy world frames its canonical front view (fovy 40, bounding sphere filling 80% of the frame).
"""

from __future__ import annotations

import colorsys
from typing import Dict, List, Sequence

import numpy as np

SAMPLE_ELEVATION = 15.0
SAMPLE_AZIMUTHS = (0.0, 90.0, 180.0, 270.0)


def ground_truth_views(mesh, size: int, elevation: float = SAMPLE_ELEVATION,
                       azimuths: Sequence[float] = SAMPLE_AZIMUTHS) -> np.ndarray:
    """uint8 [V, size, size, 4] renders of a toy mesh (trimesh, vertex colours) at the
    sampling cameras, with the toy world's front-view framing."""
    from engine.cameras import Cameras
    from engine.datasets.toy_world import FRONT_FILL, FRONT_FOVY, camera_distance, render_object

    cams = Cameras.from_spherical([elevation] * len(azimuths), list(azimuths),
                                  camera_distance(FRONT_FOVY, FRONT_FILL), FRONT_FOVY)
    return render_object(mesh, cams, size)


def foreground(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] on white -> bool [..., H, W]: pixels visibly off the background."""
    return (1.0 - rgb.astype(np.float32) / 255.0).max(axis=-1) > 0.15


def silhouette_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks (0 when both are empty)."""
    return float((a & b).sum() / max((a | b).sum(), 1))


def mean_hue(rgb: np.ndarray) -> float:
    """Hue in degrees of the mean of uint8 colours [N, 3]."""
    mean = rgb.reshape(-1, 3).astype(np.float64).mean(axis=0) / 255.0
    return 360.0 * colorsys.rgb_to_hsv(*mean)[0]


def hue_distance(a: float, b: float) -> float:
    """Angular distance of two hues in degrees, in [0, 180]."""
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def view_ious(views: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-view silhouette IoU [V] of sampled views (uint8 [V, S, S, 3]) against truth renders
    (uint8 [V, S, S, 4], same cameras)."""
    fg = foreground(views[..., :3])
    return np.array([silhouette_iou(fg[k], truth[k, ..., 3] > 127) for k in range(len(views))])


def iou_matrix(samples: Dict[str, np.ndarray], truths: Dict[str, np.ndarray]) -> np.ndarray:
    """[N, N] mean-over-views silhouette IoU of object i's sampled views against object j's
    truth (keys in the same order). Row i's argmax == i: object i's views are its own shape."""
    names = list(samples)
    return np.array([[view_ious(samples[a], truths[b]).mean() for b in names] for a in names])


def swap_test_accuracy(matrix: np.ndarray, kinds: Sequence[str] = ()) -> float:
    """Fraction of object pairs (i, j) whose views fit their own truths better than swapped:
    ``m[i,i] + m[j,j] > m[i,j] + m[j,i]`` (ties count half; chance: 0.5).

    Unlike "is the own truth the best match", the swap cancels what one object's views or one
    truth does to every score (a big compact truth overlaps any blob; a large sample overlaps
    any truth), so it measures shape and not size. With ``kinds`` (one per row), only pairs of
    different kinds count: two boxes may rightly fit each other's truth.
    """
    m = np.asarray(matrix, dtype=np.float64)
    wins, pairs = 0.0, 0
    for i in range(len(m)):
        for j in range(i + 1, len(m)):
            if len(kinds) and kinds[i] == kinds[j]:
                continue
            own, swapped = m[i, i] + m[j, j], m[i, j] + m[j, i]
            wins += 1.0 if own > swapped else 0.5 if own == swapped else 0.0
            pairs += 1
    return wins / pairs if pairs else float("nan")


def unusual_matches(matrix: np.ndarray) -> List[np.ndarray]:
    """Per row i of a score matrix (higher = row i fits column j's truth better): the columns
    row i fits *unusually* well, ``argmax_j m[i, j] - mean_k m[k, j]`` - each column centred on
    its mean over the rows first, so a big compact truth that every blob overlaps does not win
    every row (the plain argmax's bias). Several columns where they tie (identical rows: one
    blob for every object ties all of them)."""
    m = np.asarray(matrix, dtype=np.float64)
    centred = m - m.mean(axis=0, keepdims=True)
    return [np.flatnonzero(row >= row.max() - 1e-9 * max(1.0, abs(row.max())))
            for row in centred]


def right_kind_share(matrix: np.ndarray, kinds: Sequence[str]) -> np.ndarray:
    """Per row i of a score matrix (as :func:`unusual_matches`; one kind per object, rows and
    columns in the same order): 1 when the truth row i fits unusually well is of row i's kind,
    0 when not; a tie of several truths counts their share of that kind. Identical rows get
    exactly the share of their kind among all objects: chance. Own truth included, so a right
    kind can be the object itself or another object of its kind.
    """
    kinds = list(kinds)
    return np.array([np.mean([kinds[j] == kinds[i] for j in best])
                     for i, best in enumerate(unusual_matches(matrix))])


def truth_hue(truth: np.ndarray) -> float:
    """Hue of a truth render's covered pixels (uint8 [..., 4])."""
    return mean_hue(truth[..., :3][truth[..., 3] > 127])


def sample_hue(views: np.ndarray) -> float:
    """Hue of sampled views' foreground (uint8 [..., 3] on white)."""
    return mean_hue(views[foreground(views)])
