"""engine/cli.py: the one key=value parser of every command, and its one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import Args, Command, Key, coerce, yaml_value
from engine.errors import ConfigError, run_cli

ROOT = Path(__file__).resolve().parents[1]

USAGE = "usage: python -m demo out=DIR [count=3] ..."


def demo(**kwargs) -> Command:
    keys = [
        Key("out", str, required=True, help="folder to write"),
        Key("count", int, 3, help="objects"),
        Key("scale", float, 2.0),
        Key("fast", bool, False),
        Key("sizes", list, [32]),
        Key("anything", None, "x"),
        Key("mode", str, "image", choices=("image", "caption")),
        Key("variants", list, ["a"], choices=("a", "b", "c")),
        Key("recipe", str, repeat=True),
    ]
    return Command("python -m demo", USAGE, keys, **kwargs)


def error(cmd: Command, argv) -> str:
    with pytest.raises(ConfigError) as info:
        cmd.parse(argv)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- values ---------------------------------------------------------------------------------

def test_typed_values_and_defaults():
    args = demo().parse(["out=o", "count=7", "scale=1", "fast=true", "sizes=[16, 64]",
                         "anything={a: 1}"])
    assert isinstance(args, Args)
    assert (args.out, args.count, args.scale, args.fast) == ("o", 7, 1.0, True)
    assert isinstance(args.scale, float) and isinstance(args.count, int)
    assert args.sizes == [16, 64] and args.anything == {"a": 1}
    assert args["count"] == 7 and args.as_dict()["out"] == "o"
    defaults = demo().parse(["out=o"])
    assert (defaults.count, defaults.scale, defaults.fast, defaults.sizes) == (3, 2.0, False, [32])
    assert defaults.anything == "x" and defaults.mode == "image" and defaults.recipe == []
    with pytest.raises(AttributeError):
        defaults.nosuch


def test_scientific_floats_and_strings_as_typed():
    args = demo().parse(["out=007", "scale=1e-3", "anything=2e5", "mode=caption"])
    assert args.scale == pytest.approx(1e-3) and args.anything == pytest.approx(2e5)
    assert args.out == "007"          # a str key keeps the text, not YAML's 7
    assert demo().parse(["out=yes: no"]).out == "yes: no"
    assert demo().parse(["out=a=b"]).out == "a=b"   # only the first = splits


def test_empty_value_is_none():
    cmd = Command("p", "", [Key("limit", int), Key("anything", None, "x"), Key("name", str)])
    args = cmd.parse(["limit=", "anything=", "name=null"])
    assert args.limit is None and args.anything is None and args.name is None
    # a key with a value by default needs one
    assert error(demo(), ["out=o", "count="]).startswith("count= needs a value (default 3")
    assert "mode= needs a value" in error(demo(), ["out=o", "mode="])
    assert yaml_value("") is None and yaml_value("[1, 2") == "[1, 2"


@pytest.mark.parametrize("item, words", [
    ("count=3.5", "count: expected an integer, got '3.5'"),
    ("count=many", "count: expected an integer, got 'many'"),
    ("count=true", "count: expected an integer, got 'true'"),
    ("scale=big", "scale: expected a number, got 'big'"),
    ("fast=maybe", "fast: expected true or false, got 'maybe'"),
    ("fast=1", "fast: expected true or false, got '1'"),
    ("sizes=32", "sizes: expected a list such as [1, 2], got '32'"),
])
def test_wrong_type_names_key_and_value(item, words):
    assert words in error(demo(), ["out=o", item])


def test_coerce_directly():
    assert coerce("n", 3, int) == 3 and coerce("n", "4", int) == 4
    assert coerce("x", 2, float) == 2.0 and coerce("x", "0.5", float) == 0.5
    assert coerce("b", "false", bool) is False and coerce("v", None, int) is None
    assert coerce("s", 5, str) == "5" and coerce("any", [1], None) == [1]
    assert coerce("p", "a/b", Path) == Path("a/b")
    with pytest.raises(ConfigError, match="n: expected an integer"):
        coerce("n", 1.5, int)


def test_choices():
    assert demo().parse(["out=o", "mode=caption"]).mode == "caption"
    message = error(demo(), ["out=o", "mode=captoin"])
    assert "mode: 'captoin' is not one of image, caption" in message
    assert "did you mean 'caption'?" in message
    assert demo().parse(["out=o", "variants=[a, c]"]).variants == ["a", "c"]
    assert "variants: 'd' is not one of a, b, c" in error(demo(), ["out=o", "variants=[a, d]"])


# -- keys -----------------------------------------------------------------------------------

def test_unknown_key_did_you_mean():
    message = error(demo(), ["out=o", "cuont=3"])
    assert message.startswith("unknown key 'cuont' (did you mean 'count'?)")
    assert "python -m demo knows: out, count" in message


def test_required_key():
    message = error(demo(), ["count=3"])
    assert message.startswith("out= is required: folder to write")
    assert "out= is required" in error(demo(), ["out="])   # an empty value is not a value


def test_key_given_twice_is_refused():
    message = error(demo(), ["out=o", "count=1", "count=2"])
    assert message.startswith("count is given twice") and "count=1" in message


def test_repeatable_key():
    args = demo().parse(["recipe=a", "out=o", "recipe=b"])
    assert args.recipe == ["a", "b"]
    assert "recipe= needs a value" in error(demo(), ["out=o", "recipe="])
    cmd = Command("p", "", [Key("recipe", str, repeat=True, required=True, help="a recipe")])
    assert "recipe= is required: a recipe" in error(cmd, [])


def test_not_key_value():
    assert error(demo(), ["out=o", "oops"]).startswith("'oops' is not key=value")
    assert "is not key=value" in error(demo(), ["out=o", "=3"])


def test_key_names_must_not_clash():
    with pytest.raises(ValueError):
        Command("p", "", [Key("rest", int)])
    with pytest.raises(ValueError):
        Command("p", "", [Key("a", int), Key("a", str)])


# -- positionals, passthrough, flags --------------------------------------------------------

def test_positionals():
    cmd = Command("python -m evaluate", "", [Key("threshold", float, 0.05)],
                  positional=("pred", "ref"))
    args = cmd.parse(["a.obj", "threshold=0.1", "out/b=c.obj"])
    assert (args.pred, args.ref, args.threshold) == ("a.obj", "out/b=c.obj", 0.1)
    assert error(cmd, ["a.obj"]).startswith("missing REF")
    assert "missing PRED REF" in error(cmd, ["threshold=1"])
    assert "takes 2 items without a key" in error(cmd, ["a", "b", "c"])
    assert cmd.parse(["-1", "b"]).pred == "-1"      # a negative number is not an option


def test_passthrough_rest():
    cmd = Command("python -m run", "", [Key("recipe", str)], flags=["--dry-run"],
                  passthrough=True)
    args = cmd.parse(["stages.fit.steps=5", "recipe=fit", "--dry-run", "image=a.png",
                      "x.y=[1, 2]"])
    assert args.recipe == "fit" and args.flags == {"--dry-run"}
    assert args.rest == ["stages.fit.steps=5", "image=a.png", "x.y=[1, 2]"]
    assert error(cmd, ["oops"]).startswith("'oops' is not key=value")
    assert "recipe is given twice" in error(cmd, ["recipe=a", "recipe=b"])


def test_misspelt_passthrough_hint():
    cmd = Command("python -m run", "", [Key("recipe", str), Key("resume", str)],
                  passthrough=True)
    args = cmd.parse(["recipie=a", "stages.fit.steps=5"])
    assert args.rest == ["recipie=a", "stages.fit.steps=5"]
    assert cmd.misspelt(args.rest) == ("; 'recipie' is not a key of python -m run "
                                       "(did you mean 'recipe'?)")
    assert cmd.misspelt(["stages.recipie=1", "export=null"]) == ""


def test_flags():
    cmd = Command("python -m run", "", [Key("seed", int, 0)], flags=["--list", "--dry-run"])
    assert cmd.parse(["--list", "seed=2"]).flags == {"--list"}
    assert cmd.parse([]).flags == set()
    message = error(cmd, ["--lsit"])
    assert message.startswith("unknown option --lsit (did you mean '--list'?)")
    assert "key=value" in message and "--dry-run, --list" in message
    assert error(cmd, ["--seed", "3"]) == ("unknown option --seed: python -m run takes "
                                           "key=value items; write seed=VALUE (see --help)")
    assert error(cmd, ["-v"]).startswith("unknown option -v")
    assert error(cmd, ["--seed=3"]).startswith("unknown option --seed")
    assert error(cmd, ["--list=yes"]).startswith("--list takes no value")
    # the old argparse spellings point at the key=value ones
    message = error(demo(), ["--object-count"])
    assert message.startswith("unknown option --object-count;") and "did you" not in message
    assert "write fast=true" in error(demo(), ["--fast"])
    assert "write fast=false" in error(demo(), ["--no-fast"])
    assert "write out=VALUE" in error(demo(), ["--out", "o"])


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_exits_0(flag, capsys):
    cmd = demo()
    with pytest.raises(SystemExit) as info:
        cmd.parse(["cuont=3", flag])          # help wins over mistakes anywhere in argv
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == USAGE
    assert Command.wants_help(["a=1", flag]) and not Command.wants_help(["a=1"])


def test_errors_through_run_cli_are_one_line_exit_2(capsys):
    def run(argv):
        demo().parse(argv)
        return 0

    assert run_cli(run, ["out=o", "count=x"]) == 2
    err = capsys.readouterr().err
    assert err == "error: count: expected an integer, got 'x'\n"
    assert run_cli(run, ["out=o"]) == 0


def test_a_command_line_end_to_end():
    """A real command: one stderr line and exit code 2 for a misspelt key, usage for --help."""
    proc = subprocess.run([sys.executable, "-m", "engine.datasets.toy_world", "out=x", "cuont=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "did you mean 'count'?" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "engine.datasets.toy_world", "--help"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "out=DIR" in proc.stdout
