"""Triangle-mesh utilities on numpy arrays: clean-up (pymeshlab), UV atlas (xatlas),
normalisation. Used by export and evaluation; nothing here is differentiable.

pymeshlab and xatlas are imported inside the functions, so importing this module (which the
registry does) stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np


@dataclass
class CleanupOptions:
    """What :func:`clean_mesh` does. Fractions are of the whole mesh's bounding-box diagonal."""

    remove_floaters: bool = True
    floater_diameter: float = 0.1      # drop components whose diagonal is below this fraction
    floater_faces: int = 0             # ... and those with fewer faces than this (0: off)
    merge_distance: float = 1e-4       # merge vertices closer than this fraction (0: off)
    decimate_faces: int = 0            # quadric edge collapse down to this many faces (0: off)


def clean_mesh(vertices: np.ndarray, faces: np.ndarray,
               options: CleanupOptions = CleanupOptions()) -> Tuple[np.ndarray, np.ndarray]:
    """Clean a triangle soup into an export-ready mesh with pymeshlab.

    Steps: merge duplicate and close vertices, drop duplicate and zero-area faces, remove
    floaters (small disconnected components by diameter and/or face count), decimate to a
    face budget (quadric edge collapse keeping normals and topology), drop unreferenced
    vertices. Face orientation is kept.

    Args:
        vertices: [V, 3] float; faces: [F, 3] int.
    Returns:
        (vertices [V', 3] float32, faces [F', 3] int64).
    """
    import pymeshlab

    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int32)
    if faces.shape[0] == 0:
        return vertices.astype(np.float32).reshape(-1, 3), faces.astype(np.int64).reshape(-1, 3)
    ms = pymeshlab.MeshSet()
    ms.add_mesh(pymeshlab.Mesh(vertex_matrix=vertices, face_matrix=faces))
    ms.meshing_remove_duplicate_vertices()
    if options.merge_distance > 0:
        ms.meshing_merge_close_vertices(
            threshold=pymeshlab.PercentageValue(100.0 * options.merge_distance))
    ms.meshing_remove_duplicate_faces()
    ms.meshing_remove_null_faces()
    if options.remove_floaters:
        if options.floater_diameter > 0:
            ms.meshing_remove_connected_component_by_diameter(
                mincomponentdiag=pymeshlab.PercentageValue(100.0 * options.floater_diameter))
        if options.floater_faces > 0:
            ms.meshing_remove_connected_component_by_face_number(
                mincomponentsize=int(options.floater_faces))
    if 0 < options.decimate_faces < ms.current_mesh().face_number():
        ms.meshing_decimation_quadric_edge_collapse(
            targetfacenum=int(options.decimate_faces), preservenormal=True,
            preservetopology=True, optimalplacement=True, planarquadric=True, autoclean=True)
    ms.meshing_remove_unreferenced_vertices()
    m = ms.current_mesh()
    return (np.asarray(m.vertex_matrix(), dtype=np.float32),
            np.asarray(m.face_matrix(), dtype=np.int64))


def uv_atlas(vertices: np.ndarray, faces: np.ndarray, texture_size: int,
             padding: int = 2) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UV-unwrap a mesh with xatlas, packed for a square texture.

    Args:
        vertices: [V, 3]; faces: [F, 3]; texture_size: texels per side; padding: texels
            between charts.
    Returns:
        vmapping [V'] (the original vertex of each atlas vertex; seams duplicate vertices),
        faces [F, 3] int64 into the atlas vertices, uvs [V', 2] float32 in [0, 1]
        (v = 0 at the bottom of the image, the OBJ / trimesh convention).
    """
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, dtype=np.float32),
                   np.ascontiguousarray(faces, dtype=np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = int(padding)
    pack.bilinear = True
    atlas.generate(pack_options=pack)
    vmapping, indices, uvs = atlas[0] if hasattr(atlas, "__getitem__") else atlas.get_mesh(0)
    return (np.asarray(vmapping, dtype=np.int64), np.asarray(indices, dtype=np.int64),
            np.asarray(uvs, dtype=np.float32))


def normalize_vertices(vertices: np.ndarray, size: float = 1.0) -> np.ndarray:
    """Centre the bounding box at the origin and scale its largest side to ``size``
    (the evaluation protocol's normalisation). [V, 3] -> [V, 3]."""
    v = np.asarray(vertices, dtype=np.float64)
    lo, hi = v.min(axis=0), v.max(axis=0)
    extent = float((hi - lo).max())
    scale = size / extent if extent > 0 else 1.0
    return ((v - 0.5 * (lo + hi)) * scale).astype(np.asarray(vertices).dtype)
