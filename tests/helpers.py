r"""Shared test utilities: a registry of small modules and state snapshots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import zuko


def log_prob(flow: nn.Module, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return flow(c).log_prob(x)


@dataclass
class Case:
    build: Callable[[], nn.Module]
    args: Callable[[], tuple]
    fn: Callable[..., Any] | None = None
    include: tuple[str, ...] = ("",)
    exclude: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


def _adjacency() -> torch.Tensor:
    return torch.tril(torch.ones(4, 3, dtype=torch.bool), diagonal=-1)


MODELS = {
    "mlp": Case(
        build=lambda: zuko.nn.MLP(3, 4, hidden_features=(8, 8), activation=nn.ELU),
        args=lambda: (torch.randn(6, 3),),
    ),
    "masked-mlp": Case(
        build=lambda: zuko.nn.MaskedMLP(_adjacency(), hidden_features=(8, 8)),
        args=lambda: (torch.randn(6, 3),),
    ),
    "conv": Case(
        build=lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ELU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)
        ),
        args=lambda: (torch.randn(6, 2, 5, 5),),
    ),
    "maf": Case(
        build=lambda: zuko.flows.MAF(3, 2, transforms=2, hidden_features=(8, 8)),
        args=lambda: (torch.randn(6, 2), torch.randn(6, 3)),
        fn=log_prob,
    ),
    "nsf": Case(
        build=lambda: zuko.flows.NSF(3, 2, transforms=2, hidden_features=(8, 8)),
        args=lambda: (torch.randn(6, 2), torch.randn(6, 3)),
        fn=log_prob,
    ),
    "nsf-partial": Case(
        build=lambda: zuko.flows.NSF(3, 2, transforms=2, hidden_features=(8, 8)),
        args=lambda: (torch.randn(6, 2), torch.randn(6, 3)),
        fn=log_prob,
        include=("**.hyper.4",),
        exclude=("**.bias",),
    ),
}


def call(case: Case, module: nn.Module, *args: Any) -> Any:
    return module(*args) if case.fn is None else case.fn(module, *args)


def snapshot(*objects: Any) -> list[torch.Tensor]:
    r"""Clones every tensor reachable from modules, dicts, tuples and tensors."""

    out = []
    for obj in objects:
        if isinstance(obj, nn.Module):
            out += [t.detach().clone() for t in obj.state_dict(keep_vars=True).values()]
        elif isinstance(obj, dict):
            out += snapshot(*obj.values())
        elif isinstance(obj, (tuple, list)):
            out += snapshot(*obj)
        elif isinstance(obj, torch.Tensor):
            out.append(obj.detach().clone())
    return out


def unchanged(before: list[torch.Tensor], *objects: Any) -> bool:
    after = snapshot(*objects)
    return len(before) == len(after) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(before, after, strict=True)
    )
