"""engine.evaluate.view_scores on hand-made pictures with known answers."""

import numpy as np
import pytest
import trimesh

from engine.evaluate import view_scores as vs


def picture(boxes, colour=(200, 30, 30), size=8):
    """uint8 [size, size, 3] white picture with coloured rectangles (r0, r1, c0, c1)."""
    img = np.full((size, size, 3), 255, np.uint8)
    for r0, r1, c0, c1 in boxes:
        img[r0:r1, c0:c1] = colour
    return img


def truth(boxes, size=8):
    """uint8 [size, size, 4]: alpha 255 inside the rectangles."""
    t = np.zeros((size, size, 4), np.uint8)
    for r0, r1, c0, c1 in boxes:
        t[r0:r1, c0:c1] = (10, 200, 10, 255)
    return t


def test_foreground_and_iou():
    img = picture([(0, 4, 0, 4)])
    img[7, 7] = (250, 250, 250)                       # near-white: background
    fg = vs.foreground(img)
    assert fg.sum() == 16 and not fg[7, 7]
    b = np.zeros((8, 8), bool)
    b[0:4, 2:6] = True                                # overlaps 8 of 24 pixels in the union
    assert vs.silhouette_iou(fg, b) == pytest.approx(8 / 24)
    assert vs.silhouette_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0


def test_hues():
    assert vs.mean_hue(np.array([[255, 0, 0]], np.uint8)) == pytest.approx(0.0)
    assert vs.mean_hue(np.array([[0, 0, 255]], np.uint8)) == pytest.approx(240.0)
    assert vs.hue_distance(350.0, 10.0) == pytest.approx(20.0)      # wraps round
    assert vs.hue_distance(0.0, 540.0) == pytest.approx(180.0)
    t = truth([(2, 6, 2, 6)])
    assert vs.truth_hue(t) == pytest.approx(120.0)                   # the covered pixels' green
    assert vs.sample_hue(picture([(0, 3, 0, 3)], colour=(0, 0, 200))) == pytest.approx(240.0)


def test_iou_matrix_identifies_each_object_by_its_shape():
    # two "objects": a tall bar and a wide bar, each seen in 2 views
    tall, wide = [(0, 8, 3, 5)], [(3, 5, 0, 8)]
    samples = {"tall": np.stack([picture(tall)] * 2), "wide": np.stack([picture(wide)] * 2)}
    truths = {"tall": np.stack([truth(tall)] * 2), "wide": np.stack([truth(wide)] * 2)}
    m = vs.iou_matrix(samples, truths)
    assert m[0, 0] == pytest.approx(1.0) and m[1, 1] == pytest.approx(1.0)
    assert m[0, 1] == pytest.approx(4 / 28)                       # crossing bars
    assert list(m.argmax(axis=1)) == [0, 1]
    np.testing.assert_allclose(vs.view_ious(samples["tall"], truths["wide"]), [4 / 28] * 2)


def test_ground_truth_views_see_a_cube_from_four_sides():
    cube = trimesh.creation.box((0.8, 0.8, 0.8))
    cube.visual.vertex_colors = np.tile([200, 40, 40, 255], (len(cube.vertices), 1))
    views = vs.ground_truth_views(cube, 32)
    assert views.shape == (4, 32, 32, 4)
    cover = (views[..., 3] > 127).mean(axis=(1, 2))
    # a cube looks the same from its four sides: equal coverage, centred, not the whole frame
    assert np.ptp(cover) < 0.02 and 0.1 < cover.mean() < 0.6
    rows, cols = np.nonzero(views[0, ..., 3] > 127)
    assert abs(cols.mean() - 15.5) < 1.0


def test_swap_test_sees_shape_not_size():
    # object 0's views overlap every truth a lot (a big blob), object 1's fit only its own;
    # row 0 peaks at the wrong truth, yet each fits its own better than swapped
    m = np.array([[0.50, 0.60, 0.10],
                  [0.05, 0.30, 0.00],
                  [0.20, 0.10, 0.40]])
    assert list(m.argmax(axis=1)) == [1, 1, 2]
    # pairs: (0,1) 0.8 vs 0.65 win; (0,2) 0.9 vs 0.3 win; (1,2) 0.7 vs 0.1 win
    assert vs.swap_test_accuracy(m) == 1.0
    swapped = m[:, [1, 0, 2]]                              # truths 0 and 1 exchanged
    assert vs.swap_test_accuracy(swapped) == pytest.approx(2 / 3)
    # same-kind pairs are left out; ties count half
    assert vs.swap_test_accuracy(swapped, kinds=["box", "box", "mug"]) == 1.0
    assert vs.swap_test_accuracy(np.ones((2, 2))) == 0.5


def test_right_kind_share_discounts_the_truth_every_blob_fits():
    # truth 1 (a big compact shape) overlaps every row's views most: the plain argmax gives
    # all three rows kind "box"; centred on each truth's mean, each row's own truth stands out
    m = np.array([[0.50, 0.60, 0.10],
                  [0.05, 0.30, 0.00],
                  [0.20, 0.45, 0.40]])
    kinds = ["mug", "box", "lamp"]
    assert list(m.argmax(axis=1)) == [1, 1, 1]
    # column means 0.25, 0.45, 0.1667: centred row 0 = (0.25, 0.15, -0.07), row 1 =
    # (-0.2, -0.15, -0.17), row 2 = (-0.05, 0.0, 0.23)
    assert list(vs.right_kind_share(m, kinds)) == [1.0, 1.0, 1.0]
    # truths 0 and 2 exchanged: row 0 now fits truth 2 unusually well (centred -0.07, 0.15,
    # 0.25); wrong if object 2 is a lamp, right if it is another mug
    assert vs.right_kind_share(m[:, [2, 1, 0]], ["mug", "box", "lamp"])[0] == 0.0
    assert vs.right_kind_share(m[:, [2, 1, 0]], ["mug", "box", "mug"])[0] == 1.0
    # one blob for every object: all truths tie, each row gets its kind's share (chance)
    blob = np.tile([0.3, 0.6, 0.2, 0.4], (4, 1))
    assert list(vs.right_kind_share(blob, ["a", "a", "b", "c"])) == [0.5, 0.5, 0.25, 0.25]
