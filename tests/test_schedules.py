r"""Tests for bayesflow.schedules: KL weights over training steps."""

import pytest
import torch

import bayesflow as bf


def test_schedules():
    constant = bf.ConstantSchedule(0.3)
    warmup = bf.LinearWarmup(steps=10, weight=2.0, start=0.5)
    cyclical = bf.CyclicalSchedule(period=8, ratio=0.25, weight=1.0)

    assert [constant(t) for t in (0, 5, 10**6)] == [0.3, 0.3, 0.3]
    assert [warmup(t) for t in (0, 5, 10, 100)] == [0.5, 1.25, 2.0, 2.0]
    assert [cyclical(t) for t in range(10)] == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5]

    with pytest.raises(ValueError, match="LinearWarmup: expected steps to be a positive int"):
        bf.LinearWarmup(steps=0)
    with pytest.raises(TypeError, match="LinearWarmup: expected steps"):
        bf.LinearWarmup(steps=1.5)
    with pytest.raises(ValueError, match="CyclicalSchedule: expected 0 < ratio <= 1"):
        bf.CyclicalSchedule(period=4, ratio=1.5)
    with pytest.raises(ValueError, match="CyclicalSchedule: expected a finite ratio > 0"):
        bf.CyclicalSchedule(period=4, ratio=0.0)
    with pytest.raises(ValueError, match="ConstantSchedule: expected a finite weight >= 0"):
        bf.ConstantSchedule(-1.0)
    with pytest.raises(ValueError, match="ConstantSchedule: expected step to be an int >= 0"):
        constant(-1)
    with pytest.raises(TypeError, match="CyclicalSchedule: expected step"):
        cyclical(1.0)


def test_a_tensor_weight_gives_floats():
    weight = torch.tensor(2.0)
    for schedule in (
        bf.ConstantSchedule(weight),
        bf.LinearWarmup(steps=4, weight=weight, start=torch.tensor([0.5])),
        bf.CyclicalSchedule(period=4, ratio=torch.tensor(0.5), weight=weight),
    ):
        values = [schedule(t) for t in range(6)]
        assert all(type(v) is float for v in values), schedule
    assert bf.LinearWarmup(steps=4, weight=weight, start=torch.tensor([0.5]))(2) == 1.25
    assert bf.CyclicalSchedule(period=4, ratio=torch.tensor(0.5), weight=weight)(1) == 1.0


def test_a_tensor_weight_changed_later_changes_no_schedule():
    # Each schedule checks its weight once: it must keep that checked value, not the
    # tensor, whose later changes in place (to a negative or NaN weight) would pass.
    weight = torch.tensor(0.5)
    schedules = (
        bf.ConstantSchedule(weight),
        bf.LinearWarmup(steps=1, weight=weight),
        bf.CyclicalSchedule(period=4, ratio=0.5, weight=weight),
    )
    before = [[s(t) for t in range(6)] for s in schedules]
    for value in (-3.0, float("nan")):
        weight.fill_(value)
        assert [[s(t) for t in range(6)] for s in schedules] == before


def test_numpy_ints_give_an_int_and_floats():
    np = pytest.importorskip("numpy")
    warmup = bf.LinearWarmup(steps=np.int64(10), weight=np.float32(0.5))
    cyclical = bf.CyclicalSchedule(period=np.int32(8), ratio=0.25)
    assert type(warmup.steps) is int and type(cyclical.period) is int
    assert repr(warmup) == "LinearWarmup(steps=10, weight=0.5, start=0.0)"
    assert repr(cyclical) == "CyclicalSchedule(period=8, ratio=0.25, weight=1.0)"
    for schedule, plain in (
        (warmup, bf.LinearWarmup(steps=10, weight=0.5)),
        (cyclical, bf.CyclicalSchedule(period=8, ratio=0.25)),
    ):
        values = [schedule(t) for t in range(12)]
        assert all(type(v) is float for v in values)
        assert values == [plain(t) for t in range(12)]


def test_the_warmup_ends_at_the_weight_itself():
    # start + (weight - start) * 1.0 is 1 ulp off weight for 13 of these 121 pairs
    # (0.2 + 0.7 * 1.0 = 0.8999999999999999).
    grid = [i / 10 for i in range(11)]
    for start in grid:
        for weight in grid:
            schedule = bf.LinearWarmup(steps=5, weight=weight, start=start)
            assert [schedule(t) for t in (5, 6, 10**6)] == [weight] * 3
            ramp = [start + (weight - start) * (t / 5) for t in range(5)]
            assert [schedule(t) for t in range(5)] == ramp


def test_a_step_beyond_the_float_range():
    # 10**400 / 100 raised "OverflowError: integer division result too large for a float".
    assert bf.LinearWarmup(steps=100)(10**400) == 1.0
    assert bf.LinearWarmup(steps=10**400, weight=2.0)(10**399) == 0.2
    assert bf.CyclicalSchedule(period=100, ratio=0.5)(10**400 + 25) == 0.5


def test_a_cyclical_period_below_two_is_refused():
    # period=1 was accepted, and every step, the first of its cycle, had weight 0: the KL
    # was off for the whole run.
    for period in (1, 0, -3):
        with pytest.raises(
            ValueError,
            match=rf"CyclicalSchedule: expected period to be an int >= 2, got {period} \(the "
            r"first step of a cycle has weight 0, and with period 1 every step is a first one",
        ):
            bf.CyclicalSchedule(period=period)
    with pytest.raises(TypeError, match="CyclicalSchedule: expected period to be an int >= 2"):
        bf.CyclicalSchedule(period=2.0)


@pytest.mark.parametrize("period, ratio", [(2, 0.5), (3, 0.1), (10, 0.1), (4, 0.25), (8, 0.3)])
def test_a_cyclical_ramp_of_at_most_one_step(period, ratio):
    # As documented: the first step of a cycle has weight 0; where period * ratio <= 1 the
    # others have the whole weight, else the ramp passes through weights in between.
    schedule = bf.CyclicalSchedule(period=period, ratio=ratio, weight=2.0)
    weights = [schedule(t) for t in range(3 * period)]
    ramp = [2.0 * min((t % period) / period / ratio, 1.0) for t in range(3 * period)]
    assert weights == ramp
    assert weights[::period] == [0.0] * 3
    between = [w for w in weights if 0.0 < w < 2.0]
    assert (between == []) == (period * ratio <= 1)
