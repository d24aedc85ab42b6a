r"""Toy data sets for examples, tests and notebooks."""

from __future__ import annotations

__all__ = ["two_moons"]

import math

import torch

from torch import Tensor

from ._checks import check_generator, check_int, check_number


def two_moons(
    n: int, sigma: float = 0.1, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    r"""Draws `n` points of the two moons data set.

    An angle :math:`\theta \sim \mathcal{U}(0, 2\pi)` picks the moon, :math:`l = 1` if
    :math:`\theta > \pi` and :math:`0` otherwise, and the point is

    .. math:: x = \left( \cos \theta + l - \tfrac{1}{2},\;
        \sin \theta + \tfrac{l}{2} - \tfrac{1}{4} \right) + \sigma \epsilon,
        \quad \epsilon \sim \mathcal{N}(0, I),

    as in zuko's Bayesian flows tutorial.

    Example:
        >>> x, label = bayesflow.datasets.two_moons(1024)
        >>> x.shape, label.shape
        (torch.Size([1024, 2]), torch.Size([1024]))

    Arguments:
        n: The number of points.
        sigma: The standard deviation :math:`\sigma \geq 0` of the noise: a real number
            (Python or NumPy) or a tensor of one element.
        generator: The source of randomness; the global one if :py:`None`.

    Returns:
        The points, of shape `(n, 2)`, and their labels in :math:`\{0, 1\}`, of shape
        `(n,)`, both of the default dtype.
    """

    n = check_int("two_moons", "n", n)
    sigma = check_number("two_moons", "sigma", sigma, 0.0, strict=False)
    check_generator("two_moons", generator)

    device = None if generator is None else generator.device
    theta = 2 * math.pi * torch.rand(n, generator=generator, device=device)
    label = (theta > math.pi).to(theta.dtype)

    x = torch.stack(
        (theta.cos() + label - 0.5, theta.sin() + label / 2 - 0.25),
        dim=-1,
    )
    x = x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    return x, label
