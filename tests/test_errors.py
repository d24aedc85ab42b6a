r"""Bad input: a clear error at the public boundary, and nothing changed."""

import pytest
import torch
import torch.nn as nn
import zuko

import bayesflow as bf

from .registry import snapshot, unchanged


def net():
    return zuko.nn.MLP(3, 2, hidden_features=(4,))


net_ = net()
q_ = bf.init(net_, init_logvar=-3.0)
params_ = bf.sample(q_, 3)
x_ = torch.randn(5, 3)

# (id, call, error type, message pattern)
CASES = [
    (
        "init-not-module",
        lambda: bf.init("mlp"),
        TypeError,
        r"init: expected a torch.nn.Module, got str",
    ),
    (
        "init-glob-dots",
        lambda: bf.init(net_, include=["0..weight"]),
        ValueError,
        r"init: malformed glob pattern '0..weight'",
    ),
    (
        "init-glob-stars",
        lambda: bf.init(net_, include=["***"]),
        ValueError,
        r"init: malformed glob pattern",
    ),
    (
        "init-glob-mixed",
        lambda: bf.init(net_, exclude=["a**.bias"]),
        ValueError,
        r"init: malformed glob pattern 'a\*\*.bias'",
    ),
    (
        "init-glob-chars",
        lambda: bf.init(net_, include=["0.we ight"]),
        ValueError,
        r"init: malformed glob",
    ),
    (
        "init-glob-type",
        lambda: bf.init(net_, include=[3]),
        TypeError,
        r"init: expected glob patterns as strings, got 3",
    ),
    (
        "init-globs-type",
        lambda: bf.init(net_, include=3),
        TypeError,
        r"init: expected include to be a sequence of glob patterns",
    ),
    (
        "init-empty",
        lambda: bf.init(net_, include=["nothing"]),
        ValueError,
        r"init: expected include=\('nothing',\) .* to pick at least one parameter of MLP, got none",
    ),
    (
        "init-logvar-nan",
        lambda: bf.init(net_, float("nan")),
        ValueError,
        r"init: expected a finite init_logvar for '0.weight', got",
    ),
    (
        "init-logvar-inf",
        lambda: bf.init(net_, {n: float("-inf") for n, _ in net_.named_parameters()}),
        ValueError,
        r"init: expected a finite init_logvar",
    ),
    (
        "init-logvar-str",
        lambda: bf.init(net_, "-9"),
        TypeError,
        r"init: expected init_logvar for '0.weight' to be a float or a tensor, got str",
    ),
    ("init-logvar-bool", lambda: bf.init(net_, True), TypeError, r"got bool"),
    ("init-logvar-fn", lambda: bf.init(net_, lambda n, p: None), TypeError, r"got NoneType"),
    (
        "init-logvar-shape",
        lambda: bf.init(net_, lambda n, p: torch.zeros(7)),
        ValueError,
        r"to broadcast to \(4, 3\), got shape \(7,\)",
    ),
    (
        "init-logvar-unknown",
        lambda: bf.init(net_, {"nope": -1.0}),
        ValueError,
        r"unknown names \['nope'\] and missing names \['0.weight'",
    ),
    (
        "select-not-module",
        lambda: bf.select(None),
        TypeError,
        r"select: expected a torch.nn.Module, got NoneType",
    ),
    (
        "sample-n-zero",
        lambda: bf.sample(q_, 0),
        ValueError,
        r"sample: expected n to be a positive int, got 0",
    ),
    (
        "sample-n-negative",
        lambda: bf.sample(q_, -2),
        ValueError,
        r"sample: expected n to be a positive int, got -2",
    ),
    (
        "sample-n-float",
        lambda: bf.sample(q_, 2.0),
        TypeError,
        r"sample: expected n to be a positive int, got float 2.0",
    ),
    ("sample-n-bool", lambda: bf.sample(q_, True), TypeError, r"got bool True"),
    (
        "sample-posterior",
        lambda: bf.sample({"a": 1}, 2),
        TypeError,
        r"sample: expected a bayesflow.Posterior, got dict",
    ),
    (
        "sample-generator",
        lambda: bf.sample(q_, 2, generator=0),
        TypeError,
        r"sample: expected generator to be a torch.Generator or None, got int",
    ),
    (
        "sample-ragged-posterior",
        lambda: bf.sample(bf.Posterior({"a": torch.zeros(2)}, {"a": torch.zeros(3)}), 2),
        ValueError,
        r"same shape, got \(2,\) and \(3,\)",
    ),
    (
        "kl-zero",
        lambda: bf.kl_divergence(q_, 0.0),
        ValueError,
        r"kl_divergence: expected a finite prior_var > 0, got 0.0",
    ),
    ("kl-negative", lambda: bf.kl_divergence(q_, -1.0), ValueError, r"got -1.0"),
    ("kl-nan", lambda: bf.kl_divergence(q_, float("nan")), ValueError, r"got nan"),
    (
        "kl-type",
        lambda: bf.kl_divergence(q_, "1"),
        TypeError,
        r"kl_divergence: expected prior_var to be a number, got str",
    ),
    (
        "vmap-not-module",
        lambda: bf.vmap_call(lambda x: x, params_, x_),
        TypeError,
        r"vmap_call: expected a torch.nn.Module, got function",
    ),
    (
        "vmap-params-type",
        lambda: bf.vmap_call(net_, [1], x_),
        TypeError,
        r"vmap_call: expected params to be a dict",
    ),
    (
        "vmap-params-empty",
        lambda: bf.vmap_call(net_, {}, x_),
        ValueError,
        r"vmap_call: expected at least one parameter",
    ),
    (
        "vmap-unknown",
        lambda: bf.vmap_call(net_, {**params_, "0.wieght": params_["0.weight"]}, x_),
        ValueError,
        r"vmap_call: expected names from MLP.named_parameters\(\), got unknown names \['0.wieght'\]",
    ),
    (
        "vmap-value-type",
        lambda: bf.vmap_call(net_, {"0.weight": 1.0}, x_),
        TypeError,
        r"expected params\['0.weight'\] to be a tensor, got float",
    ),
    (
        "vmap-shape",
        lambda: bf.vmap_call(net_, {"0.weight": torch.zeros(3, 3, 4)}, x_),
        ValueError,
        r"vmap_call: expected params\['0.weight'\] of shape \(n, \*\(4, 3\)\), got \(3, 3, 4\)",
    ),
    (
        "vmap-unbatched",
        lambda: bf.vmap_call(net_, {"0.weight": torch.zeros(4, 3)}, x_),
        ValueError,
        r"of shape \(n, \*\(4, 3\)\)",
    ),
    (
        "vmap-ragged",
        lambda: bf.vmap_call(net_, {**params_, "0.bias": torch.zeros(2, 4)}, x_),
        ValueError,
        r"vmap_call: expected the same number of samples n for every parameter",
    ),
    (
        "vmap-zero",
        lambda: bf.vmap_call(net_, {"0.bias": torch.zeros(0, 4)}, x_),
        ValueError,
        r"expected at least one sample, got n = 0",
    ),
    (
        "vmap-fn",
        lambda: bf.vmap_call(net_, params_, x_, fn="forward"),
        TypeError,
        r"vmap_call: expected fn to be callable or None, got str",
    ),
    (
        "vmap-chunk",
        lambda: bf.vmap_call(net_, params_, x_, chunk_size=0),
        ValueError,
        r"vmap_call: expected chunk_size to be a positive int or None, got 0",
    ),
    (
        "vmap-in-dims-length",
        lambda: bf.vmap_call(net_, params_, x_, in_dims=(0, None)),
        ValueError,
        r"vmap_call: expected in_dims with one entry \(0 or None\) per argument, 1 in all",
    ),
    (
        "vmap-in-dims-value",
        lambda: bf.vmap_call(net_, params_, x_, in_dims=(1,)),
        ValueError,
        r"expected in_dims\[0\] to be 0 or None, got 1",
    ),
    (
        "vmap-in-dims-ragged",
        lambda: bf.vmap_call(net_, params_, x_, in_dims=(0,)),
        ValueError,
        r"expected argument 0 to be per-sample with leading dim n = 3, got \(5, 3\)",
    ),
    (
        "loop-unknown",
        lambda: bf.loop_call(net_, {"x": torch.zeros(2)}, x_),
        ValueError,
        r"loop_call: expected names from MLP",
    ),
    (
        "loop-ragged",
        lambda: bf.loop_call(net_, {**params_, "0.bias": torch.zeros(2, 4)}, x_),
        ValueError,
        r"loop_call: expected the same number",
    ),
    (
        "mean-model-mismatch",
        lambda: bf.mean_model(nn.Linear(2, 2), q_),
        ValueError,
        r"mean_model: expected posterior names and shapes from Linear",
    ),
    (
        "bridge-not-module",
        lambda: bf.BayesianModel(3),
        TypeError,
        r"BayesianModel: expected a torch.nn.Module, got int",
    ),
    (
        "bridge-glob",
        lambda: bf.BayesianModel(net_, include_params=["0."]),
        ValueError,
        r"BayesianModel: malformed glob pattern '0.'",
    ),
    (
        "bridge-empty",
        lambda: bf.BayesianModel(net_, exclude_params=["**"]),
        ValueError,
        r"BayesianModel: expected include=.* to pick at least one parameter",
    ),
    (
        "init-lazy",
        lambda: bf.init(nn.LazyLinear(3)),
        ValueError,
        r"init: expected initialized parameters, got \['weight', 'bias'\] uninitialized .*"
        r"run one forward pass of LazyLinear first",
    ),
    (
        "classification-no-sample-dim",
        lambda: bf.classification_summary(torch.randn(16, 3)),
        ValueError,
        r"classification_summary: expected logits of shape \(K, \*batch, C\) .* got shape "
        r"\(16, 3\)",
    ),
    (
        "mean-probs-no-sample-dim",
        lambda: bf.mean_probs(torch.randn(16, 3)),
        ValueError,
        r"mean_probs: expected logits of shape \(K, \*batch, C\)",
    ),
    (
        "gaussian-nll-empty",
        lambda: bf.gaussian_nll(torch.zeros(0), torch.ones(0), torch.zeros(0)),
        ValueError,
        r"gaussian_nll: expected at least one observation, got none",
    ),
    (
        "categorical-nll-empty",
        lambda: bf.categorical_nll(torch.ones(0, 2) / 2, torch.zeros(0, dtype=torch.long)),
        ValueError,
        r"categorical_nll: expected at least one observation, got none",
    ),
    (
        "predictive-nll-empty",
        lambda: bf.predictive_nll(torch.zeros(4, 0)),
        ValueError,
        r"predictive_nll: expected at least one observation, got none",
    ),
    (
        "local-per-position",
        lambda: bf.local_call(net_, q_, 2, x_, per_position="yes"),
        TypeError,
        r"local_call: expected per_position to be a bool, got str",
    ),
    (
        "vmap-fallback-type",
        lambda: bf.vmap_call(net_, params_, x_, fallback="no"),
        TypeError,
        r"vmap_call: expected fallback to be a bool, got str",
    ),
    (
        "vmap-buffers-unknown",
        lambda: bf.vmap_call(net_, params_, x_, buffers={"running_mean": torch.zeros(3, 4)}),
        ValueError,
        r"vmap_call: expected names from MLP.named_buffers\(\), got unknown names",
    ),
    (
        "vmap-buffers-type",
        lambda: bf.vmap_call(net_, params_, x_, buffers=[torch.zeros(3)]),
        TypeError,
        r"vmap_call: expected buffers to be a dict from buffer names to tensors, got list",
    ),
    (
        "ensemble-k",
        lambda: bf.ensemble(net, 0),
        ValueError,
        r"ensemble: expected k to be a positive int, got 0",
    ),
    (
        "ensemble-not-callable",
        lambda: bf.ensemble(3, 2),
        TypeError,
        r"ensemble: expected make_module to be callable, got int",
    ),
    (
        "ensemble-not-module",
        lambda: bf.ensemble(lambda: "net", 2),
        TypeError,
        r"ensemble: expected make_module to return a torch.nn.Module, got str",
    ),
    (
        "stack-modules-classes",
        lambda: bf.stack_modules([net_, nn.Linear(3, 2)]),
        ValueError,
        r"stack_modules: expected modules of one class, got MLP and Linear at index 1",
    ),
    (
        "bridge-logvar",
        lambda: bf.BayesianModel(net_, init_logvar=float("inf")),
        ValueError,
        r"BayesianModel: expected a finite init_logvar",
    ),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, error, pattern):
    before = snapshot(net_, q_.mean, q_.logvar, params_, x_)

    with pytest.raises(error, match=pattern):
        call()

    assert unchanged(before, net_, q_.mean, q_.logvar, params_, x_)


def test_bridge_methods():
    bnet = bf.BayesianModel(net(), init_logvar=-3.0)
    before = snapshot(bnet)

    with pytest.raises(
        ValueError, match=r"BayesianModel.kl_divergence: expected a finite prior_var > 0, got 0"
    ):
        bnet.kl_divergence(0)
    with pytest.raises(
        ValueError, match=r"BayesianModel.sample_params: expected n to be a positive int, got 0"
    ):
        bnet.sample_params(0)
    with pytest.raises(
        TypeError, match=r"BayesianModel.forward: expected n to be a positive int, got str"
    ):
        bnet(x_, n="4")
    with pytest.raises(ValueError, match=r"BayesianModel.forward: expected chunk_size"):
        bnet(x_, n=4, chunk_size=-1)
    with pytest.raises(RuntimeError, match="boom"), bnet.reparameterize():
        raise RuntimeError("boom")

    assert unchanged(before, bnet)
    assert all(isinstance(p, nn.Parameter) for p in bnet.base.parameters())


def test_bridge_rejects_names_it_cannot_mangle():
    base = nn.ModuleDict({"a-b": nn.Linear(2, 2)})

    with pytest.raises(
        ValueError, match=r"BayesianModel: expected parameter names without '-'.*got 'a-b.weight'"
    ):
        bf.BayesianModel(base)
