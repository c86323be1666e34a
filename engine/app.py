"""``python -m engine.app``: the engine in a web page (gradio).

    python -m engine.app [host=127.0.0.1] [port=7860] [share=false] [outputs=outputs]
    python -m engine.app --host 0.0.0.0 --port 7860 --outputs runs      # the same, as options

Upload a picture (or type a prompt), pick a recipe, add ``key=value`` overrides, Start. Each
run is ``python -m engine.run`` in a subprocess, in a run folder under the outputs
(engine/app_runs.py): the page shows its stage, step, ETA, losses and newest render, then
the mesh in a 3D viewer, the turntable and the downloads. Needs gradio
(``pip install "distill-engine[app]"``); the runs need nothing more than the CLI does.
"""

from __future__ import annotations

import importlib
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from engine.app_runs import (ENDED, RunManager, check_request, describe, format_exception,
                             one_line, queue_table, summary)
from engine.errors import ConfigError, UserError, did_you_mean

USAGE = """\
usage: python -m engine.app [host=127.0.0.1] [port=7860] [share=false] [outputs=outputs]
       python -m engine.app --host H --port P --share false --outputs DIR   (the same)

The engine in a web page: upload a picture (or type a prompt for a text recipe), pick a
recipe, add key=value overrides (one a line, as on the command line), Start. Each run is
python -m engine.run in a subprocess, in a new folder under the outputs (resume it from the
command line with resume=FOLDER); one run at a time per device, the others wait in a queue.
Cancel is Ctrl-C for that run: a checkpoint is written and it exits with 130.

keys:  host=H       address to listen on (default 127.0.0.1: this machine only; 0.0.0.0:
                    every interface, for other machines on the network)
       port=P       port (default 7860; 0: any free port)
       share=BOOL   also a temporary public gradio.live link (default false; needs network)
       outputs=DIR  folder of the runs and the uploaded pictures (default outputs)
       --help       this text

Needs gradio: pip install "distill-engine[app]". Docs: docs/web-app.md.
"""

DEFAULT_RECIPE = "isotropic3d-toy"
PLACEHOLDER = "stages.nerf.steps=200\nseed=3\nexport.turntable.frames=24"


def command():
    from engine.cli import Command, Key

    return Command("python -m engine.app", USAGE, [
        Key("host", str, "127.0.0.1", help="address to listen on"),
        Key("port", int, 7860, help="port (0: any free one)", maximum=65535),
        Key("share", bool, False, help="a public gradio.live link too"),
        Key("outputs", str, "outputs", help="folder of the runs"),
    ])


def options_as_items(argv: List[str], names) -> List[str]:
    """``--host H``, ``--host=H`` and ``--share`` (alone) as ``host=H`` / ``share=true``, so
    both spellings work; everything else is left for the one parser of every command."""
    out, i = [], 0
    while i < len(argv):
        item = argv[i]
        name = item[2:].split("=", 1)[0].replace("-", "_") if item.startswith("--") else ""
        if name in names:
            if "=" in item:
                out.append(f"{name}={item.split('=', 1)[1]}")
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and \
                    (name != "share" or argv[i + 1].lower() in ("true", "false")):
                out.append(f"{name}={argv[i + 1]}")
                i += 1
            elif name == "share":
                out.append("share=true")
            else:
                raise ConfigError(f"--{name} needs a value: --{name} VALUE or {name}=VALUE")
        elif item.startswith("--") and item not in ("--help",):
            flag = item.split("=", 1)[0]
            raise ConfigError(f"unknown option {flag}{did_you_mean(name, names)}; python -m "
                              "engine.app takes --host, --port, --share and --outputs (or "
                              "host=, port=, share=, outputs=; see --help)")
        else:
            out.append(item)
        i += 1
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- the page ---------------------------------------------------------------------------

def recipe_list() -> List[Tuple[str, str]]:
    """(name, description) of every recipe, as ``python -m engine.run --list`` shows them."""
    from engine import config

    found = []
    for name, (_, where) in sorted(config.available_recipes().items()):
        try:
            data = config.read_yaml(where) if isinstance(where, Path) else \
                config.load_recipe(name)[1]
            desc = str(data.get("description", "") or "")
        except Exception as exc:   # one broken recipe must not take the page down
            desc = f"(unreadable: {' '.join(str(exc).split())[:80]})"
        found.append((name, desc))
    return found


def recipe_info(name: str, descriptions: Dict[str, str]) -> str:
    """What a recipe needs and does: its description, inputs and stages with their steps."""
    from engine import config

    if not name:
        return ""
    try:
        cfg, _ = config.load(name, [])
    except UserError as exc:
        return f"`{one_line(exc)}`"
    needs = " and ".join(cfg.inputs.requires) or "nothing"
    stages = ", ".join(f"{s} ({st.steps} steps)" for s, st in cfg.stages.items())
    return (f"{descriptions.get(name, '')}  \nneeds: {needs} · stages: {stages} · "
            f"device: {cfg.system.device}")


def _preview(request, folder: Path) -> Optional[str]:
    """The picture as the engine sees it, saved as the run's input.png would be."""
    from engine.run import INPUT_PICTURE, _save_input_picture

    if request.reference is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex[:12]}-{INPUT_PICTURE}"
    _save_input_picture(request.reference, path)
    return str(path)


def build_app(manager: RunManager, title: str = "distill-engine"):
    """The gradio Blocks of the page; its API (gradio_client): ``/start`` (picture, prompt,
    recipe, overrides, run) -> run, message; ``/cancel`` (run) -> message; ``/status``
    (run) -> a dict (engine.app_runs.describe); ``/refresh``: what the page shows;
    ``/check_picture``: the picture as the engine sees it, or the error."""
    import gradio as gr

    recipes = recipe_list()
    descriptions = dict(recipes)
    default = DEFAULT_RECIPE if DEFAULT_RECIPE in descriptions else (recipes or [("", "")])[0][0]
    previews = manager.work / "previews"

    def check_picture(picture, recipe, prompt, overrides):
        if not picture:
            return None, ""
        try:
            req = check_request(recipe, picture, prompt, overrides, Path(picture).name)
        except UserError as exc:
            return None, one_line(exc)
        except Exception as exc:   # a bug: one line here, the traceback in the terminal
            return None, format_exception(exc)
        return _preview(req, previews), req.note

    def start(picture, prompt, recipe, overrides, shown_id):
        keep = (shown_id, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
        try:
            req = check_request(recipe, picture or None, (prompt or "").strip() or None,
                                overrides, Path(picture).name if picture else None)
            preview = _preview(req, previews)
            req.reference = None
            job = manager.submit(req)
        except UserError as exc:
            return (*keep, one_line(exc))
        except Exception as exc:
            return (*keep, format_exception(exc))
        ahead = manager.ahead(job)
        message = (f"run {job.id} started on {req.device}" if job.state != "queued" else
                   f"run {job.id} queued: {ahead} run{'s' * (ahead != 1)} ahead on "
                   f"{req.device}")
        return job.id, {}, None, None, None, preview or gr.skip(), message

    def cancel(run_id):
        return manager.cancel(run_id)

    def refresh(run_id, shown):
        """What the page shows of a run; components that have not changed are skipped."""
        shown = dict(shown or {})
        table = queue_table(manager)
        job = manager.get(run_id)
        if job is None:
            text = f"no run {run_id} in this app" if run_id else "no run yet: Start one"
            return text, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), table, shown
        d = describe(job)
        out: List[Any] = [summary(job, manager)]
        fresh = shown.get("run") != job.id
        render = f"{job.id}:{d['render']}"
        if d["render"]:
            try:
                render += f":{Path(d['render']).stat().st_mtime_ns}"
            except OSError:
                pass
        out.append(d["render"] if render != shown.get("render") or fresh else gr.skip())
        result = f"{job.id}:{job.state}:{d['zip']}"
        if job.state in ENDED and (result != shown.get("result") or fresh):
            out += [d["glb"], d["video"], d["files"] + ([d["zip"]] if d["zip"] else [])]
        elif fresh or (shown.get("result") and job.state not in ENDED):
            out += [None, None, None]
            result = ""
        else:
            out += [gr.skip()] * 3
            result = shown.get("result", "")
        text = "\n".join(d["log"])
        out.append(text if text != shown.get("log") else gr.skip())
        out.append(table)
        shown.update(run=job.id, render=render, result=result, log=text)
        out.append(shown)
        return tuple(out)

    def status(run_id: str) -> dict:
        """A run as plain data (engine.app_runs.describe), for gradio_client."""
        job = manager.get(run_id)
        return describe(job) if job else {"id": run_id, "state": "unknown",
                                          "error": f"no run {run_id} in this app"}

    # gradio copies each file it serves into its cache: files older than a day go, hourly
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## {title}: a picture (or a prompt) to a textured 3D mesh\n"
                    "Each run is `python -m engine.run` in a folder under "
                    f"`{manager.outputs}`; one run at a time per device.")
        with gr.Row():
            with gr.Column(scale=1):
                picture = gr.File(label="Picture (PNG, JPEG or WebP)", type="filepath",
                                  elem_id="picture")
                preview = gr.Image(label="as the engine sees it", type="filepath",
                                   interactive=False, height=160, elem_id="preview")
                prompt = gr.Textbox(label="Prompt (text recipes, e.g. mvdream)",
                                    elem_id="prompt")
                recipe = gr.Dropdown(choices=[(f"{n}: {d}" if d else n, n) for n, d in recipes],
                                     value=default or None, label="Recipe", elem_id="recipe")
                info = gr.Markdown(recipe_info(default, descriptions), elem_id="recipe-info")
                overrides = gr.Textbox(label="Overrides: key=value, one a line (as on the "
                                       "command line)", lines=4, placeholder=PLACEHOLDER,
                                       elem_id="overrides")
                with gr.Row():
                    start_button = gr.Button("Start", variant="primary", elem_id="start")
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
                message = gr.Textbox(label="Message", interactive=False, elem_id="message")
                run_id = gr.Textbox(label="Run shown (its number; see the queue)",
                                    elem_id="run-id")
            with gr.Column(scale=2):
                state = gr.Markdown("no run yet: Start one", elem_id="status")
                with gr.Row():
                    render = gr.Image(label="newest render", type="filepath",
                                      interactive=False, elem_id="render")
                    video = gr.Video(label="turntable", interactive=False, autoplay=True,
                                     loop=True, elem_id="video")
                model = gr.Model3D(label="mesh (GLB)", height=420, elem_id="model")
                files = gr.File(label="downloads: the mesh files and the whole run folder",
                                file_count="multiple", interactive=False, elem_id="downloads")
                with gr.Accordion("log (the run's output)", open=False):
                    log = gr.Textbox(lines=14, max_lines=14, show_label=False,
                                     interactive=False, elem_id="log")
        with gr.Accordion("queue: every run of this app", open=True):
            table = gr.Markdown("no runs yet", elem_id="queue")
        shown = gr.State({})
        timer = gr.Timer(2.0)       # the page polls: little CPU taken from the training

        checked = [picture, recipe, prompt, overrides]
        picture.change(check_picture, checked, [preview, message], api_name="check_picture")
        recipe.change(lambda name: recipe_info(name, descriptions), recipe, info,
                      api_name=False, show_progress="hidden")
        start_button.click(start, [picture, prompt, recipe, overrides, run_id],
                           [run_id, shown, model, video, files, preview, message],
                           api_name="start", concurrency_limit=4)
        cancel_button.click(cancel, run_id, message, api_name="cancel", concurrency_limit=None)
        timer.tick(refresh, [run_id, shown], [state, render, model, video, files, log, table,
                                              shown],
                   api_name="refresh", show_progress="hidden", concurrency_limit=None)
        gr.api(status, api_name="status", concurrency_limit=None)
    return demo


def launch(manager: RunManager, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, block: bool = True, quiet: bool = False):
    """Build and start the page; returns (demo, local URL). ``block``: serve until Ctrl-C,
    then stop the runs as Ctrl-C stops them (each prints how to resume)."""
    demo = build_app(manager)
    try:
        _, url, share_url = demo.launch(server_name=host, server_port=port or free_port(host),
                                        share=share, prevent_thread_lock=True, quiet=True,
                                        allowed_paths=[str(manager.outputs),
                                                       str(manager.work)])
    except OSError as exc:
        raise UserError(f"cannot serve on {host}:{port}: {' '.join(str(exc).split())}; give "
                        "another port= (0: any free one)") from None
    if not quiet:
        print(f"distill-engine web app: {url}" + (f"  (public: {share_url})" if share_url
                                                  else ""), flush=True)
        print(f"runs go to {manager.outputs}; Ctrl-C stops the app (and its runs, with a "
              "checkpoint each)", flush=True)
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
            manager.shutdown()
    return demo, url


def run(argv: List[str]) -> int:
    cmd = command()
    args = cmd.parse(options_as_items(argv, cmd.keys))   # --help: the usage, exit 0
    try:
        importlib.import_module("gradio")
    except ImportError:
        raise UserError("the web app needs gradio: pip install \"distill-engine[app]\" "
                        "(or pip install gradio)") from None
    manager = RunManager(Path(args.outputs), cwd=Path.cwd())

    def stop(signum, frame):   # a service manager's SIGTERM: as Ctrl-C (the runs checkpoint)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    launch(manager, args.host, args.port, args.share)
    return 130          # served until Ctrl-C (or SIGTERM), as every command counts it


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
