r"""A registry of the architectures people make Bayesian, shared by the tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from torch.nn.utils.parametrizations import weight_norm


@dataclass
class Arch:
    build: Callable[[], nn.Module]
    args: Callable[[], tuple]
    fn: Callable[..., Any] | None = None
    include: tuple[str, ...] = ("",)
    exclude: tuple[str, ...] = ()
    train: bool = False  # build in training mode (BatchNorm with batch statistics)
    logvar: float = -3.0


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


def _trunk():
    return nn.Sequential(
        nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)
    )


ARCHS = {
    "lstm-2x-bidir-batch-first": Arch(
        lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True),
        lambda: (torch.randn(2, 6, 3),),
    ),
    "lstm-proj-initial-state": Arch(
        lambda: nn.LSTM(3, 5, proj_size=2),
        lambda: (torch.randn(6, 2, 3), (torch.randn(1, 2, 2), torch.randn(1, 2, 5))),
    ),
    "gru-2x-initial-state": Arch(
        lambda: nn.GRU(3, 5, num_layers=2),
        lambda: (torch.randn(6, 2, 3), torch.randn(2, 2, 5)),
    ),
    "rnn-relu-bidir-unbatched": Arch(
        lambda: nn.RNN(3, 5, nonlinearity="relu", bidirectional=True),
        lambda: (torch.randn(6, 3),),
    ),
    "rnn-no-bias": Arch(lambda: nn.RNN(3, 4, bias=False), lambda: (torch.randn(5, 2, 3),)),
    "lstm-cell": Arch(
        lambda: nn.LSTMCell(3, 5),
        lambda: (torch.randn(2, 3), (torch.randn(2, 5), torch.randn(2, 5))),
    ),
    "lstm-cell-no-state": Arch(
        lambda: nn.LSTMCell(3, 5), lambda: (torch.randn(2, 3),), exclude=("weight_hh", "bias_hh")
    ),
    "gru-cell": Arch(lambda: nn.GRUCell(3, 5), lambda: (torch.randn(2, 3), torch.randn(2, 5))),
    "rnn-cell-unbatched": Arch(lambda: nn.RNNCell(3, 5), lambda: (torch.randn(3), torch.randn(5))),
    "batchnorm1d-train": Arch(
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
        lambda: (torch.randn(8, 3),),
        train=True,
    ),
    "batchnorm2d-train": Arch(
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten()),
        lambda: (torch.randn(4, 2, 5, 5),),
        train=True,
    ),
    "batchnorm3d-train-no-affine": Arch(
        lambda: nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2, affine=False)),
        lambda: (torch.randn(3, 1, 3, 3, 3),),
        train=True,
    ),
    "batchnorm-eval": Arch(
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
        lambda: (torch.randn(8, 3),),
    ),
    "mha-eval": Arch(
        lambda: nn.MultiheadAttention(8, 2, batch_first=True),
        lambda: (torch.randn(2, 5, 8),),
        fn=_mha_fn,
    ),
    "mha-eval-weights": Arch(
        lambda: nn.MultiheadAttention(8, 2), lambda: (torch.randn(5, 2, 8),), fn=_mha_weights_fn
    ),
    "transformer-layer-eval": Arch(
        lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True),
        lambda: (torch.randn(2, 5, 8),),
    ),
    "transformer-encoder-eval": Arch(_encoder, lambda: (torch.randn(2, 5, 8),)),
    "transformer-decoder-layer-eval": Arch(
        lambda: nn.TransformerDecoderLayer(8, 2, 16, batch_first=True),
        lambda: (torch.randn(2, 4, 8), torch.randn(2, 5, 8)),
    ),
    "transformer-eval": Arch(
        lambda: nn.Transformer(8, 2, 1, 1, 16, batch_first=True),
        lambda: (torch.randn(2, 4, 8), torch.randn(2, 5, 8)),
    ),
    "weight-norm": Arch(
        lambda: nn.Sequential(
            weight_norm(nn.Linear(3, 4)), nn.Tanh(), weight_norm(nn.Linear(4, 2), dim=None)
        ),
        lambda: (torch.randn(5, 3),),
    ),
    "conv1d-stride-dilation": Arch(
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, stride=2, dilation=2, padding=1), nn.ELU(), nn.Flatten()
        ),
        lambda: (torch.randn(3, 2, 9),),
    ),
    "conv-transpose": Arch(
        lambda: nn.ConvTranspose2d(2, 3, 3, stride=2), lambda: (torch.randn(2, 2, 4, 4),)
    ),
    "groupnorm-layernorm": Arch(
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(36)
        ),
        lambda: (torch.randn(2, 2, 5, 5),),
    ),
    "embedding": Arch(
        lambda: nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)),
        lambda: (torch.tensor([[1, 2, 3], [4, 5, 9]]),),
    ),
    "shared-submodule": Arch(_shared, lambda: (torch.randn(4, 3),)),
    "tied-embedding-decoder": Arch(TiedLM, lambda: (torch.tensor([[1, 2, 3], [4, 5, 6]]),)),
    "last-layer": Arch(_trunk, lambda: (torch.randn(4, 3),), include=("4",)),
}
