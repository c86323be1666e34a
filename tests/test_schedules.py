import pytest

from engine.errors import ConfigError
from engine.schedules import Schedule


def test_constant():
    s = Schedule.parse(0.25)
    assert s(0) == 0.25 and s(10**6) == 0.25


def test_threestudio_linear_form():
    s = Schedule.parse([100, 0.0, 1.0, 300])
    assert s(0) == 0.0 and s(100) == 0.0
    assert s(200) == pytest.approx(0.5)
    assert s(300) == 1.0 and s(1000) == 1.0


def test_piecewise_linear_points():
    s = Schedule.parse([[0, 10.0], [5000, 1000.0], [6000, 0.0]])
    assert s(2500) == pytest.approx(505.0)
    assert s(5500) == pytest.approx(500.0)
    assert s(7000) == 0.0


def test_step_mode_holds_values():
    s = Schedule.parse({"points": [[0, 64], [5000, 256]], "mode": "step"})
    assert s(0) == 64 and s(4999) == 64 and s(5000) == 256 and s(9999) == 256


@pytest.mark.parametrize("bad, words", [
    ("fast", "expected a number"),
    ([[0, 1], [5, "x"]], "[step, value]"),
    ([[10, 1], [5, 2]], "must not decrease"),
    ({"points": [[0, 1]], "mode": "cubic"}, "mode"),
    ([300, 0.0, 1.0, 100], "end_step >= start_step"),
])
def test_bad_schedules_name_the_key(bad, words):
    with pytest.raises(ConfigError) as e:
        Schedule.parse(bad, "stages.a.losses.rgb")
    assert "stages.a.losses.rgb" in str(e.value) and words in str(e.value)


def test_check_bounds():
    with pytest.raises(ConfigError, match="resolution: every value must be >= 8"):
        Schedule.parse([[0, 64], [10, 0]]).check("resolution", minimum=8)
    with pytest.raises(ConfigError, match="whole numbers"):
        Schedule.parse(1.5).check("groups", integer=True)
