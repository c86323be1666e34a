"""Does the toy CLIP know what kind of object a picture shows? Scored on toy objects.

    python benchmarks/bench_toy_clip.py [clip=models/toy/clip] [data=data/toy]
        [split=heldout] [limit=0] [reference_split=train]

Isotropic3D's models get every bit of what they know about the input at inference from one
CLIP image embedding, so a CLIP that cannot tell a mug from a vase caps every model after it.
For each object of split=, its front view (r0.png, composited on white, as the conditioner
sees it) is embedded and scored three ways:

* kind, zero-shot: the caption with its own colours and each kind of the dataset in turn
  ("a red and grey <kind>"): the colour is given, so only the shape decides (chance 1 /
  number of kinds);
* colour, zero-shot: its caption with the first colour swapped for each colour of the
  palette;
* kind, nearest neighbour: the kind of the reference_split= object whose front embedding is
  nearest (cosine; the object itself left out) - what an image-conditioned model can lean on.
  Also printed for two other features of the same pictures: the conditioner's patch tokens
  (``tokens: patches``, flattened) and the raw pixels (minus mid-grey), the floor any
  learnt feature should beat.

Scoring the training split too (split=train) shows the generalisation gap. Prints the
per-kind counts and the totals; the data folder is a toy-world dataset (python -m
engine.datasets.toy_world).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load_clip(folder: Path):
    """The whole OpenCLIP model (both towers) of a folder written by a clip-mode run."""
    from guidance.conditioners import build_openclip, read_weights

    config = folder / "open_clip_config.json"
    weights = folder / "open_clip_model.safetensors"
    if not config.is_file() or not weights.is_file():
        raise SystemExit(f"error: {folder} is not an OpenCLIP folder (open_clip_config.json + "
                         "open_clip_model.safetensors); pass --clip models/toy/clip or a clip "
                         "run's model/")
    clip = build_openclip(json.loads(config.read_text())["model_cfg"])
    clip.load_state_dict(read_weights(weights), strict=True)
    return clip.eval()


def front_on_white(path: Path) -> torch.Tensor:
    """r0.png -> [3, H, W] in [0, 1], composited on white (as the image conditioner)."""
    import imageio.v3 as iio

    rgba = iio.imread(path).astype(np.float32) / 255.0
    rgb = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])
    return torch.from_numpy(rgb).permute(2, 0, 1)


def main(argv=None) -> int:
    from engine.cli import Command, Key
    from engine.errors import ConfigError, InputError

    args = Command("python benchmarks/bench_toy_clip.py", __doc__, [
        Key("clip", str, "models/toy/clip", help="the toy CLIP folder"),
        Key("data", str, "data/toy", help="a toy-world dataset"),
        Key("split", str, "heldout"),
        Key("limit", int, 0, help="first N objects of split (0: all)"),
        Key("reference_split", str, "train"),
    ]).parse(sys.argv[1:] if argv is None else argv)

    import open_clip

    from engine.datasets.toy_world import COLOR_NAMES, caption_for, display_name
    from guidance.conditioners import OpenCLIPImageConditioner, clip_preprocess

    data = Path(args.data)
    if not (data / "dataset.json").is_file():
        raise InputError(f"no toy dataset in {data}; make it with python -m "
                         f"engine.datasets.toy_world out={data} or pass data=")
    splits = json.loads((data / "dataset.json").read_text()).get("splits", {})
    for split in (args.split, args.reference_split):
        if split not in splits:
            raise ConfigError(f"{data} has no split '{split}'; it has {', '.join(splits)}")
    ids = splits[args.split][:args.limit or None]
    refs = splits[args.reference_split]
    meta = {oid: json.loads((data / oid / "object.json").read_text())
            for oid in dict.fromkeys(ids + refs)}
    kinds = sorted({m["kind"] for m in meta.values()})
    colours = list(COLOR_NAMES)

    clip = load_clip(Path(args.clip))
    size = clip.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    t0 = time.perf_counter()

    rgb = torch.stack([front_on_white(data / o / "r0.png") for o in ids])
    ref_rgb = torch.stack([front_on_white(data / o / "r0.png") for o in refs])

    @torch.no_grad()
    def in_batches(features, pictures):
        return torch.cat([features(pictures[i:i + 64]) for i in range(0, len(pictures), 64)])

    @torch.no_grad()
    def embed_texts(texts):
        return clip.encode_text(open_clip.tokenize(texts, context_length=clip.context_length),
                                normalize=True)

    def nearest_hits(own, other):
        """Per object of --split: is the nearest --reference-split front (cosine, the object
        itself left out) of its kind?"""
        sim = F.normalize(own, dim=-1) @ F.normalize(other, dim=-1).T
        for i, oid in enumerate(ids):
            sim[i, [j for j, r in enumerate(refs) if r == oid]] = -2.0
        return [meta[refs[int(j)]]["kind"] == meta[o]["kind"] for o, j in zip(ids, sim.argmax(1))]

    def clip_embedding(x):
        return clip.encode_image(clip_preprocess(x, size), normalize=True)

    img = in_batches(clip_embedding, rgb)
    patch_cond = OpenCLIPImageConditioner(
        OpenCLIPImageConditioner.Config(model=args.clip, tokens="patches"))

    def patch_tokens(x):
        return patch_cond(x)[:, 1:].flatten(1)

    nn_hits = nearest_hits(img, in_batches(clip_embedding, ref_rgb))
    nn_other = {"patch tokens": nearest_hits(in_batches(patch_tokens, rgb),
                                             in_batches(patch_tokens, ref_rgb)),
                "pixels": nearest_hits(rgb.flatten(1) - 0.5, ref_rgb.flatten(1) - 0.5)}
    kind_ok, colour_ok, nn_ok = Counter(), Counter(), Counter()
    total = Counter()
    for i, oid in enumerate(ids):
        kind, own = meta[oid]["kind"], meta[oid]["colors"]
        total[kind] += 1
        by_kind = embed_texts([caption_for(display_name(k), own) for k in kinds]) @ img[i]
        kind_ok[kind] += kinds[int(by_kind.argmax())] == kind
        by_colour = embed_texts([caption_for(display_name(kind), [c] + own[1:])
                                 for c in colours]) @ img[i]
        colour_ok[kind] += colours[int(by_colour.argmax())] == own[0]
        nn_ok[kind] += nn_hits[i]

    n = len(ids)
    print(f"{'kind':<10} {'objects':>7} {'kind 0-shot':>11} {'colour 0-shot':>13} "
          f"{'kind NN':>7}")
    for kind in kinds:
        if total[kind]:
            print(f"{kind:<10} {total[kind]:>7} {kind_ok[kind]:>11} {colour_ok[kind]:>13} "
                  f"{nn_ok[kind]:>7}")
    print(f"\n{args.clip} on {data} {args.split} ({n} objects, {len(kinds)} kinds, "
          f"{len(colours)} colours; {time.perf_counter() - t0:.1f} s)")
    print(f"kind, zero-shot (colour given):  {sum(kind_ok.values())}/{n} "
          f"(chance {n / len(kinds):.1f})")
    print(f"colour, zero-shot (kind given):  {sum(colour_ok.values())}/{n} "
          f"(chance {n / len(colours):.1f})")
    print(f"kind of the nearest {args.reference_split} front: {sum(nn_ok.values())}/{n}")
    for name, hits in nn_other.items():
        print(f"  the same by {name}: {sum(hits)}/{n}")
    return 0


if __name__ == "__main__":
    from engine.errors import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
