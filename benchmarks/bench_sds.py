"""One multiview-sds step with the SD 2.1-base-size UNet (random weights): time and memory.

    python benchmarks/bench_sds.py [device=cpu|cuda] [precision=auto|fp32|fp16|bf16]
                                   [repeats=3] [threads=N]

4 views x 32x32 latents (256x256 renders), classifier-free guidance (a batch of 8 through the
UNet), reconstruction loss, backward through the VAE encoder to the renders. Prints the median
step time and the peak memory (CUDA: max allocated; CPU: peak resident set size).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from engine.cameras import Cameras
from engine.plugin import StepInfo
from guidance.multiview.model import MultiViewDiffusionModel
from guidance.multiview.prior import PRECISIONS, MultiViewPrior, resolve_precision
from guidance.multiview.unet import MultiViewUNetConfig
from guidance.multiview_sds import MultiViewSDS


def main(argv=None) -> int:
    from engine.cli import Command, Key

    args = Command("python benchmarks/bench_sds.py", __doc__, [
        Key("device", str, "cuda" if torch.cuda.is_available() else "cpu"),
        Key("precision", str, "auto", choices=list(PRECISIONS)),
        Key("repeats", int, 3),
        Key("threads", int, 0),
    ]).parse(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), resolve_precision(args.precision, args.device)

    t0 = time.perf_counter()
    model = MultiViewDiffusionModel.build_random(MultiViewUNetConfig.sd21_base(), "latent",
                                                 seed=0, conditioning="image",
                                                 camera_convention="mvdream")
    model = model.to(device=device, dtype=dtype)
    print(f"built SD2.1-base multi-view UNet + SD VAE in {time.perf_counter() - t0:.1f} s "
          f"({sum(p.numel() for p in model.unet.parameters()) / 1e6:.1f} M UNet parameters)")
    guidance = MultiViewSDS.__new__(MultiViewSDS)
    torch.nn.Module.__init__(guidance)
    guidance.cfg = MultiViewSDS.Config(model="random", precision=args.precision)
    guidance.prior = MultiViewPrior(model, camera_convention="mvdream", conditioning="image",
                                    dtype=dtype)
    guidance.register_buffer("context_cond", torch.randn(1, 1, 1024, device=device, dtype=dtype))
    guidance.register_buffer("context_uncond", torch.zeros(1, 1, 1024, device=device, dtype=dtype))
    cams = Cameras.from_spherical(15.0, [0.0, 90.0, 180.0, 270.0], 2.5, 40.0,
                                  views_per_object=4).to(device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.repeats + 1):
        rgb = torch.rand(4, 256, 256, 3, device=device, requires_grad=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = guidance({"rgb": rgb}, cams, StepInfo("bench", 0, 0, 1, 4000))["sds"]
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA max allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (peak RSS)"
    print(f"device={device} precision={args.precision} threads={torch.get_num_threads()}: "
          f"SDS step median {statistics.median(times):.2f} s over {len(times)}, peak {peak}")
    return 0


if __name__ == "__main__":
    from engine.errors import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
