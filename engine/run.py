"""``python -m engine.run``: run a recipe.

    python -m engine.run recipe=NAME [image=PATH] [prompt=TEXT] [key=value ...] [--dry-run | --estimate]
    python -m engine.run resume=RUN_FOLDER_OR_CHECKPOINT [key=value ...]
    python -m engine.run --list

User mistakes end with one line on stderr and exit code 2; an interrupted run (Ctrl-C) writes
a checkpoint and exits with 130; a run aborted on purpose (repeated NaN) exits with 3.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

USAGE = """\
usage: python -m engine.run recipe=NAME [image=PATH] [prompt=TEXT] [key=value ...] [--dry-run | --estimate]
       python -m engine.run resume=RUN_FOLDER_OR_CHECKPOINT [key=value ...]
       python -m engine.run --list

Runs a recipe (recipes/NAME.yaml, a recipe shipped by a plugin package, or a path to a YAML
file) merged over configs/defaults.yaml, with key=value overrides in OmegaConf dot-list form,
e.g. stages.fit.steps=100 or 'stages.fit.losses.rgb=[0, 1.0, 0.1, 500]'.

short keys:  image=PATH   -> inputs.image      prompt=TEXT -> inputs.prompt
             out=FOLDER   -> output.dir        seed=N      -> system.seed
             device=D     -> system.device (auto | cpu | cuda | cuda:N)
options:     --list       recipes and plugins of every kind, with where each comes from
             --dry-run    print the fully resolved config and exit
             --estimate   print the run's peak memory per stage (on CUDA unless device=cpu;
                          nothing is downloaded or trained) and exit
             --help       this text

Each run writes a new folder (default outputs/RECIPE/NAME-TIMESTAMP): config.yaml,
metrics.jsonl, checkpoints/, renders/ and the exported results. Ctrl-C saves a checkpoint;
continue with resume=THAT_FOLDER.
"""


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _print_list(out=None) -> None:
    from engine import config, registry

    out = out or sys.stdout
    recipes = config.available_recipes()
    print("recipes:", file=out)
    for name, (origin, where) in sorted(recipes.items()):
        try:
            data = config.read_yaml(where) if isinstance(where, Path) else \
                config.load_recipe(name)[1]
            desc = str(data.get("description", "") or "")
        except Exception as exc:  # listing must not die on one broken recipe
            desc = f"(unreadable: {exc})"
        print(f"  {name:<24} {_short(desc)}  [{origin}]", file=out)
    for kind in registry.KINDS:
        entries = registry.REGISTRY.entries(kind)
        print(f"{kind} plugins:", file=out)
        if not entries:
            print("  (none)", file=out)
        for e in entries:
            print(f"  {e.name:<24} {_short(e.description)}  [{e.origin}]", file=out)


def resolve_device(name: str):
    """``system.device`` (auto | cpu | cuda | cuda:N) as a torch.device; ConfigError when it
    names CUDA and none is visible."""
    import torch

    from engine.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible; use device=cpu or "
                          "device=auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name} is not a device; use auto, cpu, cuda or "
                          "cuda:N") from None


def command():
    """engine.run's items: recipe=, resume=, --list, --dry-run; every other key=value is a
    dot-list override of the config (engine.config.parse_overrides, with its short keys)."""
    from engine.cli import Command, Key

    return Command("python -m engine.run", USAGE, [
        Key("recipe", str, help="recipe name or YAML path (python -m engine.run --list)"),
        Key("resume", str, help="run folder or checkpoint to continue"),
    ], flags=["--list", "--dry-run", "--estimate"], passthrough=True)


def run(argv: List[str]) -> int:
    from engine import checkpoint, config
    from engine.bounds import check_memory
    from engine.errors import ConfigError

    if not argv:
        print(USAGE)
        return 0
    cmd = command()
    args = cmd.parse(argv)      # --help: the usage, exit code 0 (SystemExit)
    if "--list" in args.flags:
        _print_list()
        return 0
    recipe, resume, rest = args.recipe, args.resume, args.rest

    resume_ckpt = saved = None
    if resume:
        run_dir, resume_ckpt = checkpoint.find_resume_checkpoint(Path(resume))
        saved = config.read_yaml(run_dir / "config.yaml", "saved config")
        if recipe is not None and recipe != saved.get("recipe"):
            raise ConfigError(f"resume={resume} is a run of recipe '{saved.get('recipe')}', not "
                              f"'{recipe}'; drop recipe= when resuming")
    elif recipe is None:
        raise ConfigError("no recipe given: add recipe=NAME (python -m engine.run --list "
                          f"shows the names){cmd.misspelt(rest)}")
    try:
        cfg, resolved = config.load(None if resume else recipe, rest, base=saved)
    except ConfigError as exc:   # an override the config refuses may be a misspelt resume=
        raise ConfigError(f"{exc}{cmd.misspelt(rest)}") from None

    if "--dry-run" in args.flags:
        from omegaconf import OmegaConf

        from engine.recipes import format_sources

        print(config.to_yaml(resolved), end="")
        print("\n# where each value was set:")
        print(format_sources(cfg.provenance, OmegaConf.to_container(resolved)))
        return 0

    if "--estimate" in args.flags:
        return _estimate(cfg, recipe or saved.get("recipe", ""))
    config.check_inputs(cfg)
    device = resolve_device(cfg.system.device)
    check_memory(config.plain(resolved), device)    # before a model loads or a file is written
    _preflight(cfg)
    inputs = _load_inputs(cfg)
    return _train(cfg, resolved, device, inputs, resume_ckpt, saved)


def _preflight(cfg) -> None:
    """Each component's preflight (weights present, ...) before anything loads or is
    written. When a model is missing, the one line names every key that points at that same
    model (isotropic3d's NeRF and DMTet stages share one), so one fix covers them all."""
    from engine.errors import UserError
    from engine.export import check_export_libraries

    check_export_libraries(cfg.export)
    seen = set()
    for sname, stage_components in cfg.components.items():
        for field_name, (cls, ccfg) in stage_components.items():
            preflight = getattr(cls, "preflight", None)
            if preflight is None:
                continue
            key = f"stages.{sname}.{field_name}"
            model = getattr(ccfg, "model", None)
            if model is not None and model in seen:
                continue
            try:
                preflight(ccfg, key=key)
            except UserError as exc:
                same = [f"stages.{s}.{f}.model" for s, comps in cfg.components.items()
                        for f, (_, c) in comps.items()
                        if (s, f) != (sname, field_name) and model is not None
                        and getattr(c, "model", None) == model]
                if not same:
                    raise
                one = len(same) == 1
                raise UserError(f"{exc}; {' and '.join(same)} {'uses' if one else 'use'} the "
                                f"same model: set {'it' if one else 'them'} too") from None
            if model is not None:
                seen.add(model)


def _estimate(cfg, recipe: str) -> int:
    """--estimate: the run's peak memory per stage and phase (engine/estimate.py), for the
    run's device: CUDA unless system.device is cpu (a CPU machine plans a GPU run)."""
    from engine.estimate import estimate_summary

    device_type = "cpu" if cfg.system.device == "cpu" else "cuda"
    table, _ = estimate_summary(cfg, device_type, recipe)
    print(table)
    return 0


def _load_inputs(cfg):
    from engine.images import load_reference_image
    from engine.plugin import RunInputs

    image = None
    if cfg.inputs.image:
        image = load_reference_image(cfg.inputs.image, cfg.inputs.image_size,
                                     cfg.inputs.object_fraction)
    return RunInputs(image=image, prompt=cfg.inputs.prompt)


#: the picture after loading (upright, masked, re-centred, scaled), saved in the run folder
INPUT_PICTURE = "input.png"


def _save_input_picture(image, path) -> None:
    """The reference image as the run uses it: RGB over white with the mask as alpha."""
    import numpy as np
    from PIL import Image

    from engine.atomic import atomic_write

    rgba = np.concatenate([image.rgb.cpu().numpy(), image.mask.cpu().numpy()], axis=-1)
    pixels = (np.clip(rgba, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    picture = Image.fromarray(pixels)          # [H, W, 4] uint8: RGBA
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def _train(cfg, resolved, device, inputs, resume_ckpt, saved=None) -> int:
    """Train in a new run folder, or continue one. A resume is a transaction: the folder is
    locked, then the checkpoint, the config and the modules' sizes are all checked
    (Trainer.prepare_resume) before config.yaml or metrics.jsonl is touched, so a refused
    resume leaves the folder exactly as it was."""
    import torch

    from engine import config
    from engine.atomic import atomic_write_text, remove_stale_temps
    from engine.outputs import RunLock, create_run_dir
    from engine.trainer import Interrupted, Trainer

    if cfg.system.deterministic != torch.are_deterministic_algorithms_enabled():
        # only when it changes something: the call imports torch._inductor (1-2 s a run)
        torch.use_deterministic_algorithms(cfg.system.deterministic, warn_only=True)
    if cfg.system.threads:
        torch.set_num_threads(cfg.system.threads)
    if resume_ckpt is not None:
        run_dir = resume_ckpt.parent.parent
        lock = RunLock(run_dir).acquire()
    else:
        o = cfg.output
        run_dir, lock = create_run_dir(o.root, cfg.recipe, o.name, o.dir, cfg.inputs.image,
                                       cfg.inputs.prompt)
    with lock:
        trainer = Trainer(cfg, resolved, run_dir, inputs, device)
        if resume_ckpt is not None:
            trainer.prepare_resume(resume_ckpt, saved)   # writes nothing; raises on a mismatch
            remove_stale_temps(run_dir)     # what a kill mid-write left; the lock is ours
        atomic_write_text(run_dir / "config.yaml", config.to_yaml(resolved))
        if inputs.image is not None and not (run_dir / INPUT_PICTURE).is_file():
            _save_input_picture(inputs.image, run_dir / INPUT_PICTURE)
            print(f"input as the engine sees it: {run_dir / INPUT_PICTURE}")
        try:
            trainer.run(resume=resume_ckpt)
        except Interrupted as exc:
            print(f"{exc}; checkpoint: {exc.checkpoint}\ncontinue with: python -m engine.run "
                  f"resume={run_dir}", file=sys.stderr)
            return exc.exit_code
        last = list(cfg.stages)[-1]
        print(f"final render: {run_dir / 'renders' / f'{last}-final.png'}")
        if cfg.export is not None:
            for kind, path in _export(cfg, trainer, run_dir, device).items():
                print(f"{kind}: {path}")
        if cfg.output.results_page:
            _results_page(run_dir)
    print(f"output: {run_dir}")
    return 0


def _export(cfg, trainer, run_dir: Path, device) -> dict:
    """The textured mesh and turntable of the final representation (engine/export.py)."""
    import torch

    from engine.errors import UserError
    from engine.export import export_representation, render_turntable
    from engine.progress import bar

    parts = trainer.last_parts
    parts.representation.eval()
    parts.background.eval()
    out = run_dir / "export"
    turntable = cfg.export.turntable.enabled
    try:
        with torch.no_grad(), bar(2 if turntable else 1, "export: mesh", unit="part") as b:
            paths = dict(export_representation(parts.representation, out, cfg.export, device))
            b.update(1)
            if turntable:
                b.set_description("export: turntable")
                paths.update(render_turntable(parts.representation, out, cfg.export,
                                              parts.background, device))
                b.update(1)
    except (RuntimeError, ImportError) as exc:
        raise UserError(f"export failed: {exc}. Training is saved; fix the export settings and "
                        f"run python -m engine.run resume={run_dir} to export again") from None
    return paths


def _results_page(run_dir: Path) -> None:
    """RUN/results.html (engine/results_page.py). The run's work is done and saved: a page
    that cannot be written is a warning, not a failed run."""
    from engine.results_page import write_results_page

    try:
        print(f"results page: {write_results_page(run_dir)}")
    except Exception as exc:      # noqa: BLE001 - never fail a finished run over its page
        print(f"warning: the results page was not written ({type(exc).__name__}: {exc}); "
              f"write it with python -m engine.results_page {run_dir}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
