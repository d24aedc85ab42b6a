r"""The hand-written lower bounds: K sampled MLPs as batched GEMMs (`torch.baddbmm`).

An MLP here is a :class:`torch.nn.Sequential` of linear layers (see
:func:`bayesflow._layers.is_linear`, 2-D weights) and parameter-free layers. For a case
that is such an MLP (`mlp`, `last-layer`) the whole module is computed this way; for a
flow whose Bayesian parameters all live in MLPs (the hyper-networks of `nsf`, `maf`, ...),
a copy of the flow gets batched stand-ins for them while everything else (the splines,
the base distribution) runs unchanged on inputs with a leading sample dim.
"""

from __future__ import annotations

__all__ = ["Gemms", "gemms"]

import copy

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from torch import Tensor

from bayesflow._layers import is_linear, mask_of

from .cases import Case
from .status import NotApplicable

#: The flows whose batched hyper-networks were found equal to the loop (NAF, GF and UNAF have
#: parameters outside MLPs; CNF's ODE was not tried).
FLOWS = ("bpf", "gmm", "maf", "ncsf", "nice", "nsf", "realnvp", "sospf")


def _is_mlp(module: nn.Module) -> bool:
    if not isinstance(module, nn.Sequential):
        return False
    for layer in module:
        if is_linear(layer):
            if layer.weight.dim() != 2:
                return False
        elif any(True for _ in layer.parameters()):
            return False
    return True


def _mlp(
    layers: nn.Sequential,
    prefix: str,
    theta: dict[str, Tensor],
    h: Tensor,
    K: int,
    batched: bool,
) -> Tensor:
    r"""Runs an MLP for K parameter sets on `h`, `(K, ..., in)` if `batched` else
    `(..., in)`, and returns `(K, ..., out)`.

    Unbatched, the layers before the first sampled one run once, shared by all samples: a
    deterministic trunk costs what it costs in one forward.
    """

    for i, layer in enumerate(layers):
        if not is_linear(layer):
            h = layer(h)
            continue
        w_name, b_name = f"{prefix}{i}.weight", f"{prefix}{i}.bias"
        if w_name not in theta and b_name not in theta and not batched:
            h = layer(h)
            continue
        if not batched:
            h, batched = h.expand(K, *h.shape), True

        mask = mask_of(layer)
        w = theta[w_name] if w_name in theta else layer.weight.expand(K, -1, -1)
        if mask is not None:
            w = w * mask
        if layer.bias is None:
            b = torch.zeros((), dtype=h.dtype, device=h.device)
        elif b_name in theta:
            b = theta[b_name].unsqueeze(1)
        else:
            b = layer.bias.expand(K, 1, -1)
        shape = h.shape
        h = torch.baddbmm(b, h.reshape(K, -1, shape[-1]), w.transpose(1, 2))
        h = h.view(*shape[:-1], h.shape[-1])
    return h if batched else h.expand(K, *h.shape)


class _BatchedMLP(nn.Module):
    r"""Stands in for a hyper-network: runs it for the K parameter sets of `holder`."""

    def __init__(self, layers: nn.Sequential, prefix: str, holder: dict[str, Any]) -> None:
        super().__init__()
        self.layers = layers
        self.prefix = prefix
        self.holder = holder

    def forward(self, h: Tensor) -> Tensor:
        # The flow's inputs carry the sample dim (see Gemms.__call__), so does `h`.
        return _mlp(self.layers, self.prefix, self.holder["theta"], h, self.holder["K"], True)


def _mlps(module: nn.Module) -> Iterator[tuple[str, nn.Sequential]]:
    for name, sub in module.named_modules():
        if name and _is_mlp(sub):
            yield name, sub


class Gemms:
    r"""`fn(module, *args)` for K parameter sets, with every Bayesian MLP as batched GEMMs.

    Arguments:
        case: The case. Its posterior must lie in MLPs: the module itself (`mlp`,
            `last-layer`) or the hyper-networks of a flow from :data:`FLOWS`.
        fn: What to compute, `case.fn` or `case.sample_fn`.
    """

    def __init__(self, case: Case, fn: Callable[..., Tensor]) -> None:
        names = set(case.posterior.mean)
        if _is_mlp(case.module) and case.output is not None and fn is case.fn:
            self.root = case.module
            self.copy = None
            return
        if case.model not in FLOWS:
            raise NotApplicable(
                "the batched-GEMM reference is written for MLPs and flows' MLP hyper-networks"
            )

        self.root = None
        self.copy = copy.deepcopy(case.module)
        self.holder: dict[str, Any] = {}
        covered: set[str] = set()
        for name, mlp in list(_mlps(self.copy)):
            prefix = f"{name}."
            mine = {n for n in names if n.startswith(prefix)}
            if not mine:
                continue
            covered |= mine
            parent, _, child = name.rpartition(".")
            owner = self.copy.get_submodule(parent) if parent else self.copy
            setattr(owner, child, _BatchedMLP(mlp, prefix, self.holder))
        if covered != names:
            raise NotApplicable("some Bayesian parameters lie outside MLPs")
        self.fn = fn

    def __call__(self, theta: dict[str, Tensor], K: int, *args: Tensor) -> Tensor:
        if self.root is not None:
            return _mlp(self.root, "", theta, args[0], K, False)

        self.holder["theta"], self.holder["K"] = theta, K
        try:
            return self.fn(self.copy, *(a.expand(K, *a.shape) for a in args))
        finally:
            self.holder.clear()


def gemms(case: Case, fn: Callable[..., Tensor]) -> Gemms:
    r"""Returns the batched-GEMM form of `fn` on `case` (see :class:`Gemms`)."""

    return Gemms(case, fn)
