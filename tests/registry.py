r"""The registry of models, flows and architectures that the tests share."""

from __future__ import annotations

import math
import warnings

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import zuko

from torch.nn.utils import spectral_norm as hook_spectral_norm
from torch.nn.utils import weight_norm as hook_weight_norm
from torch.nn.utils.parametrizations import spectral_norm, weight_norm


def log_prob(flow: nn.Module, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return flow(c).log_prob(x)


def mse(net, x, y):
    return -(net(x) - y).square().mean(dim=-1)


@dataclass
class Case:
    r"""A module to make Bayesian, its inputs and what to compute."""

    build: Callable[[], nn.Module]
    args: Callable[[], tuple]
    fn: Callable[..., Any] | None = None
    include: tuple[str, ...] = ("",)
    exclude: tuple[str, ...] = ()
    train: bool = False  # in training mode (BatchNorm with batch statistics)
    logvar: float = -3.0
    extra: dict = field(default_factory=dict)


# Core models: vmap_call against the loop, the posterior, the errors.


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


# Every zuko flow family, small.

F, C = 3, 2  # features, context
HIDDEN = {"hidden_features": (16, 16)}

FLOWS = {
    "NICE": lambda: zuko.flows.NICE(F, C, transforms=2, **HIDDEN),
    "RealNVP": lambda: zuko.flows.RealNVP(F, C, transforms=2, **HIDDEN),
    "MAF": lambda: zuko.flows.MAF(F, C, transforms=2, **HIDDEN),
    "NSF": lambda: zuko.flows.NSF(F, C, transforms=2, **HIDDEN),
    "NCSF": lambda: zuko.flows.NCSF(F, C, transforms=2, **HIDDEN),
    "SOSPF": lambda: zuko.flows.SOSPF(F, C, transforms=2, **HIDDEN),
    "NAF": lambda: zuko.flows.NAF(
        F, C, transforms=2, signal=4, network={"hidden_features": (8, 8)}, **HIDDEN
    ),
    "UNAF": lambda: zuko.flows.UNAF(
        F, C, transforms=2, signal=4, network={"hidden_features": (8, 8)}, **HIDDEN
    ),
    "GF": lambda: zuko.flows.GF(F, C, transforms=2, components=4, **HIDDEN),
    "BPF": lambda: zuko.flows.BPF(F, C, transforms=2, degree=6, **HIDDEN),
    "CNF": lambda: zuko.flows.CNF(F, C, **HIDDEN),
    "GMM": lambda: zuko.flows.GMM(F, C, components=3, **HIDDEN),
}

# zuko's own gradients fail in a loop of `functional_call`s for these: their autograd
# functions differentiate with respect to `self.parameters()`, the unswapped originals.
NO_LOOP_GRAD = {"UNAF", "CNF"}
# Inverted numerically (bisection or an ODE solver).
INVERTED = {"SOSPF", "NAF", "UNAF", "GF", "BPF", "CNF"}
FLOWS_ONLY = [name for name in FLOWS if name != "GMM"]


# The architectures people make Bayesian (tests/test_call_architectures.py).


class TiedLM(nn.Module):
    r"""An embedding and a decoder that share one weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 7, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, tokens):
        return self.dec(torch.tanh(self.mix(self.emb(tokens))))


def _shared():
    lin = nn.Linear(3, 3)
    return nn.Sequential(lin, nn.Tanh(), lin)


def _encoder():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _mha_fn(m, x):
    out, _ = m(x, x, x, need_weights=False)
    return out


def _mha_weights_fn(m, x):
    return m(x, x, x)  # (out, averaged weights)


def _hook_weight_norm():
    # The deprecated hook-based weight norm: its hook assigns `weight` before every
    # forward. Built without gradients, so that the module can be deep-copied.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.Sequential(
            hook_weight_norm(nn.Linear(3, 4)),
            nn.Tanh(),
            hook_weight_norm(nn.Linear(4, 2), dim=None),
        )


def _weight_norm_1d(hooked):
    # Weight norm of a vector along its only dim: each element has its own norm (|v_i|),
    # where a norm over all the remaining dims, none, must not become a norm over all.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        norm = hook_weight_norm if hooked else weight_norm
        return nn.Sequential(norm(nn.Linear(3, 4), name="bias", dim=0), nn.Tanh())


def _trunk():
    return nn.Sequential(
        nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)
    )


ARCHS = {
    "lstm-2x-bidir-batch-first": Case(
        lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True),
        lambda: (torch.randn(2, 6, 3),),
    ),
    "lstm-proj-initial-state": Case(
        lambda: nn.LSTM(3, 5, proj_size=2),
        lambda: (torch.randn(6, 2, 3), (torch.randn(1, 2, 2), torch.randn(1, 2, 5))),
    ),
    "gru-2x-initial-state": Case(
        lambda: nn.GRU(3, 5, num_layers=2),
        lambda: (torch.randn(6, 2, 3), torch.randn(2, 2, 5)),
    ),
    "rnn-relu-bidir-unbatched": Case(
        lambda: nn.RNN(3, 5, nonlinearity="relu", bidirectional=True),
        lambda: (torch.randn(6, 3),),
    ),
    "rnn-no-bias": Case(lambda: nn.RNN(3, 4, bias=False), lambda: (torch.randn(5, 2, 3),)),
    # Partly Bayesian: a sample dim on some tensors of a layer only. The length equals
    # the tests' K = 3, so that a sample dim taken for the time dim shows.
    "lstm-biases-only": Case(
        lambda: nn.LSTM(3, 5), lambda: (torch.randn(3, 2, 3),), include=("bias*",)
    ),
    "gru-2x-input-weights-only": Case(
        lambda: nn.GRU(3, 5, num_layers=2),
        lambda: (torch.randn(3, 2, 3),),
        include=("weight_ih*",),
    ),
    "gru-recurrent-bias-only": Case(
        lambda: nn.GRU(3, 5), lambda: (torch.randn(3, 2, 3),), include=("bias_hh*",)
    ),
    "lstm-2x-second-layer-only": Case(
        lambda: nn.LSTM(3, 5, num_layers=2, batch_first=True),
        lambda: (torch.randn(2, 3, 3),),
        include=("*_l1",),
    ),
    "lstm-cell": Case(
        lambda: nn.LSTMCell(3, 5),
        lambda: (torch.randn(2, 3), (torch.randn(2, 5), torch.randn(2, 5))),
    ),
    "lstm-cell-no-state": Case(
        lambda: nn.LSTMCell(3, 5), lambda: (torch.randn(2, 3),), exclude=("weight_hh", "bias_hh")
    ),
    "gru-cell": Case(lambda: nn.GRUCell(3, 5), lambda: (torch.randn(2, 3), torch.randn(2, 5))),
    "rnn-cell-unbatched": Case(lambda: nn.RNNCell(3, 5), lambda: (torch.randn(3), torch.randn(5))),
    "batchnorm1d-train": Case(
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
        lambda: (torch.randn(8, 3),),
        train=True,
    ),
    "batchnorm2d-train": Case(
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten()),
        lambda: (torch.randn(4, 2, 5, 5),),
        train=True,
    ),
    "batchnorm3d-train-no-affine": Case(
        lambda: nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2, affine=False)),
        lambda: (torch.randn(3, 1, 3, 3, 3),),
        train=True,
    ),
    "batchnorm-eval": Case(
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
        lambda: (torch.randn(8, 3),),
    ),
    "mha-eval": Case(
        lambda: nn.MultiheadAttention(8, 2, batch_first=True),
        lambda: (torch.randn(2, 5, 8),),
        fn=_mha_fn,
    ),
    "mha-eval-weights": Case(
        lambda: nn.MultiheadAttention(8, 2), lambda: (torch.randn(5, 2, 8),), fn=_mha_weights_fn
    ),
    "transformer-layer-eval": Case(
        lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True),
        lambda: (torch.randn(2, 5, 8),),
    ),
    "transformer-encoder-eval": Case(_encoder, lambda: (torch.randn(2, 5, 8),)),
    "transformer-decoder-layer-eval": Case(
        lambda: nn.TransformerDecoderLayer(8, 2, 16, batch_first=True),
        lambda: (torch.randn(2, 4, 8), torch.randn(2, 5, 8)),
    ),
    "transformer-eval": Case(
        lambda: nn.Transformer(8, 2, 1, 1, 16, batch_first=True),
        lambda: (torch.randn(2, 4, 8), torch.randn(2, 5, 8)),
    ),
    "weight-norm": Case(
        lambda: nn.Sequential(
            weight_norm(nn.Linear(3, 4)), nn.Tanh(), weight_norm(nn.Linear(4, 2), dim=None)
        ),
        lambda: (torch.randn(5, 3),),
    ),
    "weight-norm-hook": Case(_hook_weight_norm, lambda: (torch.randn(5, 3),)),
    "weight-norm-1d": Case(lambda: _weight_norm_1d(False), lambda: (torch.randn(5, 3),)),
    "weight-norm-1d-hook": Case(lambda: _weight_norm_1d(True), lambda: (torch.randn(5, 3),)),
    "spectral-norm-hook-train": Case(
        lambda: nn.Sequential(hook_spectral_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)),
        lambda: (torch.randn(5, 3),),
        train=True,
    ),
    "spectral-norm-hook-eval": Case(
        lambda: nn.Sequential(hook_spectral_norm(nn.Conv1d(2, 3, 3)), nn.Flatten()),
        lambda: (torch.randn(2, 2, 5),),
    ),
    "spectral-norm-train": Case(
        lambda: nn.Sequential(
            spectral_norm(nn.Linear(3, 4)), nn.Tanh(), spectral_norm(nn.Conv1d(1, 2, 2))
        ),
        lambda: (torch.randn(5, 3),),
        fn=lambda m, x: m(x.unsqueeze(1)),
        train=True,
    ),
    "instancenorm1d-train-tracking": Case(
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3, affine=True, track_running_stats=True)
        ),
        lambda: (torch.randn(4, 2, 6),),
        train=True,
    ),
    "instancenorm2d-train-tracking-unbatched": Case(
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3, track_running_stats=True)),
        lambda: (torch.randn(2, 5, 5),),
        train=True,
    ),
    "conv1d-stride-dilation": Case(
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, stride=2, dilation=2, padding=1), nn.ELU(), nn.Flatten()
        ),
        lambda: (torch.randn(3, 2, 9),),
    ),
    "conv-transpose": Case(
        lambda: nn.ConvTranspose2d(2, 3, 3, stride=2), lambda: (torch.randn(2, 2, 4, 4),)
    ),
    "groupnorm-layernorm": Case(
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(36)
        ),
        lambda: (torch.randn(2, 2, 5, 5),),
    ),
    "embedding": Case(
        lambda: nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)),
        lambda: (torch.tensor([[1, 2, 3], [4, 5, 9]]),),
    ),
    "embedding-max-norm": Case(  # renormalizes rows of its weight in place
        lambda: nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 2)),
        lambda: (torch.tensor([[1, 2, 3], [4, 5, 9]]),),
        logvar=-1.0,
    ),
    "shared-submodule": Case(_shared, lambda: (torch.randn(4, 3),)),
    "tied-embedding-decoder": Case(TiedLM, lambda: (torch.tensor([[1, 2, 3], [4, 5, 6]]),)),
    "last-layer": Case(_trunk, lambda: (torch.randn(4, 3),), include=("4",)),
}


# The local reparameterization trick: single layers, and modules around them.


def random_adjacency():
    return torch.rand(3, 4) < 0.6


LOCAL_LAYERS = {
    "torch-linear": (lambda: nn.Linear(4, 3), (5, 4)),
    "torch-linear-nobias": (lambda: nn.Linear(4, 3, bias=False), (5, 4)),
    "zuko-linear": (lambda: zuko.nn.Linear(4, 3), (5, 4)),
    "zuko-linear-stack": (lambda: zuko.nn.Linear(4, 3, stack=2), (5, 2, 4)),
    "masked-linear": (lambda: zuko.nn.MaskedLinear(random_adjacency()), (5, 4)),
    "conv1d-stride": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (5, 2, 7)),
    "conv2d-groups-dilation": (
        lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2),
        (3, 4, 6, 6),
    ),
    "conv2d-reflect-nobias": (
        lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect", bias=False),
        (3, 2, 4, 4),
    ),
    "conv3d": (lambda: nn.Conv3d(1, 2, 2), (2, 1, 3, 3, 3)),
}


LOCAL_MODULES = {
    "prelu": (  # reads dim 1 as channels: batch-shape agnostic only under vmap
        lambda: nn.Sequential(nn.Linear(3, 4), nn.PReLU(4)),
        lambda: (torch.randn(4, 3),),
        None,
        ("0",),
    ),
    "softmax-dim0": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=0)),
        lambda: (torch.randn(5, 3),),
        None,
        ("",),
    ),
    "batchnorm-eval": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval(),
        lambda: (torch.randn(6, 3),),
        None,
        ("",),
    ),
    "conv-net": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2)
        ),
        lambda: (torch.randn(4, 2, 5, 5),),
        None,
        ("",),
    ),
    "mixed-layernorm": (  # a Bayesian LayerNorm is sampled whole
        lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)),
        lambda: (torch.randn(5, 3),),
        None,
        ("",),
    ),
    "mlp": (
        lambda: zuko.nn.MLP(3, 2, hidden_features=(8, 8)),
        lambda: (torch.randn(5, 3),),
        None,
        ("",),
    ),
    "nsf-hyper": (
        lambda: zuko.flows.NSF(2, 1, transforms=2, hidden_features=(8, 8)),
        lambda: (torch.randn(5, 1), torch.randn(5, 2)),
        lambda f, c, x: f(c).log_prob(x),
        ("**.hyper",),
    ),
    "maf-last": (
        lambda: zuko.flows.MAF(2, 1, transforms=2, hidden_features=(8, 8)),
        lambda: (torch.randn(5, 1), torch.randn(5, 2)),
        lambda f, c, x: f(c).log_prob(x),
        ("**.hyper.4",),
    ),
}


# Objectives: a regression network and a flow, with their log-likelihoods.

TRAINING = {
    "mlp": (
        lambda: zuko.nn.MLP(3, 2, hidden_features=(8, 8), activation=nn.ELU),
        lambda: (torch.randn(10, 3), torch.randn(10, 2)),
        mse,
        ("",),
    ),
    "nsf": (
        lambda: zuko.flows.NSF(2, 1, transforms=2, hidden_features=(8, 8)),
        lambda: (torch.randn(10, 1), torch.randn(10, 2)),
        log_prob,
        ("**.hyper.4",),
    ),
}


# Snapshots of state.


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


class LoRA(nn.Linear):
    r"""A loralib-style layer: `train(False)` merges the update :math:`BA` into the frozen
    weight, `train(True)` takes it out."""

    def __init__(self, inputs, outputs, rank=2):
        super().__init__(inputs, outputs)
        self.A = nn.Parameter(torch.randn(rank, inputs) / 4)
        self.B = nn.Parameter(torch.randn(outputs, rank) / 4)
        self.weight.requires_grad_(False)
        self.merged = False

    def train(self, mode=True):
        super().train(mode)
        if mode == self.merged:
            with torch.no_grad():
                self.weight.add_(self.B @ self.A, alpha=-1.0 if mode else 1.0)
            self.merged = not mode
        return self

    def forward(self, x):
        out = nn.functional.linear(x, self.weight, self.bias)
        return out if self.merged else out + x @ self.A.T @ self.B.T


class NanBuffer(nn.Module):
    r"""A layer with a buffer that holds NaN (a NaN never equals itself in `torch.equal`)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("b", torch.tensor([1.0, math.nan]))

    def forward(self, x):
        return self.lin(x) * self.b.nan_to_num(2.0)
