"""``python -m guidance.sample_triplane``: a picture -> a coloured mesh in seconds, by Compress3D
(CLIP image embedding -> shape embedding -> triplane latent -> decoded occupancy -> marching
cubes).

    python -m guidance.sample_triplane image=PATH [out=DIR] [model=models/toy/compress3d]
        [steps=N] [guidance_scale=S] [seed=0] [resolution=64] [device=auto]

The picture is loaded as a run loads its input (mask, re-centred, on white) at the size and
object fraction the model folder gives. Writes, in OUT (default outputs/sample-triplane/STEM):

* ``mesh.glb`` (+Y up, vertex colours, as the engine's exports) and ``mesh.ply`` (the
  engine's frame, z up; the picture's camera on +x, azimuth 0);
* ``latent.safetensors``: the triplane latent ``[3, c, r, r]`` (key ``latent``) and, for a
  model with the shape embedding, the drawn (normalised) shape embedding (key ``shape``);
* ``preview.png``: the picture and the mesh's vertices from four sides;
* ``views.png``, for a model conditioned on a group of views (One-2-3-45++'s multi-view
  conditioned prior, ``points.views: groups``): the views drawn from the picture by the
  multi-view model (``views_model``, default the folder's: models/toy/stage2) that it read.

``steps`` and ``guidance_scale`` default to the folder's sampler settings. A missing or
unreadable picture, missing weights, a folder that is not a Compress3D model, or a decoded
field with no surface is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

DEFAULT_MODEL = "models/toy/compress3d"


def command():
    from engine.cli import Command, Key

    return Command("python -m guidance.sample_triplane", __doc__, [
        Key("image", str, required=True, help="the picture"),
        Key("out", str, help="output folder (default: outputs/sample-triplane/STEM)"),
        Key("model", str, DEFAULT_MODEL, help="a Compress3D model folder"),
        Key("steps", int, 0, help="DDIM steps of each model (0: the model's)", maximum=1000),
        Key("guidance_scale", float, -1.0, help="classifier-free guidance (-1: the model's)"),
        Key("seed", int, 0),
        Key("resolution", int, 64, help="marching-cubes grid", maximum=512),
        Key("views_model", str, help="a model conditioned on drawn views: the multi-view model "
                                     "that draws them (default: the folder's, models/toy/stage2)"),
        Key("device", str, "auto", help="auto | cpu | cuda | cuda:N"),
    ])


def parse_args(argv: List[str]):
    from engine.errors import ConfigError

    args = command().parse(argv)
    if args.steps < 0:
        raise ConfigError(f"steps: must be >= 0 (0: the model's), got {args.steps}")
    if args.guidance_scale < 0 and args.guidance_scale != -1.0:
        raise ConfigError(f"guidance_scale: must be >= 0 (or -1: the model's), got "
                          f"{args.guidance_scale}")
    if args.resolution < 8:
        raise ConfigError(f"resolution: must be >= 8, got {args.resolution}")
    return args


def write_outputs(out: Path, result, picture_rgb) -> dict:
    """mesh.glb, mesh.ply, latent.safetensors, preview.png in ``out``; returns the paths."""
    import numpy as np
    import trimesh
    from safetensors.torch import save_file

    from engine.checkpoint import atomic_write_bytes
    from engine.export import ENGINE_TO_Y_UP, rotated
    from guidance.pointcloud.preview import preview_rows

    out.mkdir(parents=True, exist_ok=True)
    mesh = result.mesh
    paths = {}
    atomic_write_bytes(out / "mesh.glb", trimesh.exchange.gltf.export_glb(
        rotated(mesh, ENGINE_TO_Y_UP), include_normals=True))
    atomic_write_bytes(out / "mesh.ply", trimesh.exchange.ply.export_ply(mesh))
    paths["glb"], paths["ply"] = str(out / "mesh.glb"), str(out / "mesh.ply")
    tensors = {"latent": result.latent.contiguous()}
    if result.shape is not None:
        tensors["shape"] = result.shape.contiguous()
    save_file(tensors, str(out / "latent.safetensors"))
    paths["latent"] = str(out / "latent.safetensors")
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    colours = np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0
    pick = np.random.default_rng(0).permutation(len(verts))[:4096]
    preview_rows([(picture_rgb, [np.concatenate([verts[pick], colours[pick]], 1)])],
                 out / "preview.png")
    paths["preview"] = str(out / "preview.png")
    if result.views is not None:           # what a multi-view-conditioned model read
        from PIL import Image

        strip = np.concatenate([np.asarray(v) for v in result.views.clamp(0, 1)], axis=1)
        Image.fromarray((strip * 255 + 0.5).astype(np.uint8)).save(out / "views.png")
        paths["views"] = str(out / "views.png")
    return paths


def run(argv: List[str]) -> int:
    from engine.cli import Command
    from engine.errors import UserError
    from engine.run import resolve_device
    from guidance.compress3d.pipeline import Compress3D, describe

    if not argv or Command.wants_help(argv):
        command().print_help()
        return 0
    args = parse_args(argv)
    picture_path = Path(args.image)
    if not picture_path.is_file():
        raise UserError(f"image={picture_path}: no such file")
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    model = Compress3D.load(args.model, device=device, key="model")
    loaded = time.perf_counter() - t0
    result = model.generate(picture_path, seed=args.seed, steps=args.steps or None,
                            guidance_scale=None if args.guidance_scale < 0
                            else args.guidance_scale, resolution=args.resolution,
                            views_model=args.views_model)
    if result.mesh is None:
        raise UserError(f"image={picture_path}: the decoded triplane has no surface (empty or "
                        "full); try another seed= or a higher guidance_scale=")
    out = Path(args.out) if args.out else Path("outputs") / "sample-triplane" / picture_path.stem
    try:
        paths = write_outputs(out, result, model.picture(picture_path).rgb)
        seconds = {k: round(v, 2) for k, v in result.seconds.items()}
        (out / "summary.json").write_text(json.dumps({
            "image": str(picture_path), "model": str(model.folder), "seed": args.seed,
            "steps": args.steps or model.steps,
            "guidance_scale": model.guidance_scale if args.guidance_scale < 0
            else args.guidance_scale, "resolution": args.resolution,
            "faces": int(len(result.mesh.faces)), "seconds": {"load": round(loaded, 2),
                                                              **seconds}}, indent=1) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    total = sum(result.seconds.values())
    print(f"{describe(model)}: {len(result.mesh.faces)} faces in {total:.1f} s (sampling "
          f"{result.seconds['sample']:.1f} s, decoding {result.seconds['decode']:.1f} s; "
          f"loading {loaded:.1f} s)", file=sys.stderr)
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
