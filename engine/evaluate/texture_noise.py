"""Texture noise of renders, and a before / after comparison of a refinement stage.

    python -m engine.evaluate.texture_noise RUN_DIR [RUN_DIR ...] [before=dmtet]
        [after=refine] [size=128] [json=OUT.json]

Measures (on renders composited on white):

- ``laplacian_noise``: mean, over pixels well inside the object (opacity > 0.99, eroded by
  ``erode`` pixels so the silhouette does not count), of the Euclidean norm over the colour
  channels of the discrete Laplacian ``4 c(x,y) - c(x-1,y) - c(x+1,y) - c(x,y-1) - c(x,y+1)``
  (replicated borders). Speckle (texel-to-texel grain) raises it; smooth shading and
  uniform colour keep it near 0; colour edges inside the object count too, so compare renders
  of the same object only.
- ``high_frequency_energy``: the share of the spectral energy (2D FFT of each channel, the
  object's mean colour subtracted and the background zeroed) above ``cutoff`` times the
  Nyquist frequency (radial). Scale-free; also 0 for a flat colour.

``compare_run`` renders a finished run's ``before`` stage (default ``dmtet``) and ``after``
stage (default ``refine``, a ``textured-mesh``) at the target views' cameras that the
refinement kept (``TexturedMesh.target_views``) and gives, per stage, PSNR / SSIM against those
views (engine/evaluate/metrics.py) and both noise measures at ``size`` px (the 4 target
cameras plus 8 orbit views), with the target views' own noise for reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def interior(opacity: Tensor, erode: int = 2, threshold: float = 0.99) -> Tensor:
    """[B, H, W, 1] opacity -> [B, H, W] bool: opaque pixels at least ``erode`` pixels from
    any non-opaque one."""
    solid = (opacity[..., 0] > threshold).float()[:, None]
    if erode > 0:
        solid = -F.max_pool2d(-solid, 2 * erode + 1, stride=1, padding=erode)
    return solid[:, 0] > 0.5


def laplacian_noise(rgb: Tensor, opacity: Tensor, erode: int = 2) -> float:
    """Mean |discrete Laplacian| of ``rgb`` [B, H, W, 3] inside the eroded object mask
    (``opacity`` [B, H, W, 1]); 0.0 when no pixel is inside (module doc)."""
    x = rgb.float().permute(0, 3, 1, 2)
    pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
    lap = (4.0 * x - pad[..., 1:-1, :-2] - pad[..., 1:-1, 2:] - pad[..., :-2, 1:-1]
           - pad[..., 2:, 1:-1])
    mag = lap.pow(2).sum(1).sqrt()                       # [B, H, W]
    inside = interior(opacity, erode)
    return float(mag[inside].mean()) if bool(inside.any()) else 0.0


def high_frequency_energy(rgb: Tensor, opacity: Tensor, cutoff: float = 0.5,
                          erode: int = 2) -> float:
    """Share of the FFT energy above ``cutoff`` x Nyquist of the object's interior colours
    (mean subtracted, outside zeroed), over a batch ``rgb`` [B, H, W, 3] (module doc)."""
    inside = interior(opacity, erode)
    x = rgb.float().permute(0, 3, 1, 2)
    total_hi, total = 0.0, 0.0
    for b in range(x.shape[0]):
        m = inside[b]
        if not bool(m.any()):
            continue
        img = x[b] - x[b][:, m].mean(dim=1)[:, None, None]
        img = img * m[None].float()
        power = torch.fft.fft2(img).abs().pow(2).sum(0)
        H, W = power.shape
        fy = torch.fft.fftfreq(H)[:, None].abs() * 2.0         # 1 = Nyquist
        fx = torch.fft.fftfreq(W)[None, :].abs() * 2.0
        radius = torch.sqrt(fy ** 2 + fx ** 2)
        total_hi += float(power[radius > cutoff].sum())
        total += float(power.sum())
    return total_hi / total if total > 0 else 0.0


def _render(rep, cameras, size: int):
    from engine.evaluate.benchmark import white_background
    from engine.plugin import StepInfo

    bg = white_background()
    rep.eval()
    with torch.no_grad():
        out = rep.render(cameras, size, size, background=bg, step=StepInfo("eval", 0, 0, 1, 0))
    return out["rgb"].float().clamp(0, 1), out["opacity"].float()


def compare_run(run_dir, before: str = "dmtet", after: str = "refine", size: int = 128
                ) -> Dict[str, Dict[str, float]]:
    """{stage: {psnr, ssim, laplacian_noise, high_frequency_energy}} for ``before`` and
    ``after`` of a finished run, and {"targets": {...noise of the target views}}."""
    from engine.cameras import orbit
    from engine.evaluate.metrics import psnr, ssim
    from engine.trainer import load_finished_representation

    reps = {name: load_finished_representation(Path(run_dir), name) for name in (before, after)}
    views = getattr(reps[after], "target_views", lambda: None)()
    if views is None:
        raise ValueError(f"stage {after} of {run_dir} kept no target views (not a textured-mesh "
                         "stage fitted to views?)")
    rgb, mask, cams = views
    tsize = rgb.shape[1]
    around = orbit(8, elevation_deg=15.0, distance=2.75, fovy_deg=40.0)
    result: Dict[str, Dict[str, float]] = {}
    for name, rep in reps.items():
        at_targets, _ = _render(rep, cams, tsize)
        scores = [(psnr(at_targets[k], rgb[k]), ssim(at_targets[k], rgb[k]))
                  for k in range(rgb.shape[0])]
        big, big_op = _render(rep, cams, size)
        ring, ring_op = _render(rep, around, size)
        rgb_all, op_all = torch.cat([big, ring]), torch.cat([big_op, ring_op])
        result[name] = {
            "psnr": sum(s[0] for s in scores) / len(scores),
            "ssim": sum(s[1] for s in scores) / len(scores),
            "laplacian_noise": laplacian_noise(rgb_all, op_all),
            "high_frequency_energy": high_frequency_energy(rgb_all, op_all),
        }
    up = F.interpolate(rgb.permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                       align_corners=False).permute(0, 2, 3, 1)
    up_mask = F.interpolate(mask.permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                            align_corners=False).permute(0, 2, 3, 1)
    result["targets"] = {"laplacian_noise": laplacian_noise(up, up_mask),
                         "high_frequency_energy": high_frequency_energy(up, up_mask)}
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts = dict(a.split("=", 1) for a in args if "=" in a)
    runs = [a for a in args if "=" not in a]
    if not runs or any(k not in ("before", "after", "size", "json") for k in opts):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    table = {}
    for run in runs:
        table[run] = compare_run(run, opts.get("before", "dmtet"), opts.get("after", "refine"),
                                 int(opts.get("size", 128)))
        for stage, vals in table[run].items():
            print(f"{run} {stage}: " + ", ".join(f"{k} {v:.4f}" for k, v in vals.items()))
    if "json" in opts:
        Path(opts["json"]).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
