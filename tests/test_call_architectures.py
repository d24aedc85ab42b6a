r"""Every common architecture under vmap_call(fallback=False): the loop's numbers, a
deep-copy oracle's numbers (independent of bayesflow's swap), gradients, state."""

import copy
import gc
import math
import warnings
import weakref

import pytest
import torch

import bayesflow as bf

from bayesflow import _engine, _recurrent

from .registry import ARCHS

N = 3


def leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if out is None:
        return []
    if isinstance(out, dict):
        return [t for v in out.values() for t in leaves(v)]
    return [t for o in out for t in leaves(o)]


def call(arch, module, *args):
    return module(*args) if arch.fn is None else arch.fn(module, *args)


def setup(name):
    arch = ARCHS[name]
    module = arch.build()
    module.train(arch.train)
    q = bf.init(module, init_logvar=arch.logvar, include=arch.include, exclude=arch.exclude)
    return arch, module, q, arch.args()


def oracle(arch, module, params, args):
    r"""Sample k copied into a deep copy of the module (each from the same initial state)."""

    outs, states = [], []
    for m in sample_copies(module, params):
        with torch.no_grad():
            outs.append(leaves(call(arch, m, *args)))
        states.append({name: b.clone() for name, b in m.named_buffers()})
    return [torch.stack(ts) for ts in zip(*outs, strict=True)], states


def sample_copies(module, params):
    r"""Deep copies of `module`, copy k holding sample k of `params` (the oracle's copies)."""

    copies = [copy.deepcopy(module) for _ in range(next(iter(params.values())).shape[0])]
    with torch.no_grad():
        for i, m in enumerate(copies):
            for name, v in params.items():
                m.get_parameter(name).copy_(v[i])
    return copies


def expected_buffers(states):
    r"""The documented rule: floating buffers average the samples' updates."""

    out = {}
    for name in states[0]:
        values = [s[name] for s in states]
        out[name] = torch.stack(values).mean(0) if values[0].is_floating_point() else values[0]
    return out


@pytest.mark.parametrize("name", ARCHS)
def test_native_matches_loop_and_oracle(name, gen):
    arch, module, q, args = setup(name)
    params = {k: v.detach() for k, v in bf.sample(q, N, generator=gen(1)).items()}
    looped, initial = copy.deepcopy(module), copy.deepcopy(module)
    objects = dict(module.named_parameters(remove_duplicate=False))
    values = {k: p.detach().clone() for k, p in objects.items()}

    y = leaves(bf.vmap_call(module, params, *args, fn=arch.fn, fallback=False))
    y_loop = leaves(bf.loop_call(looped, params, *args, fn=arch.fn))
    y_oracle, states = oracle(arch, initial, params, args)

    assert len(y) == len(y_loop) == len(y_oracle) > 0
    for a, b, c in zip(y, y_loop, y_oracle, strict=True):
        assert a.shape[0] == N
        assert torch.allclose(a, b, atol=1e-10)  # float64
        assert torch.allclose(a, c, atol=1e-10)
    # the sampled parameters were used: sample 0 is not the module's own output
    plain = leaves(call(arch, copy.deepcopy(initial), *args))
    assert not torch.allclose(y[0][0], plain[0], atol=1e-6)
    assert not torch.allclose(y[0][0], y[0][1], atol=1e-6)

    # the module holds its very own Parameters, unchanged, in every place (tied ones too)
    after = dict(module.named_parameters(remove_duplicate=False))
    assert after.keys() == objects.keys()
    assert all(after[k] is objects[k] and torch.equal(after[k], values[k]) for k in objects)
    # buffers: one update per call, the average of the samples' updates
    expected = expected_buffers(states)
    for m in (module, looped):
        for b_name, b in m.named_buffers():
            assert torch.allclose(b, expected[b_name], atol=1e-12), b_name


@pytest.mark.parametrize("name", ARCHS)
def test_gradients_match_loop(name, gen):
    arch, module, q, args = setup(name)

    def grads(runner, m):
        params = bf.sample(q, N, generator=gen(2))
        y = leaves(runner(m, params, *args, fn=arch.fn))
        loss = sum(t.square().sum() for t in y if t.is_floating_point())
        return torch.autograd.grad(loss, [*q.mean.values(), *q.logvar.values()])

    g_vmap = grads(lambda *a, **k: bf.vmap_call(*a, **k, fallback=False), copy.deepcopy(module))
    g_loop = grads(bf.loop_call, copy.deepcopy(module))

    for a, b in zip(g_vmap, g_loop, strict=True):
        assert torch.allclose(a, b, atol=1e-9)
    assert all(g.abs().sum() > 0 for g in g_vmap)


@pytest.mark.parametrize("name", ARCHS)
def test_objective_and_bridge(name, gen):
    arch, module, q, args = setup(name)

    def ll(m, *a):
        return -leaves(call(arch, m, *a))[0].square()

    def loss(vectorized):
        g = gen(3)
        return bf.nelbo(
            copy.deepcopy(module),
            q,
            *args,
            fn=ll,
            num_data=100,
            n=N,
            generator=g,
            vectorized=vectorized,
        )

    assert torch.allclose(loss(True), loss(False), atol=1e-10)

    bnet = bf.BayesianModel(
        copy.deepcopy(module),
        init_logvar=arch.logvar,
        include_params=arch.include,
        exclude_params=arch.exclude,
    )
    out = leaves(bnet(*args, n=N, fn=arch.fn, fallback=False))
    assert out[0].shape[0] == N
    assert not torch.allclose(out[0][0], out[0][1], atol=1e-10)  # the samples were used
    out[0].square().sum().backward()
    assert all(p.grad is not None for p in bnet.means.values())


RECURRENT = [name for name, arch in ARCHS.items() if isinstance(arch.build(), torch.nn.RNNBase)]


def spy_fused(monkeypatch):
    r"""Returns the list of modes that torch's fused recurrent kernel is fetched for."""

    calls, fused_rnn = [], _recurrent.fused_rnn

    def spy(mode):
        calls.append(mode)
        return fused_rnn(mode)

    monkeypatch.setattr(_recurrent, "fused_rnn", spy)
    return calls


@pytest.mark.parametrize("fused", [True, False], ids=["fused-per-sample", "batched-steps"])
@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_paths(name, fused, monkeypatch, gen):
    r"""A recurrent layer has two vectorized paths (torch's fused kernel per sample, below
    vmap, and bayesflow's batched steps): each gives the loop's and the oracle's numbers
    and gradients, and the path forced is the one taken."""

    calls = spy_fused(monkeypatch)
    with _recurrent.forced(fused):
        test_native_matches_loop_and_oracle(name, gen)
        test_gradients_match_loop(name, gen)
    assert bool(calls) == fused


R = torch.randn
BAD_STATES = {
    "lstm-c0-batch": (lambda: torch.nn.LSTM(3, 4), lambda: (R(5, 2, 3), (R(1, 2, 4), R(1, 1, 4)))),
    "lstm-proj-c0-size": (
        lambda: torch.nn.LSTM(3, 4, proj_size=2),
        lambda: (R(5, 2, 3), (R(1, 2, 2), R(1, 2, 1))),
    ),
    "gru-cell-unbatched-hx": (lambda: torch.nn.GRUCell(3, 4), lambda: (R(2, 3), R(4))),
    "lstm-cell-c-batch": (lambda: torch.nn.LSTMCell(3, 4), lambda: (R(2, 3), (R(2, 4), R(1, 4)))),
    "rnn-cell-hx-size": (lambda: torch.nn.RNNCell(3, 4), lambda: (R(2, 3), R(2, 5))),
}


@pytest.mark.parametrize("case", BAD_STATES)
@pytest.mark.parametrize("fallback", [True, False])
def test_initial_states_of_the_wrong_shape_raise_as_in_torch(case, fallback, gen):
    # torch refuses them; bayesflow's recurrence broadcast them into numbers.
    build, args = BAD_STATES[case]
    module, args = build(), args()
    params = bf.sample(bf.init(module, -2.0), 3, generator=gen(0))
    with pytest.raises(RuntimeError):
        module(*args)
    with pytest.raises(RuntimeError):
        bf.loop_call(module, params, *args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bf.VmapFallbackWarning)
        with pytest.raises(RuntimeError):
            bf.vmap_call(module, params, *args, fallback=fallback)


def test_recurrent_path_choice():
    r"""The measured rule: the fused kernel where oneDNN runs it (float32 LSTMs on the
    CPU) for training and small K; the batched steps for GRU, RNN and float64."""

    x32, x64 = torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float64)
    pays = _recurrent._fused_pays_off
    assert not pays("GRU", x32, 4, 64) and not pays("RNN_TANH", x32, 4, 64)
    assert not pays("LSTM", x64, 4, 64)
    if torch.backends.mkldnn.is_available():
        with torch.no_grad():
            assert pays("LSTM", x32, 8, 2048) and not pays("LSTM", x32, 32, 2048)
            assert pays("LSTM", x32, 32, 16384)
        with torch.enable_grad():
            assert pays("LSTM", x32, 64, 2048)


def test_lstm_float32_default_path(monkeypatch):
    r"""The default path of a float32 LSTM (the fused kernel per sample, on the CPU, where
    oneDNN runs it) equals the loop, forward and backward, and the samples change the
    output."""

    calls = spy_fused(monkeypatch)
    module = torch.nn.LSTM(3, 5, num_layers=2, batch_first=True).float()
    x = torch.randn(2, 4, 3, dtype=torch.float32)
    q = bf.init(module, init_logvar=-3.0)
    params = bf.sample(q, 3, generator=torch.Generator().manual_seed(0))
    y, (h, c) = bf.vmap_call(module, params, x, fallback=False)
    assert bool(calls) == torch.backends.mkldnn.is_available()
    y_loop, (h_loop, c_loop) = bf.loop_call(module, params, x)
    for a, b in ((y, y_loop), (h, h_loop), (c, c_loop)):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(y[0], y[1], atol=1e-4)
    g = torch.autograd.grad(y.square().sum(), list(q.mean.values()), retain_graph=True)
    g_loop = torch.autograd.grad(y_loop.square().sum(), list(q.mean.values()))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g, g_loop, strict=True))


@pytest.mark.parametrize("fused", [False, True])
def test_recurrent_bad_inputs_get_torchs_errors(fused, gen):
    r"""What torch refuses, the vectorized layers refuse with torch's message, at every K
    and with either fallback: a stacked LSTM state (unpacked along its first dim), inputs
    of another size or dtype (kernel internals that named neither)."""

    lstm, cell = torch.nn.LSTM(3, 5), torch.nn.LSTMCell(3, 5)
    gru, gru_cell = torch.nn.GRU(3, 5), torch.nn.GRUCell(3, 5)
    h = torch.zeros(1, 2, 5)
    cases = [
        (lstm, (torch.randn(4, 2, 3), torch.stack([h, h])), TypeError, "hx"),
        (cell, (torch.randn(2, 3), torch.stack([h[0], h[0]])), TypeError, "hx"),
        (gru, (torch.randn(4, 2, 3), (h,)), AttributeError, "expected hx to be a tensor"),
        (gru, (torch.randn(4, 2, 4),), RuntimeError, "Expected 3, got 4"),
        (gru_cell, (torch.randn(2, 4),), RuntimeError, "got 4 expected 3"),
        (gru, (torch.ones(4, 2, 3, dtype=torch.long),), ValueError, "does not match weight"),
    ]
    with _recurrent.forced(fused):
        for module, args, error, match in cases:
            with pytest.raises(error):
                module(*args)
            for k in (1, 3):
                params = bf.sample(bf.init(module), k, generator=gen(k))
                with pytest.raises(error):
                    bf.vmap_call(module, params, *args)
                with pytest.raises(error):
                    bf.loop_call(module, params, *args)
            with pytest.raises(RuntimeError, match=match):
                bf.vmap_call(module, params, *args, fallback=False)


CONVS = [
    name
    for name, arch in ARCHS.items()
    if any(
        isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
        and "weight" in m._parameters
        for m in arch.build().modules()
    )
]


@pytest.mark.parametrize("name", CONVS)
def test_conv_paths(name, monkeypatch, gen):
    r"""A convolution with sampled weights has two vectorized paths (one grouped convolution
    of all samples, or a dense one per sample below vmap, for large samples): the path
    forced here, the per-sample one, gives the loop's and the oracle's numbers too."""

    from bayesflow import _torch_layers

    calls = []
    batched_conv = _torch_layers.batched_conv

    def spy(m, x, weight, bias):
        calls.append(m)
        return batched_conv(m, x, weight, bias)

    monkeypatch.setattr(_torch_layers, "CONV_LOOP_ELEMENTS", 0)
    monkeypatch.setattr(_torch_layers, "batched_conv", spy)
    test_native_matches_loop_and_oracle(name, gen)
    test_gradients_match_loop(name, gen)
    assert calls


def _attention_case(layout, masks, bias):
    r"""An attention call where query 0 of sequence 0 sees no key (left padding under a
    causal mask) and every other query some; with padding alone (or one sequence and
    padding), every query sees some key."""

    g = torch.Generator().manual_seed(0)
    E, H, L, B = 8, 2, 4, 2
    mha = torch.nn.MultiheadAttention(E, H, bias=bias, batch_first=layout == "batch-first")
    x = torch.randn(B, L, E, generator=g)
    pad = torch.tensor([[True, False, False, False], [False] * L])
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    kpm, am = None, None
    if "padding" in masks:
        kpm = pad
    if "causal" in masks:
        am = causal
    if "per-batch" in masks:  # a 3-D mask, the same in every head
        am = (causal | pad[:, None, :]).repeat_interleave(H, dim=0)
    if "float" in masks:
        kpm = None if kpm is None else torch.zeros(kpm.shape).masked_fill(kpm, -math.inf)
        am = None if am is None else torch.zeros(am.shape).masked_fill(am, -math.inf)
    if layout == "seq-first":
        x = x.transpose(0, 1)
    if layout == "unbatched":
        x, kpm = x[0], None if kpm is None else kpm[0]
        am = am if am is None or am.dim() == 2 else am[:H]

    def fn(m, x):
        return m(x, x, x, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0]

    return mha, x, fn


ATTENTION_MASKS = ["padding", "padding-causal", "float-padding-causal", "per-batch"]


@pytest.mark.parametrize("per_head", [False, True])
def test_attention_masks_given_per_sample(per_head, gen):
    # Masks vmap batches (in_dims=0): which rows they mask cannot be read there. A row
    # masked in one head only gave NaN (the explicit softmax) without a word; torch's own
    # path gives that head zero attention there. Oracle: the loop.
    E, H, L, B, K = 8, 2, 3, 2, 3
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True)
    params = bf.sample(bf.init(mha, -4.0), K, generator=gen(1))
    x = torch.randn(B, L, E, generator=gen(2))
    if per_head:
        masks = torch.zeros(K, B * H, L, L, dtype=torch.bool)
        masks[1, 0, 1, :] = True  # sample 1, example 0, head 0: row 1 sees no key
    else:
        masks = torch.zeros(K, B, L, dtype=torch.bool)
        masks[1, 0, :] = True  # sample 1, example 0: every key padded
    key = "attn_mask" if per_head else "key_padding_mask"
    fn = lambda m, x, mask: m(x, x, x, need_weights=False, **{key: mask})[0]
    ref = bf.loop_call(mha, params, x, masks, fn=fn, in_dims=(None, 0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)  # torch's
        out = bf.vmap_call(mha, params, x, masks, fn=fn, in_dims=(None, 0), fallback=False)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert not torch.allclose(out[0], out[2])


@pytest.mark.parametrize("masks", ATTENTION_MASKS)
@pytest.mark.parametrize("layout", ["batch-first", "seq-first", "unbatched"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval-grad"])
def test_attention_rows_whose_keys_are_all_masked(masks, layout, bias, train, gen):
    # torch's path without weights gives such a row zero attention (out_proj's bias), the
    # explicit softmax NaN: NaN outputs and NaN gradients for every weight. The oracles:
    # the loop, and a deep copy with sample k loaded.
    mha, x, fn = _attention_case(layout, masks, bias)
    mha.train(train)  # dropout 0: train mode differs only in torch's choice of path
    q = bf.init(mha, -2.0)
    params = bf.sample(q, 3, generator=gen(0))
    out = bf.vmap_call(mha, params, x, fn=fn, fallback=False)
    ref = bf.loop_call(mha, params, x, fn=fn)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for k in range(3):
        m = copy.deepcopy(mha)
        with torch.no_grad():
            for name, v in params.items():
                m.get_parameter(name).copy_(v[k])
        torch.testing.assert_close(out[k], fn(m, x), rtol=0, atol=1e-12)
    assert not torch.allclose(out[0], out[1])
    weights = [q.mean["in_proj_weight"], q.logvar["in_proj_weight"]]
    grads = [torch.autograd.grad(o.square().sum(), weights, retain_graph=True) for o in (out, ref)]
    for a, b in zip(*grads, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("floating", [False, True], ids=["bool", "float"])
def test_attention_is_causal_without_weights_takes_the_causal_mask(
    train, grad, batch_first, floating, gen
):
    # With is_causal, no padding mask and no weights, torch's reference path attends
    # causally whatever attn_mask holds (its hint); the stand-in took the mask as given:
    # 0.4 off the loop. Torch's fused fast path (eval, no gradients, batch-first
    # self-attention, a boolean mask) reads attn_mask as given: there the stand-in must
    # too (2.2 off); a float mask never takes it (0.48 off).
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first).train(train)
    x = torch.randn(4, 2, 8, generator=gen(1))  # 4 positions of 2 sequences
    x = x.transpose(0, 1) if batch_first else x
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = True  # not the causal mask
    if floating:
        mask = torch.zeros(4, 4).masked_fill(mask, -math.inf)

    def fn(m, x):
        return m(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]

    params = bf.sample(bf.init(mha, -2.0), 3, generator=gen(0))
    with torch.set_grad_enabled(grad):
        out = bf.vmap_call(mha, params, x, fn=fn, fallback=False)
        expected = torch.stack([fn(m, x) for m in sample_copies(mha, params)])
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(out, bf.loop_call(mha, params, x, fn=fn), rtol=0, atol=1e-12)
    assert not torch.allclose(out[0], out[1])


def _padded_encoder(batch_first, norm):
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
    norm = torch.nn.LayerNorm(8) if norm else None
    return torch.nn.TransformerEncoder(layer, 2, norm=norm, enable_nested_tensor=True).eval()


@pytest.mark.filterwarnings("ignore:.*nested:UserWarning")
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize(
    "how", ["no-grad", "frozen", "grad", "right-padded", "float-mask", "minus-one", "unchecked"]
)
def test_an_eval_encoder_gives_padded_positions_torchs_values(batch_first, norm, how, gen):
    # An eval-mode batch-first encoder given a left-aligned padding mask, recording no
    # gradients, runs torch's nested-tensor path: zeros at the padded positions (the
    # norm's bias after a LayerNorm). The vectorized pass computed them as in training
    # (1.6 off the loop). Recording gradients, or with padding on the left, torch computes
    # them too. A float mask of -1 drops the padded tokens there (not a bias of -1), and
    # without the mask check torch keeps the first tokens of each row, as many as the mask
    # keeps.
    enc = _padded_encoder(batch_first, norm)
    enc.mask_check = how != "unchecked"
    x = torch.randn(2, 4, 8, generator=gen(1))
    pad = torch.tensor([[False, False, True, True], [False] * 4])
    if how in ("right-padded", "unchecked"):
        pad = pad.flip(-1)
    mask = pad
    if how in ("float-mask", "minus-one"):
        mask = torch.zeros(pad.shape).masked_fill(pad, -math.inf if how == "float-mask" else -1.0)
    if not batch_first:
        x = x.transpose(0, 1)

    def fn(m, x):
        return m(x, src_key_padding_mask=mask)

    q = bf.init(enc, -2.0)
    params = bf.sample(q, 3, generator=gen(0))
    if how == "frozen":  # gradients on, nothing to record them for
        enc.requires_grad_(False)
        params = {k: v.detach() for k, v in params.items()}
    with torch.set_grad_enabled(how in ("frozen", "grad")):
        out = bf.vmap_call(enc, params, x, fn=fn, fallback=False)
        ref = bf.loop_call(enc, params, x, fn=fn)
        expected = torch.stack([fn(m, x) for m in sample_copies(enc, params)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert not torch.allclose(out[0], out[1])
    # torch nests batch-first encoders only; after a LayerNorm, zeros are its bias.
    # Unchecked, the positions 2 and 3 of the first row are zeros, whatever the mask.
    padded = out[:, 0, 2] if batch_first else out[:, 2, 0]
    fill = params["norm.bias"] if norm else torch.zeros_like(padded)
    nested = batch_first and how in ("no-grad", "frozen", "float-mask", "minus-one", "unchecked")
    assert torch.allclose(padded, fill, rtol=0, atol=1e-12) == nested
    if how == "grad":
        grads = torch.autograd.grad(out.square().sum(), q.mean["layers.0.linear1.weight"])
        assert grads[0].abs().sum() > 0


def test_attention_rows_dead_in_some_heads_only_fall_back(gen):
    # A per-head mask that hides every key from a query in one head only: not vectorized,
    # and said so; the loop's numbers.
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 4, 8)
    am = torch.zeros(4, 4, 4, dtype=torch.bool)
    am[0, 0] = True  # sequence 0, head 0, query 0
    fn = lambda m, x: m(x, x, x, attn_mask=am, need_weights=False)[0]
    params = bf.sample(bf.init(mha, -2.0), 3, generator=gen(0))
    with pytest.warns(bf.VmapFallbackWarning, match="some heads only"):
        out = bf.vmap_call(mha, params, x, fn=fn)
    torch.testing.assert_close(out, bf.loop_call(mha, params, x, fn=fn), rtol=0, atol=0)
    assert not torch.allclose(out[0], out[1])  # the samples were used


def test_attention_float_mask_wider_than_a_half_precision_query(gen):
    # torch's path without weights adds a float32 mask to a half-precision query as it is;
    # the explicit softmax needs it in the query's dtype. In bfloat16 the cast keeps -1e9
    # finite: vectorized, the loop's numbers up to bfloat16 rounding. In float16 it makes
    # -1e9 -inf, which would turn the uniformly attended row 1 into a dead one (zero
    # attention, 2.5 away from the loop): not vectorized, the loop's numbers exactly.
    mask = torch.zeros(4, 4, dtype=torch.float32)
    mask[1] = -1e9  # every key: torch attends this row uniformly
    mask[2, :2] = -1e9
    fn = lambda m, x: m(x, x, x, attn_mask=mask, need_weights=False)[0]
    for dtype in (torch.bfloat16, torch.float16):
        mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).to(dtype)
        x = torch.randn(2, 4, 8, generator=gen(1)).to(dtype)
        params = bf.sample(bf.init(mha, -2.0), 3, generator=gen(0))
        ref = bf.loop_call(mha, params, x, fn=fn)
        assert torch.isfinite(ref).all() and ref[:, :, 1].abs().amax() > 0.1
        assert not torch.allclose(ref[0], ref[1])
        if dtype == torch.bfloat16:
            out = bf.vmap_call(mha, params, x, fn=fn, fallback=False)
            torch.testing.assert_close(out, ref, rtol=0.02, atol=0.02)
        else:
            with pytest.warns(bf.VmapFallbackWarning, match="overflow the query's"):
                out = bf.vmap_call(mha, params, x, fn=fn)
            torch.testing.assert_close(out, ref, rtol=0, atol=0)


class _OwnForwardLSTM(torch.nn.LSTM):
    r"""An LSTM whose class has a forward of its own: no stand-in replaces it, so vmap
    meets torch's fused kernel (no batching rule)."""

    def forward(self, x, hx=None):
        return super().forward(x, hx)


RECURRENT_LAYERS = {
    "rnn": lambda: torch.nn.RNN(3, 4, num_layers=2),
    "gru": lambda: torch.nn.GRU(3, 4, num_layers=2, bidirectional=True),
    "lstm-proj": lambda: torch.nn.LSTM(3, 4, num_layers=2, proj_size=2),
}


def flat_weights_are_own(m):
    r"""Whether torch's cache of the layer's weights holds the layer's own tensors."""

    own = [getattr(m, name) for name in m._flat_weights_names]
    return (
        len(m._flat_weights) == len(m._flat_weight_refs) == len(own)
        and all(w is o for w, o in zip(m._flat_weights, own, strict=True))
        and all(r() is o for r, o in zip(m._flat_weight_refs, own, strict=True))
    )


def deep_copy_oracle(module, params, x):
    r"""Sample k copied into a deep copy of the module, run by torch alone."""

    outs = []
    for k in range(next(iter(params.values())).shape[0]):
        m = copy.deepcopy(module)
        with torch.no_grad():
            for name, v in params.items():
                m.get_parameter(name).copy_(v[k])
            outs.append(m(x)[0])
    return torch.stack(outs)


def refs_to(tensors):
    r"""Weak references to `tensors` and to the draws they are views of."""

    tensors = list(tensors)
    return [weakref.ref(t) for t in tensors + [t._base for t in tensors if t._base is not None]]


def run_recurrent(how, module, q, x, gen, monkeypatch):
    r"""Runs `module` on `x` with samples of `q` in the way `how`; returns the output, the
    samples it used (stacked) and weak references to everything the samples keep alive."""

    if how == "reparameterize":
        bnet = bf.BayesianModel(module, init_logvar=-2.0)
        params = {
            k: v.detach().unsqueeze(0) for k, v in bnet.sample_params(generator=gen(4)).items()
        }
        with bnet.reparameterize(generator=gen(4)) as base:
            refs = refs_to(base._parameters[name] for name in params)
            y = base(x)[0].unsqueeze(0)
        return y, params, refs
    n = 1 if how == "one-sample" else 3
    sampled = bf.sample(q, n, generator=gen(1))  # differentiable: a graph to q
    refs = refs_to(sampled.values())
    params = {k: v.detach() for k, v in sampled.items()}
    if how == "loop":
        y = bf.loop_call(module, sampled, x)[0]
    elif how == "one-by-one":  # the footprint rule picks the loop (once measured)
        chosen = []
        monkeypatch.setattr(_engine, "one_by_one", lambda size: chosen.append(size) or True)
        bf.vmap_call(module, sampled, x)
        y = bf.vmap_call(module, sampled, x)[0]
        assert chosen
    elif how == "auto-chunks":  # a footprint pass, then vmap
        y = bf.vmap_call(module, sampled, x, chunk_size="auto")[0]
    else:
        y = bf.vmap_call(module, sampled, x)[0]
    return y, params, refs


@pytest.mark.parametrize(
    "how", ["loop", "one-sample", "one-by-one", "auto-chunks", "reparameterize"]
)
@pytest.mark.parametrize("layer", RECURRENT_LAYERS)
def test_recurrent_layers_keep_their_own_weights_cached(layer, how, monkeypatch, gen):
    r"""torch's forward caches a recurrent layer's weights (`_flat_weights`): after a call
    that ran it with samples, the cache holds the layer's own Parameters again, and
    nothing in the module keeps a sample (its whole draw, its graph) alive."""

    module = RECURRENT_LAYERS[layer]()
    q = bf.init(module, init_logvar=-2.0)
    x = torch.randn(5, 2, 3)
    plain = module(x)[0]
    assert flat_weights_are_own(module)

    y, params, refs = run_recurrent(how, module, q, x, gen, monkeypatch)

    assert flat_weights_are_own(module)  # before the oracle, whose deep copy refreshes it
    expected = deep_copy_oracle(module, params, x)
    assert torch.allclose(y, expected, atol=1e-10)  # float64
    assert not torch.allclose(y[0], plain, atol=1e-6)  # the samples were used
    del y, params
    gc.collect()
    assert all(r() is None for r in refs)
    assert torch.equal(module(x)[0], plain)


@pytest.mark.parametrize("fallback", [True, False])
def test_recurrent_layer_with_its_own_forward_keeps_its_weights_cached(fallback, gen):
    r"""An RNN subclass with its own forward: vmap cannot run it. Falling back, or raising,
    the call leaves its weight cache holding its own Parameters, not a sample or a dead
    vmap tensor."""

    module = _OwnForwardLSTM(3, 4)
    x = torch.randn(5, 2, 3)
    plain = module(x)[0]
    sampled = bf.sample(bf.init(module, init_logvar=-2.0), 3, generator=gen(1))
    refs = refs_to(sampled.values())
    params = {k: v.detach() for k, v in sampled.items()}
    if fallback:
        with pytest.warns(bf.VmapFallbackWarning, match="vmap cannot run _OwnForwardLSTM"):
            y = bf.vmap_call(module, sampled, x)[0]
    else:
        with pytest.raises(RuntimeError, match="vmap cannot run _OwnForwardLSTM"):
            bf.vmap_call(module, sampled, x, fallback=False)

    # Before the oracle: a deep copy of a recurrent layer refreshes its cache.
    assert flat_weights_are_own(module)
    if fallback:
        assert torch.allclose(y, deep_copy_oracle(module, params, x), atol=1e-10)
        assert not torch.allclose(y[0], plain, atol=1e-6)
        del y
    del sampled, params
    gc.collect()
    assert all(r() is None for r in refs)
    assert torch.equal(module(x)[0], plain)


@pytest.mark.parametrize("n", [1, 3])
def test_parametrized_recurrent_layer_keeps_its_weights_cached(n, gen):
    r"""A recurrent layer whose weight a parametrization computes (from the sample's
    `original`s, in a submodule of the layer): its weight cache is left as found."""

    module = torch.nn.utils.parametrizations.weight_norm(torch.nn.GRU(3, 4), "weight_hh_l0")
    x = torch.randn(5, 2, 3)
    with torch.no_grad():  # torch's forward with gradients caches a weight deepcopy refuses
        plain = module(x)[0]
    cached, items = module._flat_weights, list(module._flat_weights)
    sampled = bf.sample(bf.init(module, init_logvar=-2.0), n, generator=gen(1))
    refs = refs_to(sampled.values())
    params = {k: v.detach() for k, v in sampled.items()}

    y = (bf.loop_call if n > 1 else bf.vmap_call)(module, sampled, x)[0]

    assert module._flat_weights is cached
    assert all(a is b for a, b in zip(module._flat_weights, items, strict=True))
    with torch.no_grad():
        assert torch.allclose(y, deep_copy_oracle(module, params, x), atol=1e-10)
    assert not torch.allclose(y[0], plain, atol=1e-6)
    del y, sampled, params
    gc.collect()
    assert all(r() is None for r in refs)


class _DropConnect(torch.nn.Module):
    def forward(self, w):
        return torch.nn.functional.dropout(w, 0.3, self.training)


PARAMETRIZED = {
    "spectral-norm": lambda m: torch.nn.utils.parametrizations.spectral_norm(m, "weight_hh_l0"),
    "drop-connect": lambda m: torch.nn.utils.parametrize.register_parametrization(
        m, "weight_hh_l0", _DropConnect()
    ),
    "weight-norm": lambda m: torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l0"),
}


@pytest.mark.parametrize("kind", PARAMETRIZED)
def test_recurrent_layer_with_a_stateful_or_random_parametrization_in_training(kind, gen):
    # The vectorized recurrence read a parametrized weight three times a pass, torch's own
    # forward (the loop) two or four: spectral_norm's power iteration ran another number
    # of steps (outputs 2.9e-3 off, its `_u` 0.089), DropConnect drew other masks. Such a
    # layer now runs the loop; weight_norm, which is pure, stays vectorized.
    torch.manual_seed(0)
    module = PARAMETRIZED[kind](torch.nn.LSTM(3, 4)).train()
    x = torch.randn(5, 2, 3)
    params = bf.sample(bf.init(module, init_logvar=-2.0), 3, generator=gen(1))
    a, b = copy.deepcopy(module), copy.deepcopy(module)

    pure = kind == "weight-norm"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(7)
        y, (h, _) = bf.vmap_call(a, params, x, randomness="same")
    fell_back = [w for w in caught if issubclass(w.category, bf.VmapFallbackWarning)]
    assert bool(fell_back) is not pure
    assert pure or "parametrized weight of a recurrent layer" in str(fell_back[0].message)
    if kind == "drop-connect":  # the oracle of randomness="same": one seed for every sample
        outs = []
        for i in range(3):
            torch.manual_seed(7)
            outs.append(torch.func.functional_call(b, {k: v[i] for k, v in params.items()}, x))
        y_loop, h_loop = torch.stack([o[0] for o in outs]), torch.stack([o[1][0] for o in outs])
    else:
        y_loop, (h_loop, _) = bf.loop_call(b, params, x)
    assert torch.allclose(y, y_loop, rtol=1e-12, atol=1e-14)
    assert torch.allclose(h, h_loop, rtol=1e-12, atol=1e-14)
    for (k, u), (_, v) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        assert torch.allclose(u, v, rtol=1e-12, atol=1e-14), k  # spectral_norm's `_u`
    assert not torch.allclose(y[0], y[1], atol=1e-6)  # the samples were used


@pytest.mark.parametrize("layer", RECURRENT_LAYERS)
def test_one_sample_under_an_outer_vmap(layer, gen):
    r"""One sample under :func:`torch.func.vmap` over the data (as `laplace_fit`'s
    per-example curvature runs): torch's fused kernels have no batching rule, bayesflow's
    recurrence gives the loop's numbers."""

    module = RECURRENT_LAYERS[layer]()
    params = bf.sample(bf.init(module, init_logvar=-2.0), 1, generator=gen(1))
    xs = torch.randn(4, 5, 2, 3)

    y = torch.func.vmap(lambda x: bf.vmap_call(module, params, x)[0])(xs)

    y_loop = torch.stack([bf.loop_call(module, params, x)[0] for x in xs])
    assert torch.allclose(y, y_loop, atol=1e-12)  # float64
    assert not torch.allclose(y[:, 0], torch.stack([module(x)[0] for x in xs]), atol=1e-6)
    assert "forward" not in vars(module)  # the stand-in is gone


@pytest.mark.parametrize("chunk_size", [None, "auto", 1])
@pytest.mark.parametrize("layer", RECURRENT_LAYERS)
def test_samples_under_an_outer_vmap(layer, chunk_size, gen, fresh_caches, monkeypatch):
    # K samples under torch.func.vmap over the data: the passes of one sample at a time
    # (the loop that the CPU cache rule takes for a sample larger than a core's cache,
    # from the second call on, and chunk_size="auto"'s measuring pass) ran torch's fused
    # kernels, which have no batching rule: the second call, or the first with "auto",
    # raised. (Every sample counts as large here.)
    from bayesflow import _engine

    monkeypatch.setattr(_engine, "one_by_one", lambda per_sample: True)
    module = RECURRENT_LAYERS[layer]()
    params = bf.sample(bf.init(module, init_logvar=-2.0), 3, generator=gen(1))
    xs = torch.randn(4, 5, 2, 3)
    y_loop = torch.stack([bf.loop_call(module, params, x)[0] for x in xs])
    for _ in range(2):
        y = torch.func.vmap(lambda x: bf.vmap_call(module, params, x, chunk_size=chunk_size)[0])(
            xs
        )
        assert torch.allclose(y, y_loop, atol=1e-12)  # float64
    assert not torch.allclose(y_loop[:, 0], y_loop[:, 1], atol=1e-6)
    looped = torch.func.vmap(lambda x: bf.loop_call(module, params, x)[0])(xs)
    assert torch.allclose(looped, y_loop, atol=1e-12)
    assert "forward" not in vars(module)


class _GRUNet(torch.nn.Module):
    def __init__(self, outputs):
        super().__init__()
        self.rnn, self.head = torch.nn.GRU(3, 4, batch_first=True), torch.nn.Linear(4, outputs)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _per_example_curvature(net, x, y, likelihood, hessian):
    r"""The oracle: the diagonal GGN or empirical Fisher from explicit per-example
    Jacobians, one autograd pass per example and output (plain torch, float64)."""

    params = dict(net.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(x.shape[0]):
        f = net(x[i : i + 1])[0]
        if hessian == "ef":
            if likelihood == "regression":
                ll = -0.5 * (f - y[i]).square().sum()
            else:
                ll = -torch.nn.functional.cross_entropy(f, y[i])
            rows = [torch.autograd.grad(ll, list(params.values()))]
            lam = torch.ones(1, 1)
        else:
            rows = [torch.autograd.grad(fc, list(params.values()), retain_graph=True) for fc in f]
            if likelihood == "regression":
                lam = torch.eye(f.shape[0])  # sigma = 1
            else:
                p = f.detach().softmax(-1)
                lam = torch.diag(p) - torch.outer(p, p)
        for j, name in enumerate(params):
            jac = torch.stack([r[j].flatten() for r in rows])  # (outputs, size)
            total[name] += torch.einsum("cp,cd,dp->p", jac, lam, jac).view_as(params[name])
    return total


@pytest.mark.parametrize(
    "likelihood, hessian",
    [("regression", "ggn"), ("classification", "ggn"), ("classification", "ef")],
)
def test_laplace_fit_of_a_recurrent_model(likelihood, hessian):
    r"""`laplace_fit` over every parameter of a GRU -> Linear model (the GRU's curvature by
    one sample under vmap over the examples) gives the per-example Jacobians' curvature."""

    outputs = 2 if likelihood == "regression" else 3
    net = _GRUNet(outputs)
    x = torch.randn(6, 5, 3)
    if likelihood == "regression":
        y = torch.randn(6, outputs)
        fn = lambda m, x, y: -0.5 * (m(x) - y).square().sum(-1)
    else:
        y = torch.randint(0, outputs, (6,))
        fn = lambda m, x, y: -torch.nn.functional.cross_entropy(m(x), y, reduction="none")
    output = None if hessian == "ef" else (lambda m, x, y: m(x))

    fit = bf.laplace_fit(
        net, fn, [(x, y)], hessian=hessian, output=output, likelihood=likelihood, include=("",)
    )

    assert flat_weights_are_own(net.rnn)
    expected = _per_example_curvature(copy.deepcopy(net), x, y, likelihood, hessian)
    assert fit.hessian.keys() == expected.keys()
    for name, h in expected.items():
        torch.testing.assert_close(fit.hessian[name], h, rtol=1e-9, atol=1e-12)
    assert fit.hessian["rnn.weight_hh_l0"].abs().sum() > 0


def _linear_with(parametrize):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    parametrize(net[0])
    return net.train()


def test_a_parametrized_linear_is_not_computed_outside_the_pass(gen):
    # The layers' preparation read `m.weight` of every Linear, which runs a parametrization
    # on the module's own tensors: spectral_norm took a power step on the module's `_u`
    # although `buffers=` gave it per sample (1.16), and a DropConnect drew its mask from
    # the global generator before the pass (randomness="same": 0.49 off its oracle).
    net = _linear_with(torch.nn.utils.parametrizations.spectral_norm)
    x = torch.randn(5, 3)
    params = bf.sample(bf.init(net, init_logvar=-3.0), 3, generator=gen(1))
    given = {k: b.detach().expand(3, *b.shape).clone() for k, b in net.named_buffers()}
    own = {k: b.clone() for k, b in net.named_buffers()}
    fresh = {k: b.clone() for k, b in given.items()}  # the calls update given buffers
    y = bf.vmap_call(net, params, x, buffers=given)
    assert all(torch.equal(b, own[k]) for k, b in net.named_buffers())  # left alone
    y_loop = bf.loop_call(copy.deepcopy(net), params, x, buffers=fresh)
    assert torch.allclose(y, y_loop, rtol=1e-12, atol=1e-14)
    assert all(torch.allclose(given[k], fresh[k], rtol=1e-12, atol=1e-14) for k in given)
    assert not torch.allclose(y[0], y[1])  # the samples were used

    net = _linear_with(
        lambda m: torch.nn.utils.parametrize.register_parametrization(m, "weight", _DropConnect())
    )
    params = {k: v.detach() for k, v in bf.sample(bf.init(net, -4.0), 3, generator=gen(1)).items()}
    torch.manual_seed(7)
    y = bf.vmap_call(net, params, x, randomness="same", fallback=False)
    outs = []
    for i in range(3):
        torch.manual_seed(7)  # the oracle of randomness="same": one seed for every sample
        outs.append(torch.func.functional_call(net, {k: v[i] for k, v in params.items()}, x))
    assert torch.allclose(y, torch.stack(outs), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(y[0], y[1])


class _TiedEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4, max_norm=1.0)
        self.dec = torch.nn.Linear(4, 10, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, t):
        return self.dec(torch.tanh(self.emb(t)))


def test_loop_backward_through_an_embedding_with_max_norm_read_again(gen):
    # Each sample renormalizes its weight in place; the loop gave all samples views of one
    # copy, whose shared version counter made backward raise once a tied decoder read it.
    torch.manual_seed(0)
    net = _TiedEmbedding()
    tokens = torch.tensor([[1, 2, 3, 2], [4, 5, 9, 0]])
    q = bf.init(net, init_logvar=-1.0)
    leaves = [*q.mean.values(), *q.logvar.values()]

    grads = []
    for call in (bf.loop_call, bf.vmap_call):
        y = call(copy.deepcopy(net), bf.sample(q, 3, generator=gen(2)), tokens)
        grads.append(torch.autograd.grad(y.square().sum(), leaves))
    p = bf.sample(q, 3, generator=gen(2))
    ref = torch.stack([
        torch.func.functional_call(copy.deepcopy(net), {k: v[i].clone() for k, v in p.items()}, tokens)
        for i in range(3)
    ])  # fmt: skip
    expected = torch.autograd.grad(ref.square().sum(), leaves)
    for got in grads:
        assert all(
            torch.allclose(a, b, rtol=1e-12, atol=1e-14)
            for a, b in zip(got, expected, strict=True)
        )
    assert not torch.allclose(ref[0], ref[1])  # the samples were used


class _LayerDropEncoder(torch.nn.TransformerEncoderLayer):
    r"""An encoder layer whose forward reads its own `training` flag (LayerDrop)."""

    def forward(self, src, *args, **kwargs):
        out = super().forward(src, *args, **kwargs)
        return out if not self.training else src + 0.5 * (out - src)


@pytest.mark.filterwarnings("ignore::bayesflow.VmapFallbackWarning")  # its fast path
def test_an_encoder_layer_of_its_own_keeps_its_eval_mode(gen):
    # An eval-mode call set every encoder layer's flag to training (torch's own forward
    # reads it only to choose the fast path): a subclass's forward ran its training branch,
    # 0.28 off the copies holding each sample.
    torch.manual_seed(0)
    layer = _LayerDropEncoder(8, 2, 16, dropout=0.0, batch_first=True).eval()
    q = bf.init(layer, init_logvar=-4.0)
    x = torch.randn(3, 5, 8)
    params = bf.sample(q, 3, generator=gen(1))
    with torch.no_grad():
        out = bf.vmap_call(layer, params, x)
        expected = torch.stack([m(x) for m in sample_copies(layer, params)])
    assert not layer.training
    assert torch.allclose(out, expected, atol=1e-10)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("call", [bf.vmap_call, bf.loop_call])
def test_a_pruned_layer_keeps_its_own_weight_after_a_call(call, gen):
    # torch.nn.utils.prune assigns `weight = weight_orig * weight_mask` as a plain attribute
    # before every forward; after a call the layer held the sample's: vmap's dead wrapper
    # (any read raised), or the loop's last sample with its graph.
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    prune.l1_unstructured(net[0], "weight", 0.5)
    q = bf.init(net, init_logvar=-2.0)
    params = bf.sample(q, 3, generator=gen(1))
    x = torch.randn(5, 3)
    own, value = net[0].weight, net[0].weight.detach().clone()

    out = call(net, params, x)

    assert net[0].weight is own and torch.equal(own, value)
    masked = params["0.weight_orig"] * net[0].weight_mask
    expected = torch.stack([
        torch.tanh(x @ masked[i].T + params["0.bias"][i]) @ params["2.weight"][i].T
        + params["2.bias"][i]
        for i in range(3)
    ])  # fmt: skip
    assert torch.allclose(out, expected, atol=1e-12)
    assert not torch.allclose(out[0], out[1])


def test_a_packed_sequence_falls_back_to_the_loop_and_says_why(gen):
    # Documented, untested: torch's vmap cannot take a PackedSequence (its warning named
    # "'int' object has no attribute 'device'" alone).
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    params = bf.sample(bf.init(lstm, init_logvar=-3.0), 3, generator=gen(1))
    packed = pack_padded_sequence(torch.randn(2, 5, 3), torch.tensor([5, 3]), batch_first=True)

    def fn(m, p):
        return m(p)[0].data

    with pytest.warns(bf.VmapFallbackWarning, match="a PackedSequence is not vectorized"):
        out = bf.vmap_call(lstm, params, packed, fn=fn)
    copies = sample_copies(lstm, params)
    assert torch.allclose(out, torch.stack([fn(m, packed) for m in copies]), atol=1e-12)
    assert not torch.allclose(out[0], out[1])
    assert all(w is p for w, p in zip(lstm._flat_weights, lstm.parameters(), strict=True))


def test_a_packed_sequence_output_is_refused_with_the_way_out(gen):
    # The default fn returns the PackedSequence itself: both calls died in torch's
    # constructor ("Expected data to be a list or tuple of length 2"), naming nothing.
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    params = bf.sample(bf.init(lstm, init_logvar=-3.0), 3, generator=gen(1))
    packed = pack_padded_sequence(torch.randn(2, 5, 3), torch.tensor([5, 3]), batch_first=True)
    before = [p.detach().clone() for p in lstm.parameters()]
    for name, call in (("vmap_call", bf.vmap_call), ("loop_call", bf.loop_call)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bf.VmapFallbackWarning)
            with pytest.raises(
                TypeError, match=rf"{name}: expected fn to return tensors .*got a PackedSequence"
            ):
                call(lstm, params, packed)
        assert all(torch.equal(p, b) for p, b in zip(lstm.parameters(), before, strict=True))

    # The way out the message gives: the padded outputs, as each sample's copy gives them.
    def fn(rnn, x):
        return pad_packed_sequence(rnn(x)[0], batch_first=True)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bf.VmapFallbackWarning)
        out = bf.vmap_call(lstm, params, packed, fn=fn)
    copies = sample_copies(lstm, params)
    assert torch.allclose(out, torch.stack([fn(m, packed) for m in copies]), atol=1e-12)
    assert not torch.allclose(out[0], out[1])


class _PaddedText(torch.nn.Module):
    def __init__(self, max_norm):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4, padding_idx=0, max_norm=max_norm)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, t):
        return self.head(torch.tanh(self.emb(t)))


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_an_embeddings_padding_row_gets_no_gradient_with_per_sample_tokens(
    max_norm, chunk_size, gen
):
    # With the tokens per sample (in_dims) and the weight sampled, torch's batching rule of
    # embedding masked the padding row of the first sample only: the others got gradients
    # (1.5-1.8 relative error) where torch and K separate modules give none.
    torch.manual_seed(0)
    net, K = _PaddedText(max_norm), 3
    tokens = torch.randint(1, 10, (K, 2, 4), generator=gen(1))
    tokens[:, 0, 0] = 0  # every sample reads the padding row
    w = torch.randn(K, 2, 4, 2, generator=gen(2))
    params = {
        k: v.detach().requires_grad_()
        for k, v in bf.sample(bf.init(net, init_logvar=-1.0), K, generator=gen(3)).items()
    }
    out = bf.vmap_call(net, params, tokens, in_dims=(0,), chunk_size=chunk_size)
    grads = torch.autograd.grad((out * w).sum(), list(params.values()))
    grads = dict(zip(params, grads, strict=True))

    for k, m in enumerate(sample_copies(net, {n: v.detach() for n, v in params.items()})):
        y = m(tokens[k])
        assert torch.allclose(out[k], y, rtol=1e-12, atol=1e-14)
        (y * w[k]).sum().backward()
        for name, g in grads.items():
            assert torch.allclose(g[k], m.get_parameter(name).grad, rtol=1e-12, atol=1e-14)
        assert (m.emb.weight.grad[0] == 0).all() and (grads["emb.weight"][k, 0] == 0).all()
    assert not torch.allclose(out[0], out[1])  # the samples differ
