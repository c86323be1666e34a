"""``python -m guidance.training``: train or fine-tune a multi-view diffusion model (or the
CLIP model that conditions it) on a multi-view dataset (engine.datasets.mvdataset format).

    python -m guidance.training recipe=NAME_OR_PATH [out=DIR] [key=value ...]
    python -m guidance.training resume=RUN_FOLDER_OR_CHECKPOINT [key=value ...]
    accelerate launch --multi_gpu --num_processes N -m guidance.training recipe=NAME ...
    torchrun --nproc_per_node N -m guidance.training recipe=NAME device=cpu   # CPU processes

A name resolves to recipes/finetune/NAME.yaml. Modes (``mode:``): ``text``, ``image`` and
``ema`` train a multi-view diffusion model (:mod:`guidance.training.diffusion`), ``clip`` an
OpenCLIP model (:mod:`guidance.training.clip`), ``points`` a Point-E point-cloud model
(:mod:`guidance.training.points`), ``triplane-ae`` Compress3D's triplane autoencoder
(:mod:`guidance.training.triplane_ae`), ``triplane-diffusion`` Compress3D's shape prior and
triplane latent diffusion (:mod:`guidance.training.triplane_diffusion`); all through one loop
(:mod:`guidance.training.loop`). Every other ``key=value`` item is a dotted override of the
recipe (:mod:`guidance.training.config`). With several processes each one gets
``batch_size`` objects per step.

User mistakes end with one line on stderr and exit code 2; Ctrl-C writes a checkpoint and
exits with 130; a non-finite loss aborts with exit code 3.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

from engine.errors import ConfigError, run_cli
from guidance.training.config import FinetuneConfig, build_config, config_to_dict, read_recipe

PROG = "python -m guidance.training"
USAGE = f"""\
usage: {PROG} recipe=NAME_OR_PATH [out=DIR] [key=value ...]
       {PROG} resume=RUN_FOLDER_OR_CHECKPOINT [key=value ...]
       accelerate launch -m guidance.training recipe=NAME [key=value ...]

Modes: text (text-to-multi-view), image (Isotropic3D stage 1), ema (stage 2, explicit
multi-view attention), clip (contrastive OpenCLIP), points (a Point-E model on
coloured clouds of a toy world's meshes), triplane-ae (Compress3D's triplane autoencoder of
those clouds), triplane-diffusion (Compress3D's shape prior and latent diffusion from a
picture). NAME is recipes/finetune/NAME.yaml.
Overrides are dotted keys, e.g. steps=200 data.root=data/toy model.init=runs/text/model.
Outputs: OUT/config.yaml, metrics.jsonl, checkpoints/, samples/, model/ (OUT: out=, else the
recipe's out:, else outputs/finetune/NAME).
"""


def command():
    """The items: recipe=, resume=, out=; every other key=value is a dotted config override."""
    from engine.cli import Command, Key

    return Command(PROG, USAGE, [
        Key("recipe", str, help="recipes/finetune/NAME.yaml by name, or a YAML path"),
        Key("resume", str, help="run folder or checkpoint to continue"),
        Key("out", str, help="run folder (default: the recipe's out:, else "
                             "outputs/finetune/NAME)"),
    ], passthrough=True)


def prepare(argv: Sequence[str]) -> Tuple[FinetuneConfig, Path, Optional[Path]]:
    """Parse the command line: (config, run folder, checkpoint to resume or None)."""
    from engine import checkpoint
    from engine.config import read_yaml

    cmd = command()
    args = cmd.parse(list(argv))
    recipe, resume, rest = args.recipe, args.resume, args.rest
    if resume:
        run_dir, ckpt = checkpoint.find_resume_checkpoint(Path(resume))
        saved = read_yaml(run_dir / "config.yaml", "saved config")
        if recipe is not None and recipe not in (saved.get("recipe"), ""):
            raise ConfigError(f"resume={resume} is a run of recipe '{saved.get('recipe')}', not "
                              f"'{recipe}'; drop recipe= when resuming")
        cfg = _config(cmd, saved, rest)
        cfg.out = str(run_dir)                     # a resumed run stays in its folder
        return cfg, run_dir, ckpt
    if recipe is None:
        raise ConfigError("no recipe given: add recipe=NAME (recipes/finetune/NAME.yaml) or "
                          f"recipe=PATH.yaml{cmd.misspelt(rest)}")
    name, data = read_recipe(recipe)
    cfg = _config(cmd, data, rest, name)
    if args.out is not None:
        cfg.out = args.out
    # relative to the working directory, as the engine's output.root
    out = Path(cfg.out) if cfg.out else Path("outputs") / "finetune" / name
    if checkpoint.list_checkpoints(out / "checkpoints"):
        raise ConfigError(f"out: {out} already holds a run; continue it with resume={out} or "
                          "choose another out=")
    cfg.out = str(out)
    return cfg, out, None


def _config(cmd, data: dict, rest: Sequence[str], recipe: Optional[str] = None
            ) -> FinetuneConfig:
    try:
        return build_config(data, rest, recipe=recipe)
    except ConfigError as exc:   # an override the config refuses may be a misspelt resume=
        raise ConfigError(f"{exc}{cmd.misspelt(rest)}") from None


def make_trainer(cfg: FinetuneConfig, out_dir: Path, resume: Optional[Path] = None):
    """The trainer of ``cfg.mode``: :class:`~guidance.training.clip.ClipTrainer` for clip,
    else :class:`~guidance.training.diffusion.DiffusionTrainer`."""
    if cfg.mode == "clip":
        from guidance.training.clip import ClipTrainer as cls
    elif cfg.mode == "points":
        from guidance.training.points import PointTrainer as cls
    elif cfg.mode == "triplane-ae":
        from guidance.training.triplane_ae import TriplaneAETrainer as cls
    elif cfg.mode == "triplane-diffusion":
        from guidance.training.triplane_diffusion import TriplaneDiffusionTrainer as cls
    else:
        from guidance.training.diffusion import DiffusionTrainer as cls
    return cls(cfg, out_dir, resume=resume)


def run(argv: Sequence[str]) -> int:
    import yaml

    from engine.checkpoint import atomic_write_text
    from engine.cli import Command
    from engine.trainer import Interrupted

    argv = list(argv)
    if not argv or Command.wants_help(argv):
        print(USAGE)
        return 0
    cfg, out, ckpt = prepare(argv)
    job = make_trainer(cfg, out, resume=ckpt)
    if job.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml",
                          yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    try:
        folder = job.run()
    except Interrupted as exc:
        print(f"{exc}; checkpoint: {exc.checkpoint}\ncontinue with: {PROG} resume={out}",
              file=sys.stderr)
        return exc.exit_code
    if job.accelerator.is_main_process:
        print(f"model: {folder}\noutput: {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(run, list(sys.argv[1:] if argv is None else argv))
