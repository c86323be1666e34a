"""``python -m guidance.training.toy_models``: re-create the toy models from scratch, seeded.

    python -m guidance.training.toy_models [out=models/toy] [data=data/toy] [count=200]
        [heldout=20] [heldout_pool=0] [seed=0] [steps_scale=1.0] [width=1] [batch=0]
        [device=auto] [threads=0]
        [models=[clip,text,stage1,stage2,pointe,triplane-ae,compress3d,anchors]]

The chain (../shared/DESIGN.md section 5), each step through the same commands a user runs:

1. the toy world (``engine.datasets.toy_world``) into ``data`` unless it is already there;
2. ``recipes/finetune/toy-clip`` (``python -m guidance.training``): a tiny OpenCLIP trained
   contrastively on renders + captions;
3. ``toy-text``: a pixel-space text-to-multi-view model trained from scratch (MVDream analogue);
4. ``toy-image``: Isotropic3D stage 1 (the CLIP image embedding replaces the text);
5. ``toy-ema``: Isotropic3D stage 2 (explicit multi-view attention with the clean reference);
6. ``toy-pointe``: the point-cloud prior, a Point-E image-grid model on coloured clouds of the
   world's meshes, conditioned on the CLIP's image tokens (``python -m guidance.training``
   mode ``points``);
7. ``toy-triplane-ae``: Compress3D's triplane autoencoder of those clouds (mode
   ``triplane-ae``);
8. ``toy-compress3d``: Compress3D's shape prior and triplane latent diffusion, conditioned on
   the CLIP's image embedding, over the autoencoder's latents (mode ``triplane-diffusion``);
9. ``toy-anchors``: Envision3D's interpolation, the stage-2 model fine-tuned with clean anchor
   views of another camera group in its attention (mode ``anchors``).

``models=`` makes only some of them (``models=[pointe]`` re-creates the point model alone in
about 25 minutes); a model a chosen one needs but that is not made this time is taken from
``out`` (the CLIP the point model reads: ``out/clip``). The manifest keeps the entries of the
models not made this time.

Finished steps are skipped when the command is run again (their ``model/`` exists), so an
interrupted chain continues. The models end up in ``out``: ``clip/``, ``text/``,
``stage1/``, ``stage2/``, ``pointe/``, ``triplane-ae/``, ``compress3d/`` and ``anchors/``, with ``manifest.json`` (the command, the settings, and each
training's steps, wall time and final loss); ``steps_scale`` scales every training (tests
shorten it; a longer one makes better models). ``width`` multiplies the multi-view UNet's
channels and attention heads (its heads stay 32-d; stages 1 and 2 inherit the text model's
architecture) and ``batch``, when > 0, replaces the diffusion trainings' batch size (objects
per step): the knobs for a bigger model on a GPU, where the shipped sizes underfit.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import List, Optional

STAGES = (("clip", "toy-clip"), ("text", "toy-text"), ("stage1", "toy-image"),
          ("stage2", "toy-ema"), ("pointe", "toy-pointe"), ("triplane-ae", "toy-triplane-ae"),
          ("compress3d", "toy-compress3d"), ("anchors", "toy-anchors"))
MODEL_NAMES = [name for name, _ in STAGES]
DEFAULTS = dict(out="models/toy", data="data/toy", count=200, heldout=20, heldout_pool=0,
                seed=0, steps_scale=1.0, width=1, batch=0, device="auto", threads=0,
                models=list(MODEL_NAMES))
#: what each model is trained from (its own training's inputs among the others)
NEEDS = {"text": ["clip"], "stage1": ["text", "clip"], "stage2": ["stage1"], "pointe": ["clip"],
         "compress3d": ["clip", "triplane-ae"], "anchors": ["stage2"]}
#: side of the toy world's renders the models train on
DATA_SIZE = 64


def command():
    """The chain's keys, with :data:`DEFAULTS`."""
    from engine.cli import Command, Key

    d = DEFAULTS
    return Command("python -m guidance.training.toy_models", __doc__, [
        Key("out", str, d["out"], help="folder of the models"),
        Key("data", str, d["data"], help="the toy world's folder (made when missing)"),
        Key("count", int, d["count"], help="objects in the toy world"),
        Key("heldout", int, d["heldout"], help="held-out objects"),
        Key("heldout_pool", int, d["heldout_pool"],
            help="draw the held-out objects among the first N (0: all)"),
        Key("seed", int, d["seed"], help="seed of the world and of the trainings"),
        Key("steps_scale", float, d["steps_scale"], help="scales every training's steps"),
        Key("width", int, d["width"], help="multiplies the UNet's channels and heads"),
        Key("batch", int, d["batch"], help="diffusion trainings' batch size (0: the recipes')"),
        Key("device", str, d["device"], choices=("auto", "cpu"), help="auto or cpu"),
        Key("threads", int, d["threads"], help="torch threads on CPU (0: torch's default)"),
        Key("models", list, d["models"], choices=MODEL_NAMES,
            help="the models to make (the others are taken from out when needed)"),
    ])


def parse(argv: List[str]) -> dict:
    from engine.errors import ConfigError

    parsed = command().parse(argv)
    args = {key: parsed[key] for key in DEFAULTS}
    if args["count"] < 2 or not 1 <= args["heldout"] < args["count"]:
        raise ConfigError("count must be >= 2 and 1 <= heldout < count")
    if not (args["heldout_pool"] == 0 or args["heldout"] <= args["heldout_pool"] <= args["count"]):
        raise ConfigError("heldout_pool must be 0 (all objects) or in [heldout, count]")
    if args["steps_scale"] <= 0:
        raise ConfigError("steps_scale must be > 0")
    if args["width"] < 1 or args["batch"] < 0:
        raise ConfigError("width must be >= 1 and batch >= 0 (0: the recipes' batch size)")
    if not args["models"]:
        raise ConfigError(f"models: name at least one of {', '.join(MODEL_NAMES)}")
    args["models"] = [m for m in MODEL_NAMES if m in args["models"]]   # chain order
    return args


def _recipe(recipe: str) -> dict:
    from engine.config import load_recipe

    return load_recipe(recipe, "finetune", "fine-tuning recipe")[1]


def _steps(recipe: str, scale: float) -> int:
    return max(2, math.ceil(_recipe(recipe)["steps"] * scale))


def _widened_unet(recipe: str, width: int) -> List[str]:
    """Overrides making ``recipe``'s UNet ``width`` times wider, heads kept 32-d."""
    unet = _recipe(recipe)["model"]["unet"]
    channels = [c * width for c in unet["block_out_channels"]]
    heads = [h * width for h in unet["attention_head_dim"]]
    return [f"model.unet.block_out_channels=[{','.join(map(str, channels))}]",
            f"model.unet.attention_head_dim=[{','.join(map(str, heads))}]"]


def run(argv: List[str]) -> int:
    from engine.checkpoint import atomic_write_text
    from engine.cli import Command
    from engine.datasets import toy_world
    from engine.errors import ConfigError, RunAborted
    from guidance.training.command import main as train

    if Command.wants_help(argv):
        print(__doc__)
        return 0
    args = parse(argv)
    out, data = Path(args["out"]), Path(args["data"])

    def present(folder: Path) -> bool:
        return folder.is_dir() and any(folder.iterdir())

    for name in args["models"]:          # before anything is made: what is needed is there
        for need in NEEDS.get(name, []):
            if need not in args["models"] and not present(out / "runs" / need / "model") \
                    and not present(out / need):
                raise ConfigError(f"models: {name} needs the {need} model; it is neither "
                                  f"made this time nor in {out / need}: add {need} to models=")
    if not (data / "dataset.json").is_file():
        toy_world.generate(data, count=args["count"], heldout=args["heldout"],
                           seed=args["seed"], size=DATA_SIZE,
                           heldout_pool=args["heldout_pool"])
    runs = out / "runs"
    models = {}
    for name, recipe in STAGES:
        model = runs / name / "model"
        if name not in args["models"]:
            # not made this time: an earlier run's, else the one in out (for what needs it)
            models[name] = model if present(model) else out / name
            continue
        models[name] = model
        if model.is_dir() and any(model.iterdir()):
            print(f"{name}: already trained ({model})")
            continue
        items = [f"recipe={recipe}", f"data.root={data}", f"out={runs / name}",
                 f"seed={args['seed'] + len(models)}", f"steps={_steps(recipe, args['steps_scale'])}",
                 f"device={args['device']}"]
        if args["threads"]:
            items.append(f"cpu_threads={args['threads']}")
        if args["batch"] and name != "clip":
            items.append(f"batch_size={args['batch']}")
        if name == "text":
            items.append(f"model.conditioner.model={models['clip']}")
            if args["width"] > 1:
                items += _widened_unet(recipe, args["width"])
        elif name == "stage1":
            items += [f"model.init={models['text']}", f"model.conditioner.model={models['clip']}"]
        elif name == "stage2":
            items.append(f"model.init={models['stage1']}")
        elif name == "pointe":
            items.append(f"model.conditioner.model={models['clip']}")
        elif name == "compress3d":
            items += [f"model.conditioner.model={models['clip']}",
                      f"model.latent.autoencoder={models['triplane-ae']}"]
        elif name == "anchors":
            items.append(f"model.init={models['stage2']}")
        if (runs / name).exists():          # a half-finished run: continue it
            items = [f"resume={runs / name}"]
        code = train(items)
        if code != 0:
            raise RunAborted(f"training {name} ({recipe}) exited with {code}; run "
                             "python -m guidance.training.toy_models again to continue")
    # the settings that shape the models (not where they go, nor how fast they are made)
    shaping = [f"{k}={v}" for k, v in args.items()
               if v != DEFAULTS[k] and k not in ("out", "data", "device", "threads")]
    shaping = [item for item in shaping if not item.startswith("models=")]
    made = {name: models[name] for name in args["models"]}
    if set(made) != set(MODEL_NAMES):
        shaping.append(f"models=[{','.join(made)}]")
    manifest = {"command": " ".join(["python -m guidance.training.toy_models", *shaping]),
                "settings": args, "models": {}}
    old = out / "manifest.json"
    if set(made) != set(MODEL_NAMES) and old.is_file():
        try:     # the models not made this time keep their records
            previous = json.loads(old.read_text())
            manifest["models"] = {k: v for k, v in previous.get("models", {}).items()
                                  if k not in made}
            manifest["earlier"] = {"command": previous.get("command"),
                                   "models": sorted(manifest["models"])}
        except (OSError, ValueError):
            pass
    for name, model in made.items():
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(model, target)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        manifest["models"][name] = {"recipe": dict(STAGES)[name], "mib": round(size / 2**20, 2),
                                    **_training_summary(runs / name)}
        print(f"{name}: {target} ({size / 2**20:.1f} MiB)")
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return 0


def _training_summary(run_dir: Path) -> dict:
    """Steps, wall time and the last logged loss of a finished training."""
    rows = []
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not rows:
        return {}
    last = rows[-1]
    return {"steps": last.get("step"), "seconds": round(float(last.get("elapsed_s", 0.0)), 1),
            "final_loss": last.get("loss")}


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
