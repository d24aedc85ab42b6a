r"""KL weights over training steps: constant, linear warm-up and cyclical annealing."""

from __future__ import annotations

__all__ = ["ConstantSchedule", "CyclicalSchedule", "LinearWarmup"]

from dataclasses import dataclass

from ._checks import check_int, check_number


def _check_step(where: str, step: object) -> int:
    return check_int(where, "step", step, minimum=0)


@dataclass(frozen=True)
class ConstantSchedule:
    r"""A KL weight that never changes, :math:`\beta(t) = w`.

    Arguments:
        weight: The weight :math:`w \geq 0`.
    """

    weight: float = 1.0

    def __post_init__(self) -> None:
        # A float, as documented: a tensor kept here would carry later changes in place,
        # past this check.
        weight = check_number("ConstantSchedule", "weight", self.weight, 0.0, strict=False)
        object.__setattr__(self, "weight", weight)

    def __call__(self, step: int) -> float:
        r"""Returns the KL weight at training step `step >= 0`."""

        _check_step("ConstantSchedule", step)
        return self.weight


@dataclass(frozen=True)
class LinearWarmup:
    r"""A KL weight that grows linearly from `start` to `weight` in `steps` steps, then stays.

    .. math:: \beta(t) = \beta_0 + (w - \beta_0) \min(t / T, 1)

    Example:
        >>> schedule = LinearWarmup(steps=100)
        >>> schedule(0), schedule(50), schedule(1000)
        (0.0, 0.5, 1.0)

    Arguments:
        steps: The number of warm-up steps :math:`T \geq 1`.
        weight: The final weight :math:`w \geq 0`.
        start: The initial weight :math:`\beta_0 \geq 0`.

    References:
        | Ladder Variational Autoencoders (Sønderby et al., 2016)
        | https://arxiv.org/abs/1602.02282
    """

    steps: int
    weight: float = 1.0
    start: float = 0.0

    def __post_init__(self) -> None:
        # An int and floats, as documented (a NumPy int gave NumPy floats, a one-element
        # tensor gave tensors).
        object.__setattr__(self, "steps", check_int("LinearWarmup", "steps", self.steps))
        for name in ("weight", "start"):
            value = check_number("LinearWarmup", name, getattr(self, name), 0.0, strict=False)
            object.__setattr__(self, name, value)

    def __call__(self, step: int) -> float:
        r"""Returns the KL weight at training step `step >= 0`."""

        step = _check_step("LinearWarmup", step)
        if step >= self.steps:
            # `weight` itself: start + (weight - start) * 1.0 can be 1 ulp off it, and
            # step / steps raised an OverflowError past 1e308 warm-ups.
            return self.weight
        return self.start + (self.weight - self.start) * (step / self.steps)


@dataclass(frozen=True)
class CyclicalSchedule:
    r"""A KL weight that repeats a linear ramp every `period` steps.

    Within each cycle, the weight grows linearly from 0 to `weight` over the first
    `ratio` of the cycle and stays there for the rest,
    :math:`\beta(t) = w \min(\tau / R, 1)` with :math:`\tau = (t \bmod P) / P`.
    The first step of every cycle has weight 0; where :math:`P R \leq 1` the ramp has no
    step in between: weight 0 at the first step of each cycle and :math:`w` at the others.

    Example:
        >>> schedule = CyclicalSchedule(period=100, ratio=0.5)
        >>> schedule(0), schedule(25), schedule(75), schedule(125)
        (0.0, 0.5, 1.0, 0.5)

    Arguments:
        period: The length :math:`P \geq 2` of a cycle, in steps (a cycle of one step would
            give weight 0 at every step).
        ratio: The fraction :math:`0 < R \leq 1` of a cycle spent growing.
        weight: The top weight :math:`w \geq 0`.

    References:
        | Cyclical Annealing Schedule: A Simple Approach to Mitigating KL Vanishing
        | (Fu et al., 2019) https://arxiv.org/abs/1903.10145
    """

    period: int
    ratio: float = 0.5
    weight: float = 1.0

    def __post_init__(self) -> None:
        try:
            period = check_int("CyclicalSchedule", "period", self.period, minimum=2)
        except ValueError as e:
            raise ValueError(
                f"{e} (the first step of a cycle has weight 0, and with period 1 every "
                f"step is a first one: the KL would be off throughout)"
            ) from None
        object.__setattr__(self, "period", period)
        ratio = check_number("CyclicalSchedule", "ratio", self.ratio, 0.0, strict=True)
        if ratio > 1:
            raise ValueError(f"CyclicalSchedule: expected 0 < ratio <= 1, got {ratio}")
        weight = check_number("CyclicalSchedule", "weight", self.weight, 0.0, strict=False)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "weight", weight)

    def __call__(self, step: int) -> float:
        r"""Returns the KL weight at training step `step >= 0`."""

        step = _check_step("CyclicalSchedule", step)
        tau = (step % self.period) / self.period
        return self.weight * min(tau / self.ratio, 1.0)
