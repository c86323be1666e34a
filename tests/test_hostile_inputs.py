"""Hostile and absurd inputs (issue 24, items 3 and 6): recipe files that are not UTF-8, huge,
alias bombs or read the environment; sizes that would allocate gigabytes to petabytes;
overrides refused on resume; the conversion command's output mistakes. Each is one line and
exit code 2, before anything expensive runs or anything is written."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import tiny_fit_args
from test_faults import folder_bytes, one_error_line
from engine.run import main

ROOT = Path(__file__).resolve().parent.parent


# -- recipe files ------------------------------------------------------------------------

def write(path: Path, data) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def alias_bomb(levels: int = 9) -> str:
    lines = ["extends: fit-image-quick", "l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name, text, words", [
    ("latin1.yaml", b"extends: fit-image-quick\ndescription: \xe9t\xe9\n", "not UTF-8"),
    ("bomb.yaml", alias_bomb(), "aliases expand to"),
    ("huge.yaml", "# padding\n" * 120_000, "larger than 1 MiB"),
    ("env.yaml", "extends: fit-image-quick\ndescription: ${oc.env:HOME}\n",
     "reads the environment"),
    ("decode.yaml", "extends: fit-image-quick\ndescription: ${oc.decode:'1'}\n",
     "calls a resolver"),
])
def test_hostile_recipe_files_are_one_line(tmp_path, capsys, name, text, words):
    recipe = write(tmp_path / name, text)
    started = time.monotonic()
    assert main([f"recipe={recipe}", "image=examples/red-block.png", "--dry-run"]) == 2
    assert words in one_error_line(capsys.readouterr().err)
    assert time.monotonic() - started < 10


def test_an_include_that_is_not_utf8_or_reads_the_environment_is_one_line(tmp_path, capsys):
    write(tmp_path / "frag.yaml", b"description: caf\xe9\n")
    recipe = write(tmp_path / "r.yaml", "extends: fit-image-quick\ninclude: [frag.yaml]\n")
    assert main([f"recipe={recipe}", "image=examples/red-block.png", "--dry-run"]) == 2
    assert "frag.yaml" in one_error_line(capsys.readouterr().err)
    write(tmp_path / "frag.yaml", "output: {name: '${oc.env:USER}'}\n")
    assert main([f"recipe={recipe}", "image=examples/red-block.png", "--dry-run"]) == 2
    assert "output.name" in one_error_line(capsys.readouterr().err)


def test_environment_interpolations_in_overrides_are_refused_and_never_stored(
        rgba_image, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILL_SECRET", "s3cr3t-value")
    run = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, run, steps=2,
                              extra=["output.name=${oc.env:DISTILL_SECRET}"])) == 2
    assert "output.name" in one_error_line(capsys.readouterr().err)
    assert not run.exists()
    # plain ${key} references still work (recipes/fit-views.yaml uses them)
    assert main(tiny_fit_args(rgba_image, run, steps=2,
                              extra=["description=${recipe}"])) == 0
    assert "s3cr3t" not in (run / "config.yaml").read_text()


def test_an_alias_bomb_in_an_override_is_refused(tmp_path, capsys):
    # each level refers to the one before ten times: 10^8 values from 300 bytes
    value = "[" + ", ".join(["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
                            + [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 8)]
                            ) + "]"
    assert main(["recipe=fit-image-quick", "image=examples/red-block.png",
                 f"description={value}", "--dry-run"]) == 2
    assert "aliases expand to" in one_error_line(capsys.readouterr().err)


def test_shipped_recipes_with_aliases_still_load(capsys):
    assert main(["recipe=isotropic3d-toy", "image=examples/red-block.png", "--dry-run"]) == 0


# -- bounds ------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key, limit", [
    ("inputs.image_size=100000", "inputs.image_size", 4096),
    ("stages.fit.resolution=100000", "stages.fit.resolution", 2048),
    ("stages.fit.resolution=[0, 64, 50000, 10]", "stages.fit.resolution", 2048),
    ("stages.fit.representation.resolution=100000", "stages.fit.representation.resolution",
     1024),
    ("stages.fit.representation.samples_per_ray=10000000",
     "stages.fit.representation.samples_per_ray", 4096),
    ("output.render_size=100000", "output.render_size", 2048),
    ("output.render_views=100000", "output.render_views", 64),
    ("system.threads=100000000", "system.threads", 1024),
    ("export.mesh_resolution=100000", "export.mesh_resolution", 1024),
    ("export.turntable.size=100000", "export.turntable.size", 4096),
    ("export.turntable.frames=10000000", "export.turntable.frames", 3600),
])
def test_sizes_that_allocate_are_bounded_at_load_time(rgba_image, tmp_path, capsys, override,
                                                      key, limit):
    run = tmp_path / "run"
    args = [a for a in tiny_fit_args(rgba_image, run, steps=2) if a != "export=null"]
    assert main(args + [override]) == 2
    line = one_error_line(capsys.readouterr().err)
    shown = "50000" if "[" in override else override.split("=")[1]
    assert f"{key}={shown}" in line and f"limit {limit}" in line
    assert not run.exists()


def test_bounds_that_depend_on_memory_say_how_much(rgba_image, tmp_path, capsys, monkeypatch):
    from engine import bounds

    monkeypatch.setattr(bounds, "machine_memory",
                        lambda device: (2.0 * 2**30, "this machine has 2 GiB"))
    run = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, run, extra=[
        "stages.fit.representation.resolution=600"])) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "stages.fit.representation.resolution=600" in line and "needs ~" in line \
        and "this machine has 2 GiB" in line
    assert main(tiny_fit_args(rgba_image, run, extra=[
        "stages.fit.representation.samples_per_ray=2000", "stages.fit.resolution=1024"])) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "samples_per_ray=2000" in line and "needs ~" in line and not run.exists()


def errors_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("### Crashes, resume and errors"):text.index("## Input images")]


def test_readme_states_the_bounds_and_exit_codes_the_code_has():
    import re

    from engine import bounds
    from engine.errors import RunAborted, UserError
    from engine.trainer import Interrupted

    section = errors_section()
    stated = re.findall(r"`([\w.*]+)` (\d+)", section)
    assert len(stated) >= 12
    limits = {pattern: limit for pattern, limit, _ in bounds.LIMITS}
    for key, value in stated:
        assert limits.get(key) == int(value), (key, value)
    codes = re.findall(r"^\| (\d+) \|", section, flags=re.M)
    assert codes == ["0", "2", "3", "130", "1"]
    assert (UserError.exit_code, RunAborted.exit_code, Interrupted.exit_code) == (2, 3, 130)


def test_a_resume_with_a_refused_override_leaves_the_folder_resumable(rgba_image, tmp_path,
                                                                      capsys):
    run = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, run, steps=4)) == 0
    before = folder_bytes(run)
    for bad in ("inputs.image_size=100000", "description=${oc.env:HOME}",
                "stages.fit.representation.samples_per_ray=.nan"):
        assert main([f"resume={run}", bad]) == 2
        one_error_line(capsys.readouterr().err)
        assert folder_bytes(run) == before
    assert main([f"resume={run}"]) == 0


def test_convert_output_mistakes_are_one_line(tmp_path, capsys):
    from guidance.multiview import convert

    afile = write(tmp_path / "afile", "x")
    for out, words in ((afile, "is not a folder"), (afile / "sub", "is not a folder")):
        assert convert.main([str(tmp_path / "missing.ckpt"), str(out)]) == 2
        assert words in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command, argv, key", [
    ("engine.evaluate", ["a.obj", "b.obj", "samples=10000000000"], "samples"),
    ("guidance.multiview.sample", ["out=x.png", "steps=100000000"], "steps"),
    ("guidance.multiview.sample", ["out=x.png", "image_size=1000000"], "image_size"),
    ("engine.datasets.toy_world", ["out=x", "size=1000000"], "size"),
])
def test_other_commands_bound_their_sizes(capsys, command, argv, key):
    import importlib

    module = importlib.import_module(command if command != "engine.evaluate"
                                     else "engine.evaluate.command")
    assert module.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{key}=" in line and "above the limit" in line


def test_out_of_memory_is_one_line_and_a_bug_stays_a_traceback(capsys):
    from engine.errors import run_cli

    def oom(argv):
        raise MemoryError()

    assert run_cli(oom, []) == 2
    assert "out of memory" in one_error_line(capsys.readouterr().err)

    def bug(argv):
        raise ValueError("a bug")

    with pytest.raises(ValueError):     # exit code 1 with its traceback: README's table
        run_cli(bug, [])
