"""``python -m guidance.pointcloud.sample``: a picture -> a coloured point cloud (.ply) and a
preview picture, with a point model (Point-E's sampler).

    python -m guidance.pointcloud.sample image=PATH out=cloud.ply [model=models/toy/pointe]
        [steps=N] [guidance_scale=S] [seed=0] [points=N] [preview=PATH.png] [device=auto]

The picture is loaded as a run loads its input (mask, re-centred, on white) at the size and
object fraction the model's folder gives; the cloud comes out in the engine's world frame (z
up; the picture's camera on +x, azimuth 0) with rgb in [0, 1], written as a binary PLY
(float x, y, z; uchar red, green, blue) that MeshLab, Open3D or trimesh open. ``steps`` and
``guidance_scale`` default to the folder's sampler settings (the toy model: 16 and 3; a
converted release: 64 and 3), ``points`` to its point count. The preview (default: OUT with
.png) shows the picture and the cloud from four sides (azimuth 0, 90, 180, 270).

A missing or unreadable picture, missing weights or a folder that is not a point model is one
line on stderr and exit code 2. ``model=`` also takes ``model:PATH`` as the recipes write it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

USAGE = __doc__.split("\n\n")[1]
DEFAULT_MODEL = "models/toy/pointe"


def command():
    from engine.cli import Command, Key

    return Command("python -m guidance.pointcloud.sample", __doc__, [
        Key("image", str, required=True, help="the picture"),
        Key("out", str, required=True, help="where to write the cloud (.ply)"),
        Key("model", str, DEFAULT_MODEL, help="a point-model folder"),
        Key("steps", int, 0, help="sampler steps (0: the model's)", maximum=4096),
        Key("guidance_scale", float, -1.0, help="classifier-free guidance (-1: the model's)"),
        Key("seed", int, 0),
        Key("points", int, 0, help="points of the base model (0: the model's)",
            maximum=1 << 16),
        Key("preview", str, help="preview picture (default: OUT with .png)"),
        Key("device", str, "auto", help="auto | cpu | cuda | cuda:N"),
    ])


def parse_args(argv: List[str]):
    from engine.errors import ConfigError

    args = command().parse(argv)
    if Path(args.out).suffix.lower() != ".ply":
        raise ConfigError(f"out={args.out}: the cloud is written as a .ply file; name it "
                          "CLOUD.ply")
    if args.steps < 0 or args.points < 0:
        raise ConfigError("steps and points: must be >= 0 (0: the model's)")
    if args.guidance_scale < 0 and args.guidance_scale != -1.0:
        raise ConfigError(f"guidance_scale: must be >= 0 (or -1: the model's), got "
                          f"{args.guidance_scale}")
    return args


def run(argv: List[str]) -> int:
    from engine.cli import Command
    from engine.datasets.point_clouds import write_ply
    from engine.errors import UserError
    from engine.run import resolve_device
    from guidance.pointcloud.picture import PointCloudModel, describe
    from guidance.pointcloud.preview import preview_rows

    if not argv or Command.wants_help(argv):
        command().print_help()
        return 0
    args = parse_args(argv)
    device = resolve_device(args.device)
    picture_path = Path(args.image)
    if not picture_path.is_file():
        raise UserError(f"image={picture_path}: no such file")
    t0 = time.perf_counter()
    model = PointCloudModel.load(args.model, device=device)
    picture = model.picture(picture_path, log=lambda s: print(s, file=sys.stderr))
    loaded = time.perf_counter()
    cloud = model.cloud(picture.rgb.to(device), seed=args.seed, steps=args.steps or None,
                        guidance_scale=None if args.guidance_scale < 0 else args.guidance_scale,
                        points=args.points or None)
    seconds = time.perf_counter() - loaded
    out = Path(args.out)
    try:
        write_ply(out, cloud.numpy())
        preview = Path(args.preview) if args.preview else out.with_suffix(".png")
        preview_rows([(picture.rgb.numpy(), [cloud.numpy()])], preview)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    steps = args.steps or model.settings.steps
    print(f"{describe(model)}; {len(cloud)} points in {seconds:.1f} s ({steps} steps, "
          f"loading {loaded - t0:.1f} s)", file=sys.stderr)
    print(f"cloud: {out}\npreview: {preview}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
