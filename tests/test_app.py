"""The web app (python -m engine.app): launched in-process on a free port and driven through
gradio's own client, as a remote user's page would drive it. Each run is a real
``python -m engine.run`` subprocess on this CPU, made tiny with the overrides of
tests/conftest.py (fit-image-quick, a 16 px render of a 16^3 grid)."""

from __future__ import annotations

import json
import struct
import sys
import time
import zipfile
from pathlib import Path

import pytest

from engine.app_runs import (Job, Request, RunManager, newest_render, override_lines, progress,
                             yaml_text, zip_run)
from engine.errors import ConfigError, run_cli

ROOT = Path(__file__).resolve().parents[1]
MUG = ROOT / "examples" / "toy" / "red-mug.png"
#: fit-image-quick in a few seconds, export included (the sizes tests/test_run.py uses)
TINY = ["stages.fit.resolution=16", "stages.fit.representation.resolution=16",
        "stages.fit.representation.samples_per_ray=16", "inputs.image_size=32",
        "output.render_size=16", "output.render_views=2", "output.render_every=10",
        "stages.fit.representation.isosurface_threshold=3.0", "export.mesh_resolution=24",
        "export.texture_size=64", "export.turntable.frames=3", "export.turntable.size=32"]
# gradio's queue uses pandas options that pandas 3 deprecates: not this project's to fix
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword")]
NEED_GRADIO = "gradio is not installed (the app's optional extra: pip install -e '.[app]')"


def cli_line(argv, capsys) -> str:
    """The one line ``python -m engine.run ARGV`` prints for a mistake (run in-process)."""
    from engine.run import run

    capsys.readouterr()
    assert run_cli(run, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def wait_until_ended(client, run_id: str, timeout: float = 150.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.predict(run_id, api_name="/status")
        if status["state"] not in ("queued", "running", "stopping"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not end in {timeout} s: {status}")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app on a free port of 127.0.0.1 and a gradio_client.Client of it."""
    pytest.importorskip("gradio", reason=NEED_GRADIO)
    gradio_client = pytest.importorskip("gradio_client", reason=NEED_GRADIO)
    from engine.app import launch

    outputs = tmp_path_factory.mktemp("app-outputs")
    manager = RunManager(outputs, cwd=ROOT, work=tmp_path_factory.mktemp("app-work"))
    demo, url = launch(manager, port=0, block=False, quiet=True)
    client = gradio_client.Client(url, verbose=False, analytics_enabled=False,
                                  download_files=str(tmp_path_factory.mktemp("downloads")))
    try:
        yield client, manager
    finally:
        demo.close()
        manager.shutdown(timeout=30)


def start(client, picture, recipe="fit-image-quick", overrides=(), prompt=""):
    """/start -> (run id, message); the picture as a path (uploaded) or None."""
    from gradio_client import handle_file

    result = client.predict(handle_file(str(picture)) if picture else None, prompt, recipe,
                            "\n".join(overrides), "", api_name="/start")
    return result[0], result[-1]


# -- through the client -------------------------------------------------------------------

def test_a_run_end_to_end(app):
    client, manager = app
    run_id, message = start(client, MUG, overrides=TINY + ["stages.fit.steps=30"])
    assert message == f"run {run_id} started on cpu", message
    status = wait_until_ended(client, run_id)
    assert (status["state"], status["returncode"], status["error"]) == ("done", 0, ""), status
    run_dir = Path(status["run_dir"])
    assert run_dir.parent == manager.outputs / "fit-image-quick"
    assert run_dir.name.startswith("red-mug-")
    assert (run_dir / "config.yaml").is_file() and (run_dir / "input.png").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 30 and records[-1]["step"] == 29
    assert (status["stage"], status["step"], status["steps"]) == ("fit", 30, 30)
    assert "loss" in status["losses"] and status["render"].endswith("fit-final.png")
    # the same command line as the CLI; the picture kept beside the runs, so resume= works
    assert status["command"].startswith("python -m engine.run recipe=fit-image-quick image=")
    assert status["command"].endswith(f"out={run_dir}")
    import yaml

    kept = Path(yaml.safe_load((run_dir / "config.yaml").read_text())["inputs"]["image"])
    assert kept.is_file() and kept.parent.parent == manager.outputs / "uploads"
    assert kept.read_bytes() == MUG.read_bytes()
    # what the page shows: the GLB (downloaded by the client) is a valid glTF binary
    shown = client.predict(run_id, api_name="/refresh")
    text, render, glb, video, files = shown[:5]
    assert "**done**" in text and Path(render).name == "fit-final.png"
    data = Path(glb).read_bytes()
    magic, version, length = struct.unpack("<4sII", data[:12])
    assert (magic, version, length) == (b"glTF", 2, len(data))
    chunk_length, chunk_type = struct.unpack("<II", data[12:20])
    assert chunk_type == 0x4E4F534A                     # "JSON"
    gltf = json.loads(data[20:20 + chunk_length])
    assert gltf["asset"]["version"] == "2.0" and gltf["meshes"]
    assert Path(video).name == "turntable.mp4"
    names = sorted(Path(f).name for f in files)
    assert {"mesh.glb", "mesh.obj", "mesh.mtl", "mesh_albedo.png"} <= set(names)
    archive = next(Path(f) for f in files if f.endswith(".zip"))
    with zipfile.ZipFile(archive) as z:
        inside = set(z.namelist())
    assert f"{run_dir.name}/config.yaml" in inside and f"{run_dir.name}/export/mesh.glb" in inside
    assert not any(n.endswith("run.lock") for n in inside)


@pytest.mark.parametrize("content, words", [
    (b"these are notes, not a picture\n", "is not an image Pillow can read"),
    (MUG.read_bytes()[:600], "corrupt or truncated"),
], ids=["not-an-image", "truncated"])
def test_a_bad_upload_gets_the_cli_line(app, tmp_path, capsys, content, words):
    client, manager = app
    bad = tmp_path / "upload.png"
    bad.write_bytes(content)
    before = len(manager.jobs)
    run_id, message = start(client, bad)
    expected = cli_line(["recipe=fit-image-quick", f"image={bad}"], capsys)
    assert message == expected.replace(str(bad), bad.name), (message, expected)
    assert message.startswith("error: ") and "upload.png" in message and words in message
    assert "\n" not in message and "Traceback" not in message
    assert run_id == "" and len(manager.jobs) == before         # nothing was queued
    from gradio_client import handle_file

    preview, checked = client.predict(handle_file(str(bad)), "fit-image-quick", "", "",
                                      api_name="/check_picture")
    assert preview is None and checked == message


@pytest.mark.parametrize("items", [
    ["stages.fit.stpes=3"],                  # misspelt key: "did you mean 'steps'?"
    ["seed=three"],                          # wrong type
    ["stages.fti.steps=3"],                  # no such stage
    ["recipie=fit-image"],                   # a key of engine.run, misspelt
    ["stages.fit.steps=0"],                  # impossible value
], ids=["key", "type", "stage", "command-key", "value"])
def test_a_bad_override_gets_the_cli_line(app, capsys, items):
    client, manager = app
    before = len(manager.jobs)
    run_id, message = start(client, MUG, overrides=items)
    expected = cli_line(["recipe=fit-image-quick", f"image={MUG}", *items], capsys)
    assert message == expected and "Traceback" not in message
    assert run_id == "" and len(manager.jobs) == before


def test_keys_the_app_sets_are_refused(app):
    client, _ = app
    for line, words in (("out=/tmp/x", "out= is set by the app"),
                        ("resume=outputs/x", "resume= is set by the app"),
                        ("--dry-run", "key=value lines only")):
        run_id, message = start(client, MUG, overrides=[line])
        assert run_id == "" and message.startswith("error: ") and words in message
    run_id, message = start(client, None)
    assert message == ("error: recipe 'fit-image-quick' needs an input image: add "
                       "image=path/to/picture.png")


def test_queue_and_cancel_is_ctrl_c(app):
    """One run at a time on the CPU: a second waits (and is dropped by its Cancel); Cancel
    of the running one is Ctrl-C: a checkpoint, exit 130, and resume= finishes it."""
    from engine.run import main as engine_run

    client, manager = app
    first, message = start(client, MUG, overrides=TINY + ["stages.fit.steps=100000",
                                                          "export=null"])
    assert message == f"run {first} started on cpu"
    second, message = start(client, MUG, overrides=TINY + ["export=null"])
    assert message == f"run {second} queued: 1 run ahead on cpu"
    assert client.predict(second, api_name="/status")["state"] == "queued"
    deadline = time.time() + 60
    while client.predict(first, api_name="/status")["step"] < 3:
        assert time.time() < deadline, "the run did not start training"
        time.sleep(0.3)
    cancelled = client.predict(second, api_name="/cancel")
    assert cancelled == f"run {second} cancelled before it started"
    assert client.predict(first, api_name="/cancel").startswith(f"run {first}: stopping after")
    status = wait_until_ended(client, first, timeout=60)
    assert (status["state"], status["returncode"]) == ("cancelled", 130), status
    run_dir = Path(status["run_dir"])
    checkpoints = sorted((run_dir / "checkpoints").glob("*.safetensors"))
    assert checkpoints and not (run_dir / "run.lock").exists()
    gone = client.predict(second, api_name="/status")
    assert gone["state"] == "cancelled" and gone["run_dir"] == ""       # never started
    assert f"resume={run_dir}" in client.predict(first, api_name="/refresh")[0]
    again = client.predict(first, api_name="/cancel")
    assert again == f"run {first} has already ended (cancelled)"
    # the CLI continues it where Cancel stopped it
    step = int(checkpoints[-1].stem.rsplit("-", 1)[1])
    assert engine_run([f"resume={run_dir}", f"stages.fit.steps={step + 2}"]) == 0
    assert (run_dir / "renders" / "fit-final.png").is_file()


# -- without a server -----------------------------------------------------------------------

def test_the_command_line(capsys, monkeypatch):
    from engine.app import command, main, options_as_items

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "python -m engine.app" in capsys.readouterr().out
    cmd = command()
    items = options_as_items(["--host", "0.0.0.0", "--port=8000", "--share", "--outputs",
                              "runs"], cmd.keys)
    assert items == ["host=0.0.0.0", "port=8000", "share=true", "outputs=runs"]
    args = cmd.parse(items)
    assert (args.host, args.port, args.share, args.outputs) == ("0.0.0.0", 8000, True, "runs")
    assert options_as_items(["--share", "false"], cmd.keys) == ["share=false"]
    defaults = cmd.parse([])
    assert (defaults.host, defaults.port, defaults.share) == ("127.0.0.1", 7860, False)
    assert main(["--prot", "1"]) == 2
    assert "unknown option --prot (did you mean 'port'?)" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gradio", None)       # not installed: one line, exit 2
    assert main(["port=0"]) == 2
    assert capsys.readouterr().err.startswith("error: the web app needs gradio: pip install")


def test_override_lines_and_yaml_text():
    text = "# a comment\n\nstages.fit.steps=5\n  'seed=3'  \nexport=null\n"
    assert override_lines(text) == ["stages.fit.steps=5", "seed=3", "export=null"]
    for line in ("out=x", "output.dir=x", "resume=x", "recipe=x", "--estimate"):
        with pytest.raises(ConfigError):
            override_lines(line)
    assert yaml_text("a red chair") == "a red chair"
    assert yaml_text("a cat: sitting") == '"a cat: sitting"'
    assert yaml_text("/runs/my #1.png") == '"/runs/my #1.png"'
    from engine.config import parse_overrides

    for value in ("a cat: sitting", "[1, 2]", "007", "yes", "/runs/my #1.png"):
        assert parse_overrides([f"prompt={yaml_text(value)}"]) == [("inputs.prompt", value)]


def test_progress_from_a_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "renders").mkdir(parents=True)
    job = Job("1", Request("r", [], "cpu", {"a": 10, "b": 20}), state="running",
              run_dir=run_dir)
    assert progress(job)["phase"] == "starting" and progress(job)["stage"] is None
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(10):
            f.write(json.dumps({"stage": "a", "stage_index": 0, "step": step,
                                "time": 0.5 * (step + 1), "loss": 1.0}) + "\n")
        for step in range(4):
            f.write(json.dumps({"stage": "b", "stage_index": 1, "step": step,
                                "time": 2.0 * (step + 1), "loss": 0.5, "loss/sds": 0.25,
                                "loss/rgb": None}) + "\n")
        f.write('{"stage": "b", "st')              # a line being written
    p = progress(job)
    assert (p["stage"], p["stage_index"], p["step"], p["steps"]) == ("b", 1, 4, 20)
    assert p["eta_s"] == pytest.approx(16 * 2.0) and p["phase"] == "training"
    assert p["losses"] == {"loss": 0.5, "loss/sds": 0.25}
    (run_dir / "renders" / "b-000100.png").write_bytes(b"x")
    time.sleep(0.01)
    (run_dir / "renders" / ".b-final.123.tmp.png").write_bytes(b"x")   # being written
    assert newest_render(run_dir).name == "b-000100.png"
    (run_dir / "run.lock").write_text("1\n")
    with zipfile.ZipFile(zip_run(run_dir, tmp_path / "zips")) as z:
        assert sorted(z.namelist()) == ["run/metrics.jsonl", "run/renders/b-000100.png"]


def test_a_run_that_fails_shows_its_last_error_line(tmp_path):
    """The subprocess's exit code and last stderr line become the run's state and message
    (a fake engine: a script that prints like run_cli and exits 2)."""
    fake = tmp_path / "fake_python.sh"
    fake.write_text("#!/bin/sh\nprintf 'step 1\\rstep 2\\n'\n"
                    "echo 'error: something the user can fix' >&2\nexit 2\n")
    fake.chmod(0o755)
    manager = RunManager(tmp_path / "out", python=str(fake), work=tmp_path / "work")
    job = manager.submit(Request("fit-image-quick", ["recipe=fit-image-quick"], "cpu",
                                 {"fit": 1}))
    queued = manager.submit(Request("fit-image-quick", ["recipe=fit-image-quick"], "cpu",
                                    {"fit": 1}))
    deadline = time.time() + 20
    while queued.state != "failed" and time.time() < deadline:
        time.sleep(0.05)
    assert (job.state, job.returncode, job.error) == ("failed", 2,
                                                      "error: something the user can fix")
    assert queued.state == "failed" and queued.started >= job.ended   # one at a time
    assert job.log_lines() == ["step 2", "error: something the user can fix"]
    assert job.run_dir.parent == (tmp_path / "out" / "fit-image-quick").resolve()
