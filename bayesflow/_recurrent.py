r"""Vmap-safe recurrent layers: :class:`torch.nn.RNN`, :class:`~torch.nn.LSTM`,
:class:`~torch.nn.GRU` and their cells, with the sampled weights of a vectorized call.

torch's fused recurrent kernels have no batching rule. Here the input projections of all
time steps are one einsum, and the recurrence over time runs below vmap on whole stacks
of all the samples: a handful of kernels per step for all `K` samples, rather than
vmap's per-operator dispatch per step. The equations are torch's.
"""

from __future__ import annotations

__all__ = ["cell_forward", "forced", "rnn_forward"]

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from ._compat import (
    Orthogonal,
    WeightNorm,
    batched_at_current_level,
    fused_rnn,
    is_wrapped,
    refuse_autocast,
    unbatched,
    unwrap_at,
    wrap_at,
)

# Parametrizations that hold no state and draw no noise in training mode: their value does
# not depend on how many times a forward reads the weight.
_PURE = (WeightNorm, Orthogonal)

# Which path a vectorized call takes: :py:`None` chooses by :func:`_fused_pays_off`;
# :py:`True` / :py:`False` force torch's fused kernel per sample / the batched steps.
_FUSED: ContextVar[bool | None] = ContextVar("bayesflow_fused_rnn", default=None)


@contextmanager
def forced(fused: bool | None) -> Iterator[None]:
    r"""Forces the path of the recurrent layers in the block (in this thread): torch's
    fused kernel per sample (:py:`True`), the batched steps (:py:`False`), or the measured
    rule (:py:`None`)."""

    token = _FUSED.set(fused)
    try:
        yield
    finally:
        _FUSED.reset(token)


def _fused_pays_off(mode: str, x: Tensor, samples: int, gates: int) -> bool:
    r"""Whether torch's fused kernel run once per sample beats the batched steps of
    :func:`_steps`, for `samples` samples whose gates have `gates` elements per time step
    (gate rows times batch).

    Measured on the CPU (`bayesflow bench --models lstm` and a sweep of sizes, float32 and float64,
    forward and training): the fused kernel is fast only where oneDNN runs it, an LSTM in
    float32 on the CPU. There it wins every training step (the steps' backward is slow)
    and forward passes below 16 samples or on large layers; everywhere else (GRU, RNN,
    float64, bfloat16) the steps win from 4 samples on, by up to 10 times. On CUDA the
    steps run: the fused kernel there is not measured.
    """

    if mode != "LSTM" or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    return torch.is_grad_enabled() or samples < 16 or gates > 4096


def _tanh(x: Tensor) -> Tensor:
    r"""Returns :math:`\tanh x = 2 \sigma(2 x) - 1`: on the CPU, torch's sigmoid is
    vectorized and its tanh is not, and the identity is about 2.5 times faster."""

    if x.device.type != "cpu" or x.numel() < 16384:  # below that, the kernel calls dominate
        return torch.tanh(x)
    return torch.sigmoid(x * 2).mul(2).sub_(1)


def _project(w: Tensor, h: Tensor, add: Tensor | None) -> Tensor:
    r"""Returns :math:`a + W h` in one kernel where the shapes allow it."""

    if w.dim() == 3 and h.dim() == 3 and add is not None:
        return torch.baddbmm(add, w, h)
    out = w @ h
    return out if add is None else out + add


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
    r"""Runs a recurrence over input projections `xs` of shape `(L, *B, G, N)`.

    The layout is hidden-major (`h` is `(*B, H, N)`, the gates `(*B, G, N)`), so that
    each gate is a slab of whole rows and the element-wise kernels run on contiguous
    memory. Leading batch dims broadcast, and weights may carry a sample dim of their
    own. For an LSTM the gates are in the order (i, f, o, 2 g) (:func:`_lstm_gates`): one
    sigmoid covers all four, with :math:`\tanh g = 2 \sigma(2 g) - 1`.
    """

    size = w_hh.shape[-2] // {"LSTM": 4, "GRU": 3}.get(mode, 1)
    length = xs.shape[0]
    outs: list[Tensor] = [xs] * length

    for t in range(length - 1, -1, -1) if reverse else range(length):
        if mode == "LSTM":
            s = torch.sigmoid(_project(w_hh, h, xs[t]))
            i, f, o, g = s.unflatten(-2, (4, size)).unbind(-3)
            c = torch.addcmul(f * c, i, g.mul(2).sub_(1))
            h = o * _tanh(c)
            if w_hr is not None:
                h = w_hr @ h
        elif mode == "GRU":
            gh = _project(w_hh, h, b_hh)
            xr, xz, xn = xs[t].unflatten(-2, (3, size)).unbind(-3)
            hr, hz, hn = gh.unflatten(-2, (3, size)).unbind(-3)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = _tanh(torch.addcmul(xn, r, hn))
            h = torch.lerp(n, h, z)
        elif mode == "RNN_TANH":
            h = _tanh(_project(w_hh, h, xs[t]))
        else:
            h = torch.relu(_project(w_hh, h, xs[t]))
        outs[t] = h

    return torch.stack(outs), h, c


def _lstm_gates(t: Tensor | None, size: int, dim: int) -> Tensor | None:
    r"""Reorders an LSTM's gate rows from torch's (i, f, g, o) to (i, f, o, 2 g), along
    `dim` (see :func:`_steps`)."""

    if t is None:
        return None
    i, f, g, o = t.split(size, dim=dim)
    return torch.cat((i, f, o, 2 * g), dim=dim)


def _prepared(
    mode: str, w_ih: Tensor, b_ih: Tensor | None, w_hh: Tensor, b_hh: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    r"""Returns the input weight, the bias of the input projections, the recurrent weight
    and the bias left inside the recurrence (a GRU's `b_hh` only, which `r` gates)."""

    fold = mode != "GRU" and b_hh is not None
    bias = b_ih if not fold else (b_hh if b_ih is None else b_ih + b_hh)
    if mode == "LSTM":
        size = w_hh.shape[-2] // 4
        w_ih, w_hh = _lstm_gates(w_ih, size, -2), _lstm_gates(w_hh, size, -2)
        bias = _lstm_gates(bias, size, -1)
    return w_ih, bias, w_hh, None if fold else b_hh


def _inputs(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, samples: bool) -> Tensor:
    r"""Returns the input projections of all time steps, hidden-major: `(L, *B, G, N)`.

    `x` is `(L, N, I)`, or `(K, L, N, I)` with `samples`; `w_ih` is `(G, I)` or
    `(K, G, I)`; `b_ih` is `(G,)` or `(K, G)`, each with or without a sample dim of its
    own. The product is written straight into the time-major layout that the steps read
    (one slab per step): a permuted copy of it costs more than the product itself.
    """

    length, batch, features = x.shape[-3:]
    if samples:  # one GEMM per sample, then the time-major layout
        k = x.shape[0]
        xt = x.reshape(k, length * batch, features).transpose(-1, -2)
        y = torch.bmm(w_ih.expand(k, *w_ih.shape[-2:]), xt)
        y = einops.rearrange(y, "k gate (time n) -> time k gate n", time=length)
    else:  # one GEMM per time step, the samples' gate rows stacked: (L, [K] G, N)
        w = w_ih.reshape(-1, features).expand(length, -1, -1)
        xt = x.transpose(-1, -2)
        rows = (length, *w_ih.shape[:-1], batch)
        if b_ih is not None and b_ih.numel() == w.shape[1]:  # the bias has the same rows
            return torch.baddbmm(b_ih.reshape(-1, 1), w, xt).view(rows)
        y = torch.bmm(w, xt).view(rows)
    if b_ih is not None:
        b = b_ih.unsqueeze(-1)  # (G, 1) or (K, G, 1)
        y = (y.unsqueeze(1) if y.dim() < b.dim() + 1 else y) + b
    return y.contiguous()


def _level(tensors: Sequence[Tensor | None]) -> int | None:
    r"""Returns the current vmap level if any of `tensors` is batched at it."""

    return next(
        (lv for t in tensors if t is not None and (lv := batched_at_current_level(t))), None
    )


# One direction of one layer: x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0.
Direction = tuple[
    Tensor, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None, Tensor, Tensor
]


def _recurrence(
    mode: str, tensors: Direction, reverse: bool, samples: bool
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Runs the steps on plain tensors, the samples' stacks first where they have them."""

    x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0 = tensors
    w_ih, b_ih, w_hh, b_hh = _prepared(mode, w_ih, b_ih, w_hh, b_hh)
    # Per sample h0 is (N, H): hidden-major ([K,] H, N), contiguous.
    out, h, c = _steps(
        mode,
        _inputs(x, w_ih, b_ih, samples=samples),
        w_hh,
        None if b_hh is None else b_hh.unsqueeze(-1),
        w_hr,
        h0.transpose(-1, -2).contiguous(),
        c0.transpose(-1, -2).contiguous(),
        reverse,
    )
    return out.transpose(-1, -2), h.transpose(-1, -2), c.transpose(-1, -2)


def _scan(mode: str, tensors: Direction, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    r"""Runs one direction of one layer over the time-major `x` `(L, N, I)`.

    Under vmap, this is a batching rule of bayesflow's: the recurrence runs below vmap,
    on the sample stacks themselves (`(K, ...)`, the sample dim first), so that every
    step is a handful of kernels for all samples rather than vmap's dispatch per
    operator per step.
    """

    level = _level(tensors)
    if level is None:
        return _recurrence(mode, tensors, reverse, samples=False)

    def front(t: Tensor | None) -> tuple[Tensor | None, bool]:
        if t is None:
            return None, False
        v, d = unwrap_at(t, level)
        return (v, False) if d is None else (v.movedim(d, 0), True)

    fronted = [front(t) for t in tensors]
    with unbatched():
        out, h, c = _recurrence(mode, tuple(v for v, _ in fronted), reverse, fronted[0][1])

    # Per sample `out` is (L, N, H) and `h`, `c` are (N, H): an extra dim is the samples'.
    out = wrap_at(out, 1, level) if out.dim() == 4 else out
    h = wrap_at(h, 0, level) if h.dim() == 3 else h
    c = wrap_at(c, 0, level) if c.dim() == 3 else c
    return out, h, c


def _states(
    m: nn.Module,
    hx: Any,
    lstm: bool,
    batched: bool,
    dim: int,
    zeros: Callable[[], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    r"""Returns the initial states `(h, c)` of a layer or cell from its `hx` (an LSTM's is a
    pair; zeros if :py:`None`), with the batch dim `dim` added to an unbatched input's."""

    if hx is None:
        return zeros()
    # As torch refuses them: a stacked tensor `(2, ...)` would unpack along its first dim.
    if lstm and not (
        isinstance(hx, (tuple, list)) and len(hx) == 2 and all(isinstance(t, Tensor) for t in hx)
    ):
        raise TypeError(
            f"{type(m).__name__}: expected hx to be a tuple (h, c) of two tensors, got "
            f"{type(hx).__name__}"
        )
    if not lstm and not isinstance(hx, Tensor):
        raise TypeError(f"{type(m).__name__}: expected hx to be a tensor, got {type(hx).__name__}")
    h, c = hx if lstm else (hx, hx)
    return (h, c) if batched else (h.unsqueeze(dim), c.unsqueeze(dim))


def _run_rnn(m: nn.RNNBase, input: Any, hx: Any) -> tuple[Tensor, Any]:
    if isinstance(input, PackedSequence):
        raise NotImplementedError(
            "bayesflow's vectorized recurrent layers do not take a PackedSequence: pad the "
            "sequences instead"
        )
    if m.training and _impure_parametrization(m):
        raise NotImplementedError(
            "a parametrized weight of a recurrent layer in training mode (spectral_norm's "
            "power iteration, DropConnect's mask) runs once per read, and torch's own "
            "forward reads each weight a number of times of its own"
        )

    lstm = m.mode == "LSTM"
    if input.dim() not in (2, 3):
        raise ValueError(f"{type(m).__name__}: expected input to be 2D or 3D, got {input.dim()}D")
    # torch's checks and messages (its kernels', reached later, name neither).
    if input.dtype != m.weight_ih_l0.dtype and not torch.is_autocast_enabled(input.device.type):
        raise ValueError(
            f"RNN input dtype ({input.dtype}) does not match weight dtype "
            f"({m.weight_ih_l0.dtype}). Convert input: input.to({m.weight_ih_l0.dtype}), or "
            f"convert model: model.to({input.dtype})"
        )
    if input.size(-1) != m.input_size:
        raise RuntimeError(
            f"input.size(-1) must be equal to input_size. Expected {m.input_size}, got "
            f"{input.size(-1)}"
        )
    batched = input.dim() == 3
    if not batched:
        input = input.unsqueeze(1)
    elif m.batch_first:
        input = input.transpose(0, 1)

    batch = input.shape[1]
    directions = 2 if m.bidirectional else 1
    hidden = m.hidden_size
    real = m.proj_size if m.proj_size > 0 else hidden

    layers = m.num_layers * directions
    h0, c0 = _states(
        m,
        hx,
        lstm,
        batched,
        1,
        lambda: (input.new_zeros(layers, batch, real), input.new_zeros(layers, batch, hidden)),
    )
    # As torch checks them: broadcasting a state of another shape would be silent.
    expected = (layers, batch, real)
    if tuple(h0.shape) != expected:
        raise RuntimeError(f"Expected hidden size {expected}, got {tuple(h0.shape)}")
    if lstm and tuple(c0.shape) != (layers, batch, hidden):
        raise RuntimeError(
            f"Expected hidden[1] size {(layers, batch, hidden)}, got {tuple(c0.shape)}"
        )

    fused = _fused(m, input, h0, c0)
    if fused is not None:
        return _result(m, batched, lstm, *fused)

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

            k = layer * directions + direction
            tensors = (x, w_ih, b_ih, w_hh, b_hh, w_hr, h0[k], c0[k] if lstm else h0[k])
            out, h, c = _scan(m.mode, tensors, reverse=direction == 1)
            outs.append(out)
            h_n.append(h)
            c_n.append(c)

        x = outs[0] if directions == 1 else torch.cat(outs, dim=-1)
        if m.dropout > 0 and m.training and layer < m.num_layers - 1:
            x = F.dropout(x, m.dropout, training=True)

    return _result(m, batched, lstm, x, torch.stack(h_n), torch.stack(c_n))


def _impure_parametrization(m: nn.Module) -> bool:
    params = getattr(m, "parametrizations", None)
    if not isinstance(params, nn.ModuleDict):
        return False
    return any(not isinstance(p, _PURE) for plist in params.values() for p in plist)


def _result(
    m: nn.RNNBase, batched: bool, lstm: bool, output: Tensor, h_last: Tensor, c_last: Tensor
) -> tuple[Tensor, Any]:
    r"""Returns a recurrent layer's `(output, h_n)` or `(output, (h_n, c_n))` in the layout
    of its input, from the time-major `output` and the states `(layers, N, H)`."""

    if not batched:
        output, h_last, c_last = output.squeeze(1), h_last.squeeze(1), c_last.squeeze(1)
    elif m.batch_first:
        output = output.transpose(0, 1)

    return output, ((h_last, c_last) if lstm else h_last)


def _fused(
    m: nn.RNNBase, x: Tensor, h0: Tensor, c0: Tensor
) -> tuple[Tensor, Tensor, Tensor] | None:
    r"""Runs the time-major `x` through torch's fused kernel, one sample at a time below
    vmap, and returns `(output, h_n, c_n)` batched; or :py:`None` where the batched steps
    run instead: where they are faster (:func:`_fused_pays_off`), with dropout (its masks
    follow the vmap's `randomness`), or inside other :mod:`torch.func` transforms.
    """

    lstm = m.mode == "LSTM"
    tensors = [x, h0, *((c0,) if lstm else ()), *(getattr(m, n) for n in m._flat_weights_names)]
    level = _level(tensors)
    if level is None or (m.training and m.dropout > 0):
        return None
    inner = [unwrap_at(t, level) for t in tensors]
    if any(is_wrapped(v) for v, _ in inner):
        return None
    size = next(v.shape[d] for v, d in inner if d is not None)
    gates = m.weight_hh_l0.shape[-2] * x.shape[1]
    fused = _FUSED.get()
    if not (fused or (fused is None and _fused_pays_off(m.mode, x, size, gates))):
        return None

    kernel = fused_rnn(m.mode)
    with unbatched():
        stacks = [v if d is None else v.movedim(d, 0) for v, d in inner]
        results = []
        for k in range(size):
            x_k, h_k, *rest = (
                t if d is None else t[k] for t, (_, d) in zip(stacks, inner, strict=True)
            )
            if lstm:
                c_k, *rest = rest
            hx = (h_k, c_k) if lstm else h_k
            results.append(
                kernel(
                    x_k,
                    hx,
                    rest,
                    m.bias,
                    m.num_layers,
                    float(m.dropout),
                    m.training,
                    m.bidirectional,
                    False,
                )
            )
        out, h, *c = (torch.stack(ts) for ts in zip(*results, strict=True))
    out, h = wrap_at(out, 0, level), wrap_at(h, 0, level)
    return out, h, wrap_at(c[0], 0, level) if lstm else h


def rnn_forward(m: nn.RNNBase) -> Callable[..., tuple[Tensor, Any]]:
    r"""Returns a vmap-safe `forward` for the recurrent layer `m`."""

    def forward(input: Any, hx: Any = None) -> tuple[Tensor, Any]:
        refuse_autocast(
            input.data if isinstance(input, PackedSequence) else input, type(m).__name__
        )
        return _run_rnn(m, input, hx)

    return forward


def _cell(m: nn.RNNCellBase, x: Tensor, hx: Any) -> Any:
    if x.dim() not in (1, 2):
        raise ValueError(f"{type(m).__name__}: expected input to be 1D or 2D, got {x.dim()}D")
    if x.size(-1) != m.input_size:
        raise RuntimeError(
            f"input has inconsistent input_size: got {x.size(-1)} expected {m.input_size}"
        )
    batched = x.dim() == 2
    if not batched:
        x = x.unsqueeze(0)

    lstm = isinstance(m, nn.LSTMCell)
    zeros = x.new_zeros(x.shape[0], m.hidden_size) if hx is None else None
    h, c = _states(m, hx, lstm, batched, 0, lambda: (zeros, zeros))
    # As torch checks them: broadcasting a state of another shape would be silent.
    for i, t in enumerate((h, c) if lstm else (h,)):
        if tuple(t.shape) != (x.shape[0], m.hidden_size):
            got = tuple(t.shape if batched else t.shape[1:])
            want = (x.shape[0], m.hidden_size) if batched else (m.hidden_size,)
            raise RuntimeError(
                f"{type(m).__name__}: expected hx{f'[{i}]' if lstm else ''} of shape {want}, "
                f"got {got}"
            )

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
        refuse_autocast(input, type(m).__name__)
        return _cell(m, input, hx)

    return forward
