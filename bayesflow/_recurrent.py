r"""Vmap-safe recurrent layers: :class:`torch.nn.RNN`, :class:`~torch.nn.LSTM`,
:class:`~torch.nn.GRU` and their cells, with the sampled weights of a vectorized call.

torch's fused recurrent kernels have no batching rule. Here the input projections of all
time steps are one batched matmul, and the recurrence over time is a custom operator
whose batching rule runs the steps on whole `(K, N, H)` stacks of all the samples: a
handful of kernels per step for all `K` samples, rather than vmap's per-operator
dispatch per step. The equations and the gate order are torch's.
"""

from __future__ import annotations

__all__ = ["cell_forward", "rnn_forward"]

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from ._compat import is_batched


def _steps(
    mode: str,
    xs: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    h: Tensor,
    c: Tensor,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Runs a recurrence over the time-major `xs` (input projections, `(L, *B, G)`).

    Leading batch dims broadcast: `h` is `(*B, H)` and the weights may carry a leading
    sample dim of their own.
    """

    w_t = w_hh.transpose(-1, -2)
    w_r = None if w_hr is None else w_hr.transpose(-1, -2)
    length = xs.shape[0]
    outs: list[Tensor] = [xs] * length
    order = range(length - 1, -1, -1) if reverse else range(length)

    for t in order:
        if mode == "LSTM":
            gates = xs[t] + h @ w_t
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if w_r is not None:
                h = h @ w_r
        elif mode == "GRU":
            gh = h @ w_t if b_hh is None else torch.add(h @ w_t, b_hh)
            xr, xz, xn = xs[t].chunk(3, dim=-1)
            hr, hz, hn = gh.chunk(3, dim=-1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            nn_ = torch.tanh(xn + r * hn)
            h = nn_ + z * (h - nn_)
        elif mode == "RNN_TANH":
            h = torch.tanh(xs[t] + h @ w_t)
        else:
            h = torch.relu(xs[t] + h @ w_t)
        outs[t] = h

    return torch.stack(outs), h, c


@torch.library.custom_op("bayesflow::recurrence", mutates_args=())
def _recurrence(
    mode: str,
    xs: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    # Only ever called with batched inputs, which the batching rule below handles.
    out, h, c = _steps(mode, xs, w_hh, b_hh, w_hr, h0, c0, reverse)
    return out.clone(), h.clone(), c.clone()


@_recurrence.register_vmap
def _recurrence_vmap(
    info: Any,
    in_dims: tuple,
    mode: str,
    xs: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    reverse: bool,
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple]:
    def front(t: Tensor | None, d: int | None) -> Tensor | None:
        return t if t is None or d is None else t.movedim(d, 0)

    _, d_xs, d_whh, d_bhh, d_whr, d_h0, d_c0, _ = in_dims
    # Time-major with the sample dim right after time: every step reads a contiguous slab.
    xs = xs if d_xs is None else xs.movedim(d_xs, 1).contiguous()
    h0, c0 = front(h0, d_h0), front(c0, d_c0)
    if d_bhh is not None:
        b_hh = b_hh.movedim(d_bhh, 0).unsqueeze(1)  # (K, 1, G) against (K, N, G)

    out, h, c = _steps(mode, xs, front(w_hh, d_whh), b_hh, front(w_hr, d_whr), h0, c0, reverse)
    # Per sample, `out` is (L, N, H) and `h`, `c` are (N, H): an extra dim is the samples'.
    dims = (1 if out.dim() == 4 else None, 0 if h.dim() == 3 else None)
    return (out, h, c), (*dims, 0 if c.dim() == 3 else None)


def _scan(
    mode: str,
    xs: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    tensors = (xs, w_hh, b_hh, w_hr, h0, c0)
    if any(t is not None and is_batched(t) for t in tensors):
        return _recurrence(mode, xs, w_hh, b_hh, w_hr, h0, c0, reverse)
    return _steps(mode, xs, w_hh, b_hh, w_hr, h0, c0, reverse)


def _run_rnn(m: nn.RNNBase, input: Any, hx: Any) -> tuple[Tensor, Any]:
    if isinstance(input, PackedSequence):
        raise NotImplementedError(
            "bayesflow's vectorized recurrent layers do not take a PackedSequence: pad the "
            "sequences instead"
        )

    lstm = m.mode == "LSTM"
    if input.dim() not in (2, 3):
        raise ValueError(f"{type(m).__name__}: expected input to be 2D or 3D, got {input.dim()}D")
    batched = input.dim() == 3
    if not batched:
        input = input.unsqueeze(1)
    elif m.batch_first:
        input = input.transpose(0, 1)

    batch = input.shape[1]
    directions = 2 if m.bidirectional else 1
    hidden = m.hidden_size
    real = m.proj_size if m.proj_size > 0 else hidden

    if hx is None:
        h0 = input.new_zeros(m.num_layers * directions, batch, real)
        c0 = input.new_zeros(m.num_layers * directions, batch, hidden)
    elif lstm:
        h0, c0 = hx
        if not batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
    else:
        h0 = hx if batched else hx.unsqueeze(1)
        c0 = h0
    expected = (m.num_layers * directions, batch, real)
    if tuple(h0.shape) != expected:
        raise RuntimeError(f"Expected hidden size {expected}, got {tuple(h0.shape)}")

    x = input
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    for layer in range(m.num_layers):
        outs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih = getattr(m, "weight_ih" + suffix)
            w_hh = getattr(m, "weight_hh" + suffix)
            b_ih = getattr(m, "bias_ih" + suffix) if m.bias else None
            b_hh = getattr(m, "bias_hh" + suffix) if m.bias else None
            w_hr = getattr(m, "weight_hr" + suffix) if m.proj_size > 0 else None

            fold = m.mode != "GRU" and b_hh is not None
            bias = b_ih if not fold else (b_hh if b_ih is None else b_ih + b_hh)
            xs = F.linear(x, w_ih, bias)

            k = layer * directions + direction
            out, h, c = _scan(
                m.mode,
                xs,
                w_hh,
                None if fold else b_hh,
                w_hr,
                h0[k],
                c0[k] if lstm else h0[k],
                reverse=direction == 1,
            )
            outs.append(out)
            h_n.append(h)
            c_n.append(c)

        x = outs[0] if directions == 1 else torch.cat(outs, dim=-1)
        if m.dropout > 0 and m.training and layer < m.num_layers - 1:
            x = F.dropout(x, m.dropout, training=True)

    h_last = torch.stack(h_n)
    c_last = torch.stack(c_n)
    output = x
    if not batched:
        output, h_last, c_last = output.squeeze(1), h_last.squeeze(1), c_last.squeeze(1)
    elif m.batch_first:
        output = output.transpose(0, 1)

    return output, ((h_last, c_last) if lstm else h_last)


def rnn_forward(m: nn.RNNBase) -> Callable[..., tuple[Tensor, Any]]:
    r"""Returns a vmap-safe `forward` for the recurrent layer `m`."""

    def forward(input: Any, hx: Any = None) -> tuple[Tensor, Any]:
        return _run_rnn(m, input, hx)

    return forward


def _cell(m: nn.RNNCellBase, x: Tensor, hx: Any) -> Any:
    if x.dim() not in (1, 2):
        raise ValueError(f"{type(m).__name__}: expected input to be 1D or 2D, got {x.dim()}D")
    batched = x.dim() == 2
    if not batched:
        x = x.unsqueeze(0)

    lstm = isinstance(m, nn.LSTMCell)
    if hx is None:
        zeros = x.new_zeros(x.shape[0], m.hidden_size)
        h, c = zeros, zeros
    elif lstm:
        h, c = hx
        if not batched:
            h, c = h.unsqueeze(0), c.unsqueeze(0)
    else:
        h = hx if batched else hx.unsqueeze(0)

    gi = F.linear(x, m.weight_ih, m.bias_ih)
    gh = F.linear(h, m.weight_hh, m.bias_hh)
    if lstm:
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        out: Any = (h, c) if batched else (h.squeeze(0), c.squeeze(0))
        return out
    if isinstance(m, nn.GRUCell):
        xr, xz, xn = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = n + z * (h - n)
    else:
        h = torch.tanh(gi + gh) if m.nonlinearity == "tanh" else torch.relu(gi + gh)
    return h if batched else h.squeeze(0)


def cell_forward(m: nn.RNNCellBase) -> Callable[..., Any]:
    r"""Returns a vmap-safe `forward` for the recurrent cell `m`."""

    def forward(input: Tensor, hx: Any = None) -> Any:
        return _cell(m, input, hx)

    return forward
