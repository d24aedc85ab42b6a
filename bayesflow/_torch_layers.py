r"""What torch's own layers need in a vectorized call, and nowhere else.

* Recurrent layers and cells run bayesflow's vmap-safe recurrences
  (:mod:`bayesflow._recurrent`): torch's fused kernels have no batching rule.
* Attention (:class:`torch.nn.MultiheadAttention`, :class:`torch.nn.TransformerEncoderLayer`)
  takes torch's reference path with an explicit softmax: inside vmap the sampled
  parameters look grad-free, so eval mode would take torch's fused fast path, which has
  no backward, and CPU's fused attention kernel has no batching rule. An eval-mode
  :class:`torch.nn.TransformerEncoder` gives its padded positions the zeros of torch's
  nested-tensor path where torch takes it.
* Weight normalization (:func:`torch.nn.utils.parametrizations.weight_norm`) computes its
  norm with plain operations: `torch._weight_norm` has no batching rule.
* Train-mode batch normalization updates per-sample copies of its running statistics,
  which the call then averages (see :class:`bayesflow._swap.State`).

Each change is made to the instances of the module being called, for the duration of
the vectorized pass only; the loop and every other module see torch's layers as they are.
"""

from __future__ import annotations

__all__ = ["changes", "hint", "updated_buffers"]

import math
import sys

from collections.abc import Collection
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch import Tensor
from torch.nn.utils.parametrize import is_parametrized

from ._compat import (
    BatchNorm,
    ConvNd,
    HookSpectralNorm,
    HookWeightNorm,
    InstanceNorm,
    SpectralNorm,
    WeightNorm,
    autocast_inputs,
    batched_at_current_level,
    function_apply,
    is_compiling,
    is_wrapped,
    records_gradients,
    refuse_autocast,
    unbatched,
    unwrap_at,
    unwrap_batched,
    vmapped,
    wrap_at,
)
from ._layers import is_conv, is_linear, mask_of
from ._recurrent import cell_forward, rnn_forward
from ._structure import Structure
from ._swap import has_own_forward, ours

_RNN_FORWARDS = {nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward}
_CELL_FORWARDS = {nn.RNNCell.forward, nn.LSTMCell.forward, nn.GRUCell.forward}
_MHA_FORWARD = nn.MultiheadAttention.forward
_ENCODER_FORWARD = nn.TransformerEncoder.forward
_EMBEDDING_FORWARD = nn.Embedding.forward
_STANDINS = (
    nn.RNNBase,
    nn.RNNCellBase,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerEncoder,
    WeightNorm,
    SpectralNorm,
    nn.Embedding,
)


def _tracks(m: nn.Module) -> bool:
    return m.training and m.track_running_stats and m.running_mean is not None


def _attention_forward(m: nn.MultiheadAttention) -> Any:
    evaluating = not m.training  # the vectorized pass puts it in training mode

    def forward(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        refuse_autocast(query, "MultiheadAttention")  # its batched baddbmm
        # The explicit softmax path: CPU's fused scaled_dot_product_attention kernel has
        # no batching rule (a slow per-sample fallback).
        if is_causal and key_padding_mask is None and not need_weights and attn_mask is not None:
            # torch's reference path takes `is_causal` for the mask then, whatever
            # `attn_mask` holds; its fused fast path reads `attn_mask`.
            if not (evaluating and _fast_attention(m, query, key, value, attn_mask)):
                attn_mask = _causal_mask(m, query, key)
        dead = None
        if not need_weights and (key_padding_mask is not None or attn_mask is not None):
            key_padding_mask = _in_dtype_of(query, key_padding_mask)
            attn_mask = _in_dtype_of(query, attn_mask)
            found = _open_dead_rows(m, query, key, key_padding_mask, attn_mask)
            if found is None:
                # Per-head masks a vmap batches (one per example under Laplace's
                # per-example pass, one per sample given with in_dims): which rows they
                # mask in which heads cannot be read there. Torch's own path, which gives
                # a row masked in a head zero attention in that head (torch's batching
                # of its fused kernel is slow, and says so).
                return _MHA_FORWARD(
                    m,
                    query,
                    key,
                    value,
                    key_padding_mask=key_padding_mask,
                    need_weights=False,
                    attn_mask=attn_mask,
                    average_attn_weights=average_attn_weights,
                    is_causal=is_causal,
                )
            dead, key_padding_mask, attn_mask = found
        out, weights = _MHA_FORWARD(
            m,
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            need_weights=True,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if dead is not None:  # zero attention, as scaled_dot_product_attention gives
            bias = m.out_proj.bias
            fill = out.new_zeros(()) if bias is None else bias
            out = torch.where(dead.unsqueeze(-1), fill, out)
        return out, weights if need_weights else None

    return forward


def _fast_attention(
    m: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor
) -> bool:
    r"""Whether torch's forward of `m`, in eval mode, without a padding mask, takes its
    fused fast path: torch's conditions, the gradients read through vmap's wrappers."""

    if not torch.backends.mha.get_fastpath_enabled() or torch.is_autocast_enabled():
        return False
    if attn_mask.is_floating_point():  # torch: "floating-point masks are not supported"
        return False
    if query.dim() != 3 or query is not key or key is not value:
        return False
    weight, bias = m.in_proj_weight, m.in_proj_bias
    if weight is None or bias is None:  # (without an input bias: the reference path)
        return False
    if query.dtype != weight.dtype or query.dtype != bias.dtype:
        return False
    if m.num_heads % 2 or not m.batch_first or not m._qkv_same_embed_dim:
        return False
    if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
        return False
    if query.is_nested:
        return False
    out = m.out_proj
    tensors = [t for t in (query, weight, bias, out.weight, out.bias) if t is not None]
    return _fused_tensors(tensors, tensors)


def _causal_mask(m: nn.MultiheadAttention, query: Tensor, key: Tensor) -> Tensor:
    r"""Returns the causal mask of `is_causal` (top-left, as scaled_dot_product_attention's):
    query `i` attends to keys `j <= i`."""

    seq = 1 if m.batch_first and query.dim() == 3 else 0
    length, source = query.shape[seq], key.shape[seq]
    return torch.ones(length, source, dtype=torch.bool, device=query.device).triu(1)


def _nests(m: nn.TransformerEncoder) -> bool:
    r"""Whether torch's forward of an encoder may take its nested-tensor path: its first
    layer is torch's, in eval mode (the vectorized pass puts it in training mode, which
    turns that path off)."""

    layers = getattr(m, "layers", None)
    first = layers[0] if layers is not None and len(layers) else None
    return (
        getattr(m, "use_nested_tensor", False)
        and isinstance(first, nn.TransformerEncoderLayer)
        and not first.training
        and _torchs_tel(first)
    )


def _fused_tensors(tensors: list[Tensor], placed: list[Tensor]) -> bool:
    r"""torch's conditions on the tensors of a fused fast path (attention, the encoder's
    nested tensors): none with a torch function, `placed` on a device it runs on, none
    recording gradients where autograd is on (read through vmap's wrappers: inside vmap
    the samples look grad-free)."""

    devices = ("cpu", "cuda", "xpu", torch.utils.backend_registration._privateuse1_backend_name)
    if torch.overrides.has_torch_function(tensors):
        return False
    if any(t.device.type not in devices for t in placed):
        return False
    return not (torch.is_grad_enabled() and any(records_gradients(t) for t in tensors))


def _nested_padding(
    m: nn.TransformerEncoder, src: Tensor, mask: Tensor | None, padding: Tensor | None
) -> Tensor | None:
    r"""Returns the padded positions `(batch, seq)` where torch's forward of `m` (with its
    first layer in eval mode) takes its nested-tensor path, whose outputs there are zeros;
    :py:`None` where it does not. torch's conditions, the gradients read through vmap's
    wrappers (inside vmap the samples look grad-free)."""

    if padding is None or mask is not None or src.dim() != 3 or src.is_nested:
        return None
    if not torch.backends.mha.get_fastpath_enabled() or torch.is_autocast_enabled():
        return None
    check = getattr(m, "mask_check", True)
    if check and is_compiling():
        return None
    first = m.layers[0]
    attention = first.self_attn
    tensors = [
        t
        for t in (
            src,
            attention.in_proj_weight,
            attention.in_proj_bias,
            attention.out_proj.weight,
            attention.out_proj.bias,
            first.norm1.weight,
            first.norm1.bias,
            first.norm2.weight,
            first.norm2.bias,
            first.linear1.weight,
            first.linear1.bias,
            first.linear2.weight,
            first.linear2.bias,
        )
        if t is not None
    ]
    if not _fused_tensors(tensors, [src]):
        return None
    # torch's canonical mask: a boolean one as -inf where True; padded where not 0.
    padded = padding if padding.dtype == torch.bool else padding != 0
    if check:
        # Left-aligned: no kept position after a padded one.
        keep = unwrap_batched(padded).logical_not()
        if not bool((keep[..., 1:] <= keep[..., :-1]).all()):
            if is_wrapped(padded):  # a per-sample mask: some samples may be aligned
                raise RuntimeError(
                    "a per-sample src_key_padding_mask of an eval-mode TransformerEncoder "
                    "that is not left-aligned everywhere: torch's nested-tensor path, "
                    "taken per sample, cannot be told apart under vmap"
                )
            return None
    else:
        # Unchecked, torch keeps the first tokens of each row, as many as the mask keeps.
        kept = padded.logical_not().sum(-1, keepdim=True)
        padded = torch.arange(padded.shape[-1], device=padded.device) >= kept
    return padded


def _encoder_forward(m: nn.TransformerEncoder) -> Any:
    def forward(
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        padded = _nested_padding(m, src, mask, src_key_padding_mask)
        if padded is None:
            return _ENCODER_FORWARD(m, src, mask, src_key_padding_mask, is_causal)
        # torch's nested path: the other positions as with the padding mask (the padded
        # tokens dropped, whatever a float mask holds for them), zeros at the padded ones
        # (then the norm, if any).
        norm = m.norm
        m.norm = None
        try:
            out = _ENCODER_FORWARD(m, src, mask, padded, is_causal)
        finally:
            m.norm = norm
        where = padded if m.layers[0].self_attn.batch_first else padded.transpose(0, 1)
        out = out.masked_fill(where.unsqueeze(-1), 0.0)
        return out if norm is None else norm(out)

    return forward


def _in_dtype_of(query: Tensor, mask: Tensor | None) -> Tensor | None:
    r"""Returns a floating-point mask in the query's dtype, which the explicit softmax
    needs: torch's path without weights adds a wider mask (float32 to a float16 query) as
    it is. A finite value that the cast would make infinite (-1e9 in float16) would turn
    a row that torch attends uniformly into a dead one: not vectorized."""

    if mask is None or not mask.is_floating_point() or mask.dtype == query.dtype:
        return mask
    cast = mask.to(query.dtype)
    if not torch.equal(cast.isinf(), mask.isinf()):
        raise NotImplementedError(
            f"a {mask.dtype} attention mask whose finite values overflow the query's "
            f"{query.dtype} is not vectorized"
        )
    return cast


def _open_dead_rows(
    m: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None] | None:
    r"""Finds the queries whose keys are all masked, which torch's path without weights
    (scaled_dot_product_attention) gives zero attention and the explicit softmax NaN.
    Returns where they are, laid out as the output's rows, and the masks merged into one
    with those rows opened (their outputs are then replaced); or :py:`None` and the masks
    as given where there are none; :py:`None` alone where a vmap batches the masks (their
    values cannot be read there)."""

    if m.bias_k is not None or m.add_zero_attn:
        return None, key_padding_mask, attn_mask  # a key that no mask hides
    batched, first = query.dim() == 3, m.batch_first
    b = (query.shape[0] if first else query.shape[1]) if batched else 1
    length = query.shape[1] if batched and first else query.shape[0]
    source = key.shape[1] if batched and first else key.shape[0]
    heads = m.num_heads

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                mask, -math.inf
            )
        return mask

    total = torch.zeros(b, heads, length, source, dtype=query.dtype, device=query.device)
    if key_padding_mask is not None:
        total = total + additive(key_padding_mask).reshape(b, 1, 1, source)
    if attn_mask is not None:
        mask = additive(attn_mask)
        total = total + (mask if mask.dim() == 2 else mask.reshape(b, heads, length, source))
    dead = total.isneginf().all(-1)  # (b, heads, length)
    if vmapped(dead):
        # Its values cannot be read. Masks the same in every head (a padding mask, a 2-D
        # attn_mask): each row opened where it is masked, as below; per-head ones: None.
        if attn_mask is not None and attn_mask.dim() == 3:
            return None
        dead = dead[:, 0]
    elif not dead.any():
        return None, key_padding_mask, attn_mask
    elif not torch.equal(dead, dead[:, :1].expand_as(dead)):
        raise NotImplementedError(
            "attention rows whose keys are all masked in some heads only (a per-head "
            "attn_mask) are not vectorized"
        )
    else:
        dead = dead[:, 0]  # (b, length)
    merged = total.masked_fill(dead[:, None, :, None], 0.0)
    merged = merged.reshape(b * heads if batched else heads, length, source)
    if not batched:
        dead = dead[0]
    elif not first:
        dead = dead.T
    return dead, None, merged


class _Bmm(torch.autograd.Function):
    r"""`baddbmm(b, v, w^T)` whose backward gives the weight's gradient contiguous,
    `bmm(g^T, v)`: autograd's own is a transposed view, which a leaf weight (an ensemble's,
    IVON's) then copies once more. Under an outer :func:`torch.func.vmap` (per-example
    gradients), functorch batches it by running these formulas per example; under forward
    mode (:func:`torch.func.jvp`, :func:`torch.func.hessian`), :meth:`jvp` gives its
    tangent."""

    generate_vmap_rule = True

    @staticmethod
    def forward(v: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return torch.bmm(v, w.mT) if b is None else torch.baddbmm(b, v, w.mT)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        v, w, b = inputs
        ctx.save_for_backward(v, w)
        ctx.save_for_forward(v, w)
        ctx.bias_shape = None if b is None else b.shape
        ctx.out_shape = output.shape

    @staticmethod
    def jvp(ctx: Any, v_t: Tensor | None, w_t: Tensor | None, b_t: Tensor | None) -> Tensor:
        v, w = ctx.saved_tensors
        terms = [
            t
            for t in (
                None if v_t is None else torch.bmm(v_t, w.mT),
                None if w_t is None else torch.bmm(v, w_t.mT),
                None if b_t is None else b_t.expand(ctx.out_shape),
            )
            if t is not None
        ]
        if not terms:
            return v.new_zeros(ctx.out_shape)
        return sum(terms[1:], terms[0])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        v, w = ctx.saved_tensors
        grad_v = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(g.transpose(1, 2), v) if ctx.needs_input_grad[1] else None
        grad_b = None
        if ctx.bias_shape is not None and ctx.needs_input_grad[2]:
            grad_b = g.sum_to_size(ctx.bias_shape)
        return grad_v, grad_w, grad_b


def batched_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    r"""Returns :math:`x W^T + b` for a weight batched by vmap, as one batched matmul
    with the bias fused (`baddbmm`), on the sample stacks themselves; torch's batching rule
    for :func:`torch.nn.functional.linear` with a batched weight takes several kernels."""

    level = batched_at_current_level(weight)
    if level is None or weight.dim() != 2:
        # (torch's rule for a batched input and a bias runs below autocast)
        return F.linear(*autocast_inputs(x.device.type, x, weight, bias))

    w, w_dim = unwrap_at(weight, level)
    v, x_dim = unwrap_at(x, level)
    b, b_dim = unwrap_at(bias, level) if bias is not None else (None, None)
    with unbatched():
        w = w.movedim(w_dim, 0)
        k, out, inputs = w.shape
        # The rows counted, not inferred: a layer with no inputs has none to infer from.
        if x_dim is None:  # an input shared by every sample
            lead = v.shape[:-1]
            v = v.reshape(1, lead.numel(), inputs).expand(k, -1, -1)
        else:
            v = v.movedim(x_dim, 0)
            lead = v.shape[1:-1]
            v = v.reshape(k, lead.numel(), inputs)
        if b is not None:
            b = b if b_dim is None else b.movedim(b_dim, 0).unsqueeze(1)
        v, w, b = autocast_inputs(v.device.type, v, w, b)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (v, w, b)):
            y = function_apply(_Bmm, v, w, b)
        else:  # no graph to record: the same kernel without the Function's bookkeeping
            y = _Bmm.forward(v, w, b)
        y = y.view(k, *lead, out)
    return wrap_at(y, 0, level)


# Above this many output elements per sample, the samples' convolutions run one by one
# (a dense convolution each); below, as one grouped convolution (torch's batching rule).
# Measured on the CPU (`python benchmarks/conv_paths.py`): the grouped form wins on small
# batches, where one kernel call replaces K; on large ones the dense kernels are 1.3-3x
# faster than the grouped one.
CONV_LOOP_ELEMENTS = 1 << 16


def batched_conv(m: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    r"""Returns `m`'s convolution of `x` for a weight batched by vmap: below vmap, on the
    sample stacks, as one dense convolution per sample when they are large, else as one
    grouped convolution of all the samples."""

    level = batched_at_current_level(weight)
    if level is None or x.device.type != "cpu":
        return m._conv_forward(x, weight, bias)

    w, w_dim = unwrap_at(weight, level)
    v, x_dim = unwrap_at(x, level)
    b, b_dim = unwrap_at(bias, level) if bias is not None else (None, None)
    samples = w.shape[w_dim]
    per_sample = v.numel() // (1 if x_dim is None else samples)  # the input of one sample
    if per_sample * m.out_channels < CONV_LOOP_ELEMENTS * m.in_channels:
        return m._conv_forward(x, weight, bias)

    with unbatched():
        w = w.movedim(w_dim, 0)
        v = v if x_dim is None else v.movedim(x_dim, 0)
        b = b if b is None or b_dim is None else b.movedim(b_dim, 0)
        outs = [
            m._conv_forward(
                v if x_dim is None else v[k],
                w[k],
                b if b is None or b_dim is None else b[k],
            )
            for k in range(samples)
        ]
        y = torch.stack(outs)
    return wrap_at(y, 0, level)


def _conv_forward(m: nn.Module) -> Any:
    def forward(x: Tensor) -> Tensor:
        # Cast as autocast casts a convolution's inputs: torch's batching rule of the
        # convolution runs below autocast, in the inputs' dtype.
        x, weight, bias = autocast_inputs(x.device.type, x, m.weight, m.bias)
        return batched_conv(m, x, weight, bias)

    return forward


def _counted(forward: Any, count: Any) -> Any:
    def counted(x: Tensor, /, *args: Any, **kwargs: Any) -> Any:
        count(x)
        return forward(x, *args, **kwargs)

    return counted


def _linear_forward(m: nn.Module) -> Any:
    def forward(x: Tensor) -> Tensor:
        # Read at the call: an ensemble's members hold masks of their own (stacked buffers,
        # swapped in after this forward is installed).
        mask = mask_of(m)
        weight = m.weight if mask is None else mask * m.weight
        return batched_linear(x, weight, m.bias)

    return forward


def _weight_norm_forward(m: Any) -> Any:
    def forward(weight_g: Tensor, weight_v: Tensor) -> Tensor:
        # torch._weight_norm has no batching rule (a slow per-sample fallback).
        dims = [d for d in range(weight_v.dim()) if m.dim == -1 or d != m.dim % weight_v.dim()]
        # No dim to reduce (a vector normalized along its only dim): the norm of each element
        # on its own, as torch's `norm_except_dim`; `vector_norm(dim=[])` would take all.
        norm = (
            torch.linalg.vector_norm(weight_v, dim=dims, keepdim=True) if dims else weight_v.abs()
        )
        return weight_v * (weight_g / norm)

    return forward


def _hook_weight_norm(hook: Any) -> Any:
    def compute_weight(module: nn.Module) -> Tensor:
        g = getattr(module, hook.name + "_g")
        v = getattr(module, hook.name + "_v")
        return _weight_norm_forward(hook)(g, v)

    return compute_weight


def _hook_spectral_norm(hook: Any) -> Any:
    def compute_weight(module: nn.Module, do_power_iteration: bool) -> Tensor:
        # As torch's, with the power iteration out of place (see _spectral_norm_forward).
        weight = getattr(module, hook.name + "_orig")
        u0, v0 = getattr(module, hook.name + "_u"), getattr(module, hook.name + "_v")
        weight_mat = hook.reshape_weight_to_matrix(weight)
        u, v = u0, v0
        if do_power_iteration and hook.n_power_iterations > 0:
            with torch.no_grad():
                for _ in range(hook.n_power_iterations):
                    v = F.normalize(torch.mv(weight_mat.t(), u), dim=0, eps=hook.eps)
                    u = F.normalize(torch.mv(weight_mat, v), dim=0, eps=hook.eps)
                u0.copy_(u)
                v0.copy_(v)
            u, v = u0.clone(), v0.clone()
        return weight / torch.dot(u, torch.mv(weight_mat, v))

    return compute_weight


def _spectral_norm_forward(m: Any) -> Any:
    def forward(weight: Tensor) -> Tensor:
        # torch's power iteration writes into `_u` and `_v` with `out=`, which vmap cannot
        # batch: the same steps out of place, then one in-place copy into the per-sample
        # buffers the call provides.
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=m.eps)
        weight_mat = m._reshape_weight_to_matrix(weight)
        with torch.no_grad():
            u, v = m._u, m._v
            for _ in range(m.n_power_iterations):
                u = F.normalize(torch.mv(weight_mat, v), dim=0, eps=m.eps)
                v = F.normalize(torch.mv(weight_mat.H, u), dim=0, eps=m.eps)
            m._u.copy_(u)
            m._v.copy_(v)
        u, v = m._u.clone(), m._v.clone()
        return weight / torch.vdot(u, torch.mv(weight_mat, v))

    return forward


def _embedding_forward(m: nn.Embedding, sampled: bool) -> Any:
    def forward(input: Tensor) -> Tensor:
        weight = m.weight
        if m.max_norm is not None:
            # torch.embedding_renorm_ has no batching rule: the same renormalization of the
            # rows `input` uses, as one in-place multiplication of the sample's own weight.
            with torch.no_grad():
                rows = torch.zeros(weight.shape[-2], dtype=torch.bool, device=weight.device)
                used = rows.index_fill(0, input.reshape(-1), True)
                norms = torch.linalg.vector_norm(weight, ord=m.norm_type, dim=-1, keepdim=True)
                scale = torch.where(
                    used.unsqueeze(-1) & (norms > m.max_norm), m.max_norm / (norms + 1e-7), 1.0
                )
                weight.mul_(scale)
        if m.padding_idx is None or not sampled:
            return F.embedding(
                input, weight, m.padding_idx, None, m.norm_type, m.scale_grad_by_freq, m.sparse
            )
        # torch's batching rule, where both the weight and the indices have the sample dim,
        # keeps the gradient from the padding row of the first sample's weight only: the
        # rows read at padding positions are taken without a gradient instead.
        out = F.embedding(input, weight, None, None, m.norm_type, m.scale_grad_by_freq, m.sparse)
        return torch.where((input == m.padding_idx).unsqueeze(-1), out.detach(), out)

    return forward


def _linear_types() -> tuple[type, ...]:
    zuko_nn = sys.modules.get("zuko.nn")
    return (nn.Linear,) if zuko_nn is None else (nn.Linear, zuko_nn.Linear)


def _name(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


def updated_buffers(st: Structure, module: nn.Module) -> list[str]:
    r"""Returns the buffers that a vectorized call updates per sample: the running
    statistics of train-mode batch and instance normalization, the singular vectors of a
    train-mode spectral normalization (either kind)."""

    names = []
    for prefix, m in st.find(module, (BatchNorm, InstanceNorm, SpectralNorm)):
        p = f"{prefix}." if prefix else ""
        if isinstance(m, SpectralNorm):
            names += [p + "_u", p + "_v"] if m.training else []
        elif _tracks(m) and m.momentum is not None:
            names += [p + "running_mean", p + "running_var", p + "num_batches_tracked"]
    for prefix, hook in st.hooked:
        p = f"{prefix}." if prefix else ""
        if type(hook) is HookSpectralNorm and st.sub(module, prefix).training:
            names += [f"{p}{hook.name}_u", f"{p}{hook.name}_v"]
    return [name for name in names if name in st.buffers]


def _torchs_tel(m: nn.TransformerEncoderLayer) -> bool:
    r"""Whether an encoder layer runs torch's own forward and blocks, where its `training`
    flag only gates the fast path: a subclass's may read it (stochastic depth, LayerDrop),
    and keeps its flag (its fast path, if taken, fails under vmap: the loop runs it)."""

    tel = nn.TransformerEncoderLayer
    return all(
        getattr(type(m), a) is getattr(tel, a) for a in ("forward", "_sa_block", "_ff_block")
    )


def changes(
    st: Structure, module: nn.Module, sampled: Collection[str] = ()
) -> list[tuple[Any, str, Any]]:
    r"""Returns the changes that prepare the torch layers of `module` for a vectorized
    pass in which the parameters `sampled` are batched: `(instance, attribute, value)`."""

    changes: list[tuple[Any, str, Any]] = []

    def put(m: nn.Module, forward: Any) -> None:
        # A local call's count of the layer's calls (`LocalPlan.counters`), kept.
        count = getattr(vars(m).get("forward"), "_bayesflow_count", None)
        if count is not None:
            forward = _counted(forward, count)
        changes.append((m, "forward", ours(forward)))

    if not is_compiling():
        # The name first: reading `m.weight` of a parametrized layer runs its
        # parametrization (a power iteration on the module's own `_u`, a random mask).
        # Under autocast, every linear layer and convolution (a batched input runs torch's
        # rules too, below autocast) but those whose forward bayesflow set already (a
        # local call's).
        casts = torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
        for prefix, m in st.find(module, _linear_types()):
            # (`m.weight` last, and not of a parametrized layer it would not prepare:
            # reading it runs the parametrization on the module's own tensors)
            cast = casts and "forward" not in vars(m) and not is_parametrized(m)
            wanted = _name(prefix, "weight") in sampled or cast
            if wanted and is_linear(m) and m.weight.dim() == 2:
                put(m, _linear_forward(m))
        for prefix, m in st.find(module, ConvNd):
            if not is_conv(m):
                continue
            if _name(prefix, "weight") in sampled or (casts and "forward" not in vars(m)):
                put(m, _conv_forward(m))
    for prefix, m in st.find(module, _STANDINS):
        if has_own_forward(m):
            continue  # a forward set on the instance runs as it is
        if isinstance(m, nn.RNNBase) and type(m).forward in _RNN_FORWARDS:
            put(m, rnn_forward(m))
        elif isinstance(m, nn.RNNCellBase) and type(m).forward in _CELL_FORWARDS:
            put(m, cell_forward(m))
        elif isinstance(m, nn.MultiheadAttention) and type(m).forward is _MHA_FORWARD:
            put(m, _attention_forward(m))
            if not m.training:
                # The reference path in eval mode: "training" with no dropout.
                changes += [(m, "training", True), (m, "dropout", 0.0)]
        elif isinstance(m, nn.TransformerEncoderLayer) and not m.training and _torchs_tel(m):
            changes.append((m, "training", True))  # its own flag only gates the fast path
        elif isinstance(m, nn.TransformerEncoder) and type(m).forward is _ENCODER_FORWARD:
            if _nests(m):  # read before its first layer's flag changes
                put(m, _encoder_forward(m))
        elif type(m) is WeightNorm:
            put(m, _weight_norm_forward(m))
        elif type(m) is SpectralNorm and m.training:
            put(m, _spectral_norm_forward(m))
        elif isinstance(m, nn.Embedding) and type(m).forward is _EMBEDDING_FORWARD:
            sampled_weight = _name(prefix, "weight") in sampled
            if m.max_norm is not None or (m.padding_idx is not None and sampled_weight):
                put(m, _embedding_forward(m, sampled_weight))

    for _, hook in st.hooked:
        if type(hook) is HookWeightNorm:
            changes.append((hook, "compute_weight", _hook_weight_norm(hook)))
        elif type(hook) is HookSpectralNorm:
            changes.append((hook, "compute_weight", _hook_spectral_norm(hook)))

    return changes


def hint(st: Structure, module: nn.Module, err: BaseException, randomness: str | None) -> str:
    r"""Returns advice for a vectorized call that failed with `err`."""

    text = str(err)
    if ("randomness" in text or "random operation" in text) and randomness == "different":
        return (
            "; fn draws random numbers in place into a tensor shared by the samples, which "
            "vmap cannot batch even with randomness='different' (torch.distributions' "
            "sample and rsample do): to sample a flow, use bayesflow.flow_sample, which "
            "draws the noise outside vmap"
        )
    if "randomness" in text or "random operation" in text:
        return (
            "; fn draws random numbers (e.g. dropout in training mode): pass "
            "randomness='different' for independent draws per sample, or call module.eval()"
        )
    for _, m in st.find(module, (BatchNorm, InstanceNorm)):
        if _tracks(m) and m.momentum is None:
            return (
                f"; {type(m).__name__} with momentum=None (a cumulative average) cannot "
                "update its running statistics per sample: set a momentum, or call "
                "module.eval()"
            )
    return ""
