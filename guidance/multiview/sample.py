"""``python -m guidance.multiview.sample``: the views the multi-view model believes in (DDIM + CFG).

    python -m guidance.multiview.sample image=cat.png out=cat-views.png [model=PATH]
        [steps=50] [scale=10] [elevation=15] [azimuth=0] [views=4] [seed=0] [eta=0]
        [device=auto] [image_size=256] [object_fraction=0.85] [candidates=1]
    python -m guidance.multiview.sample prompt="a red chair" out=chair.png model=PATH  # text

The quick 2D preview before a long 3D run: if these views are wrong, the 3D result will be.
Angles use the engine's convention (azimuth 0 on +x); views are 360/views degrees apart.
``candidates=K`` (with an image) samples seeds seed .. seed+K-1 and keeps the group whose first
view (at ``azimuth``) looks most like the picture, its background cleaned to white: exactly
the views recipe isotropic3d-toy-views fits (with image_size=64 object_fraction=0.7
elevation=0 scale=1 steps=30 candidates=4, its inputs and views-stage settings).
Writes a PNG grid (the input picture first when there is one) and prints its path.

The model is conditioned through :class:`guidance.multiview.prior.MultiViewPrior`, as
``multiview-sds`` and ``sampled-views`` condition it; :func:`draw_best_group` is the choice
among candidates that ``sampled-views`` makes too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import torch
from torch import Tensor

from guidance.multiview.targets import (MASK_HIGH, MASK_LOW, clean_views, match_error,
                                        resize_image)

USAGE = __doc__.split("\n\n")[1]


def command():
    """The command's keys (engine.cli)."""
    from engine.cli import Command, Key

    return Command("python -m guidance.multiview.sample", USAGE, [
        Key("out", str, required=True, help="out=PATH.png, where to write the grid of views"),
        Key("image", str, help="the input picture (image models)"),
        Key("prompt", str, help="the prompt (text models)"),
        Key("model", str, "pkunliu/Isotropic3D", help="converted folder, checkpoint or hub id"),
        Key("steps", int, 50, help="DDIM steps", maximum=1000),
        Key("scale", float, 10.0, help="classifier-free guidance scale"),
        Key("elevation", float, 15.0),
        Key("azimuth", float, 0.0, help="azimuth of the first view (engine convention)"),
        Key("views", int, 4, maximum=64),
        Key("seed", int, 0),
        Key("eta", float, 0.0, help="DDIM stochasticity"),
        Key("device", str, "auto", help="auto | cpu | cuda | cuda:N"),
        Key("image_size", int, 256, help="size the picture is loaded at", maximum=4096),
        # as inputs.object_fraction of a run: match the recipe's
        Key("object_fraction", float, 0.85, help="share of the frame the object fills"),
        Key("candidates", int, 1, help="seeds drawn; the group most like the picture is kept",
            maximum=256),
    ])


def parse_args(argv: List[str]):
    """The checked items of ``argv`` (engine.cli.Args); ConfigError for a mistake."""
    from engine.errors import ConfigError

    args = command().parse(argv)
    if (args.image is None) == (args.prompt is None):
        raise ConfigError("give exactly one of image=PATH or prompt=TEXT")
    if args.steps < 1 or args.views < 1 or args.candidates < 1:
        raise ConfigError("steps, views and candidates must be >= 1")
    if args.candidates > 1 and args.image is None:
        raise ConfigError("candidates: choosing among samples needs image=PATH (a prompt has "
                          "no picture to compare with)")
    if not 0.1 <= args.object_fraction <= 1.0:
        raise ConfigError(f"object_fraction: must be in [0.1, 1], got {args.object_fraction}")
    return args


def ddim_scheduler(model, clip_sample: bool):
    """DDIM on the model's own training schedule and parametrisation (scheduler_config.json):
    MVDream's scaled-linear betas with "leading" steps offset by 1, or a zero-terminal-SNR
    schedule whose "trailing" steps start at t = 999, where x_T is pure noise."""
    from diffusers import DDIMScheduler

    from guidance.multiview.model import SCHEDULER_KWARGS

    cfg = dict(SCHEDULER_KWARGS, **model.scheduler_config)
    spacing = cfg.get("timestep_spacing", "leading")
    return DDIMScheduler(
        num_train_timesteps=cfg["num_train_timesteps"], beta_start=cfg["beta_start"],
        beta_end=cfg["beta_end"], beta_schedule=cfg["beta_schedule"],
        rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
        timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
        prediction_type=model.info.prediction_type, clip_sample=clip_sample,
        set_alpha_to_one=False)


@torch.no_grad()
def sample_views(model, context_cond, context_uncond, cameras16, num_views: int, steps: int,
                 scale: float, eta: float, generator, clip_sample: Optional[bool] = None,
                 progress=None, anchors=None):
    """DDIM sampling of the ``num_views`` views of K objects at once.

    Args:
        context_cond: [K, L, D], one context per object; context_uncond: [1, L, D];
        cameras16: [V, 16], the same cameras for every object. generator: one
        ``torch.Generator`` (K = 1) or a list of K, one per object: object k's noise comes
        from its own generator only, so an object's views do not depend on the others
        sampled beside it (batching only changes float rounding). clip_sample: clamp each
        step's predicted x0 to [-1, 1]; default: for pixel-space models, whose x0 is the
        image itself (a latent has no such range). progress: a bar advanced once a step
        (engine.progress). anchors: None, or (x0 [A, C, h, w] in the model's space,
        cameras16 [A, 16]): A clean views that join every object's attention group at
        timestep 0 with their own cameras, in both halves of CFG (a model trained in mode
        anchors draws the views between them; guidance/anchor_views.py). At ``scale`` 1
        the guided output is the conditional one, so the unconditional pass is skipped (the
        same views up to float rounding, half the work).
    Returns:
        images [K * V, 3, S, S] in [0, 1], object by object.
    """
    if clip_sample is None:
        clip_sample = model.info.space == "pixel"
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    objects = context_cond.shape[0]
    if len(generators) != objects:
        raise ValueError(f"{objects} contexts but {len(generators)} generators")
    sched = ddim_scheduler(model, bool(clip_sample))
    sched.set_timesteps(steps)
    device = cameras16.device
    size, channels = model.unet.config.sample_size, model.unet.config.in_channels
    shape = (num_views, channels, size, size)
    x = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device)
    n = objects * num_views
    # at scale 1 guidance is the conditional output alone: the unconditional half is skipped
    halves = 1 if scale == 1.0 else 2
    context = context_cond.repeat_interleave(num_views, dim=0)
    if halves == 2:
        context = torch.cat([context_uncond.expand(n, -1, -1), context])
    cams = cameras16.repeat(halves * objects, 1)
    A = 0 if anchors is None else anchors[0].shape[0]
    if A:
        groups = halves * objects
        a_x0 = anchors[0].to(device)[None].expand(groups, -1, -1, -1, -1)
        cams = torch.cat([cams.view(groups, num_views, -1),
                          anchors[1].to(cams)[None].expand(groups, -1, -1)], 1).flatten(0, 1)
        context = context.view(groups, num_views, *context.shape[1:])
        context = torch.cat([context, context[:, :1].expand(-1, A, -1, -1)], 1).flatten(0, 1)
        t_group = torch.zeros(groups, num_views + A, dtype=torch.long, device=device)
    for t in sched.timesteps:
        xx = torch.cat([x] * halves)
        if A:
            xx = torch.cat([xx.view(groups, num_views, *shape[1:]), a_x0.to(x)], 1).flatten(0, 1)
            t_group[:, :num_views] = int(t)
            tt = t_group.flatten()
        else:
            tt = torch.full((halves * n,), int(t), device=device, dtype=torch.long)
        # guidance is linear in the output, so it may mix v as well as epsilon
        out = model.predict_output(xx, tt, context.to(x), cams.to(x), num_views + A)
        if A:
            out = out.view(groups, num_views + A, *shape[1:])[:, :num_views].flatten(0, 1)
        if halves == 2:
            out_u, out_c = out.chunk(2)
            out = out_u + scale * (out_c - out_u)
        # DDIM's own noise (eta > 0) drawn per object, as each object alone would draw it
        noise = None if eta == 0 else torch.cat(
            [torch.randn(shape, generator=g, dtype=out.dtype) for g in generators]).to(device)
        x = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        if progress is not None:
            progress.update(1)
    return model.decode(x).clamp(0, 1)


@torch.no_grad()
def draw_best_group(prior, cond: Tensor, uncond: Tensor, cam16: Tensor, candidates: int,
                    seed: int, steps: int, scale: float, input_view: Optional[int],
                    image=None, mask_low: float = MASK_LOW, mask_high: float = MASK_HIGH,
                    eta: float = 0.0):
    """Sample ``candidates`` groups of views (seeds ``seed`` .. ``seed + candidates - 1``)
    from ``prior`` (a :class:`guidance.multiview.prior.MultiViewPrior`) with the contexts
    ``cond`` / ``uncond`` [1, L, D], and keep the one whose view ``input_view`` is most like
    ``image`` (a ReferenceImage; ``input_view`` None: the first group).

    Args:
        cam16: [V, 16] camera vectors of one group. steps, scale, eta: DDIM steps, CFG
        scale and stochasticity.
    Returns:
        (rgb [V, S, S, 3] on pure white, mask [V, S, S, 1], chosen index, errors [K] or None).
        Not differentiable.
    """
    from engine.progress import bar

    rgbs, masks = [], []
    with bar(candidates * steps, f"drawing {candidates} candidate view groups",
             unit="step") as progress:
        for k in range(candidates):
            g = torch.Generator().manual_seed(seed + k)
            views = prior.sample(cond, uncond, cam16, steps, scale, eta, g, progress=progress)
            rgb, mask = clean_views(views.float().permute(0, 2, 3, 1), mask_low, mask_high)
            rgbs.append(rgb)
            masks.append(mask)
    rgbs, masks = torch.stack(rgbs), torch.stack(masks)              # [K, V, S, S, C]
    if input_view is None:
        return rgbs[0], masks[0], 0, None
    size = rgbs.shape[2]
    errors = match_error(rgbs[:, input_view], masks[:, input_view],
                         resize_image(image.rgb.to(rgbs), size),
                         resize_image(image.mask.to(rgbs), size))
    chosen = int(errors.argmin())
    return rgbs[chosen], masks[chosen], chosen, errors


WHO = "python -m guidance.multiview.sample"


def group_cameras(prior, args) -> Tensor:
    """[V, 16] camera vectors of the command's group of views (``args``: parse_args)."""
    from engine.cameras import Cameras

    az = args.azimuth + torch.arange(args.views, dtype=torch.float32) * 360.0 / args.views
    cams = Cameras.from_spherical(args.elevation, az, 1.0, 40.0, views_per_object=args.views)
    # sampling always uses the correct cameras; the release's double conversion was an SDS bug
    return prior.camera_vectors(cams, "mvdream")


def sample_inputs(prior, images: list, prompts: list, seeds: List[int], args) -> Tensor:
    """The views the command draws (without ``candidates``) for each of K inputs at once:
    ``images`` (ReferenceImage or None) and ``prompts`` (str or None), K of each, sampled
    with ``seeds``, the other settings from ``args`` (:func:`parse_args`); one model load
    for many pictures. Returns [K, V, 3, S, S] in [0, 1], each object exactly as the command
    alone would draw it (up to float rounding)."""
    from engine.progress import bar

    pairs = [prior.contexts(im, pr, who=WHO) for im, pr in zip(images, prompts)]
    cond = torch.cat([c for c, _ in pairs])
    gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    with bar(args.steps, "sampling views", unit="step") as progress:
        views = prior.sample(cond, pairs[0][1], group_cameras(prior, args), args.steps,
                             args.scale, args.eta, gens, progress=progress)
    return views.reshape(len(seeds), args.views, *views.shape[1:])


def run(argv: List[str]) -> int:
    import numpy as np
    from PIL import Image

    from engine.cli import Command
    from engine.images import load_reference_image
    from engine.outputs import to_uint8
    from engine.run import resolve_device
    from guidance.multiview.prior import MultiViewPrior

    if not argv or Command.wants_help(argv):
        print(USAGE)
        return 0
    args = parse_args(argv)
    device = resolve_device(args.device)
    prior = MultiViewPrior.load(args.model, device=device, dtype=None)   # as saved
    image = (load_reference_image(args.image, args.image_size, args.object_fraction)
             if args.image else None)
    if args.candidates > 1:
        cond, uncond = prior.contexts(image, args.prompt, who=WHO)
        rgb, _, chosen, errors = draw_best_group(prior, cond, uncond, group_cameras(prior, args),
                                                 args.candidates, args.seed, args.steps,
                                                 args.scale, 0, image, eta=args.eta)
        print(f"kept seed {args.seed + chosen} of {args.seed}..{args.seed + args.candidates - 1}"
              f" (match error {float(errors[chosen]):.4f})")
        views = rgb.permute(0, 3, 1, 2)
    else:
        views = sample_inputs(prior, [image], [args.prompt], [args.seed], args)[0]
    tiles = [to_uint8(v.permute(1, 2, 0)) for v in views]
    if image is not None:
        ref = torch.nn.functional.interpolate(image.rgb.permute(2, 0, 1)[None],
                                              size=tiles[0].shape[:2], mode="area")[0]
        tiles.insert(0, to_uint8(ref.permute(1, 2, 0)))
    from engine.atomic import atomic_write
    from engine.errors import UserError

    out = Path(args.out)
    grid = Image.fromarray(np.concatenate(tiles, axis=1))
    try:
        atomic_write(out, grid.save)   # the temp name keeps the suffix, which picks the format
    except (ValueError, KeyError):
        raise UserError(f"out={out}: Pillow cannot tell the picture format from its suffix; "
                        "use .png or .jpg") from None
    print(f"views: {out}")
    return 0


def read_views(path, with_input: bool = True):
    """The views of a grid :func:`run` wrote: uint8 [V, S, S, 3] (square tiles side by side;
    the input picture, first when ``with_input``, is left out)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        tiles = np.asarray(im.convert("RGB"))
    size = tiles.shape[0]
    first = 1 if with_input else 0
    return np.stack([tiles[:, k * size:(k + 1) * size]
                     for k in range(first, tiles.shape[1] // size)])


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
