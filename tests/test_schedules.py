import math

import pytest

from gradprune import SparsitySchedule

KINDS = ["cubic", "linear", "exponential", "constant"]


@pytest.mark.parametrize("kind", KINDS)
def test_endpoints_and_monotone(kind):
    s = SparsitySchedule(kind, 0.8, initial_sparsity=0.1, start_step=10, end_step=110, every=7)
    assert s.sparsity_at(0) == 0.1
    assert s.sparsity_at(110) == 0.8  # exactly, not 0.993 * 0.8
    assert s.sparsity_at(10_000) == 0.8
    if kind != "constant":
        assert s.sparsity_at(10) == pytest.approx(0.1, abs=1e-12)
    values = [s.sparsity_at(t) for t in range(0, 130)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert all(0.1 <= v <= 0.8 for v in values)


def test_cubic_is_zhu_gupta_formula():
    s = SparsitySchedule("cubic", 0.9, initial_sparsity=0.0, start_step=0, end_step=100)
    for t in (0, 13, 50, 99):
        assert s.sparsity_at(t) == pytest.approx(0.9 + (0.0 - 0.9) * (1 - t / 100) ** 3)
    # prunes early: half way it is already at 7/8 of the target (the p**3 bug would give 1/8)
    assert s.sparsity_at(50) == pytest.approx(0.9 * 7 / 8)


def test_exponential_fast_early_and_exact_at_end():
    s = SparsitySchedule("exponential", 0.6, end_step=100, exponent=5.0)
    assert s.sparsity_at(100) == 0.6
    assert s.sparsity_at(50) > SparsitySchedule("linear", 0.6, end_step=100).sparsity_at(50)
    expected = 0.6 * (1 - math.exp(-5 * 0.3)) / (1 - math.exp(-5))
    assert s.sparsity_at(30) == pytest.approx(expected)


def test_linear_midpoint():
    assert SparsitySchedule("linear", 0.5, initial_sparsity=0.1, end_step=10).sparsity_at(5) == pytest.approx(0.3)


def test_events():
    s = SparsitySchedule("cubic", 0.5, start_step=3, end_step=20, every=5)
    assert s.events() == [3, 8, 13, 18, 20]
    assert [t for t in range(40) if s.is_event(t)] == s.events()
    assert SparsitySchedule("constant", 0.5, start_step=4).events() == [4]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(kind="quadratic", final_sparsity=0.5, end_step=10), ValueError, r"kind must be one of .*'quadratic'"),
        (dict(kind="cubic", final_sparsity=1.0, end_step=10), ValueError, r"final_sparsity must be in \[0, 1\), got 1.0"),
        (dict(kind="cubic", final_sparsity=float("nan"), end_step=10), ValueError, r"final_sparsity must be in \[0, 1\), got nan"),
        (dict(kind="cubic", final_sparsity=-0.1, end_step=10), ValueError, r"final_sparsity .* got -0.1"),
        (dict(kind="cubic", final_sparsity="half", end_step=10), TypeError, r"final_sparsity must be a number"),
        (dict(kind="cubic", final_sparsity=0.5, start_step=10, end_step=10), ValueError, r"end_step \(10\) must be greater than start_step \(10\)"),
        (dict(kind="cubic", final_sparsity=0.5, end_step=10, every=0), ValueError, r"every must be an integer > 0, got 0"),
        (dict(kind="cubic", final_sparsity=0.3, initial_sparsity=0.5, end_step=10), ValueError, r"initial_sparsity \(0.5\) must not exceed final_sparsity \(0.3\)"),
        (dict(kind="linear", final_sparsity=0.5), ValueError, r"end_step is required"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparsitySchedule(**kwargs)


def test_all_problems_reported_together():
    with pytest.raises(ValueError) as info:
        SparsitySchedule("cubic", 1.5, end_step=5, start_step=9, every=-1)
    text = str(info.value)
    assert "final_sparsity" in text and "end_step" in text and "every" in text
