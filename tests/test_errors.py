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
NORMED = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
BNET = bf.BayesianModel(net())
params_ = bf.sample(q_, 3)
x_ = torch.randn(5, 3)
# A posterior and tensors on the meta device: shapes without data.
QM = bf.Posterior(
    {k: v.detach().to("meta") for k, v in q_.mean.items()},
    {k: v.detach().to("meta") for k, v in q_.logvar.items()},
)
XM = torch.randn(4, 5, 2, device="meta")

# Predictions, probabilities and labels.
X = torch.randn(4, 3)
P = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
L = torch.tensor([1, 0])

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
        "init-glob-space",
        lambda: bf.init(net_, exclude=["a**. bias"]),
        ValueError,
        r"init: malformed glob pattern 'a\*\*. bias'",
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
        lambda: bf.BayesianModel(net_, include_params=["0..weight"]),
        ValueError,
        r"BayesianModel: malformed glob pattern '0..weight'",
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
        "local-no-layer",
        lambda: bf.local_call(NORMED, bf.init(NORMED, include=["1"]), 2, x_),
        ValueError,
        r"local_call: expected the posterior to hold the weight",
    ),
    ("local-n-0", lambda: bf.local_call(net_, q_, 0, x_), ValueError, "local_call: expected n"),
    (
        "local-n-float",
        lambda: bf.local_call(net_, q_, 2.0, x_),
        TypeError,
        "local_call: expected n",
    ),
    (
        "local-posterior",
        lambda: bf.local_call(net_, {}, 2, x_),
        TypeError,
        r"local_call: expected a bayesflow.Posterior",
    ),
    (
        "local-module",
        lambda: bf.local_call(lambda x: x, q_, 2, x_),
        TypeError,
        r"local_call: expected a torch.nn.Module",
    ),
    (
        "local-bridge",
        lambda: bf.local_call(BNET, BNET.posterior, 2, x_),
        TypeError,
        "local_call: expected the module the posterior is over",
    ),
    (
        "local-generator",
        lambda: bf.local_call(net_, q_, 2, x_, generator=0),
        TypeError,
        "local_call: expected generator",
    ),
    (
        "local-fn",
        lambda: bf.local_call(net_, q_, 2, x_, fn=1),
        TypeError,
        "local_call: expected fn",
    ),
    (
        "local-flipout",
        lambda: bf.local_call(net_, q_, 2, x_, flipout="yes"),
        TypeError,
        "local_call: expected flipout",
    ),
    (
        "local-names",
        lambda: bf.local_call(zuko.nn.MLP(3, 2, hidden_features=(5,)).float(), q_, 2, x_),
        ValueError,
        "local_call: expected posterior names",
    ),
    (
        "local-layers-not-called",
        lambda: bf.local_call(net_, q_, 2, x_, fn=lambda m, x: x),
        ValueError,
        r"local_call: expected fn to call every Bayesian layer of MLP, got \['0', '2'\] never called",
    ),
    (
        "local-output",
        lambda: bf.local_call(net_, q_, 2, x_, fn=lambda m, x: (m(x), "text")),
        TypeError,
        "local_call: expected fn to return tensors",
    ),
    (
        "local-in-dims",
        lambda: bf.local_call(net_, q_, 2, x_, in_dims=[0, None]),
        ValueError,
        "local_call: expected in_dims",
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
        "mean-not-tensor",
        lambda: bf.predictive_mean([1.0, 2.0]),
        TypeError,
        "predictive_mean: expected samples to be a tensor",
    ),
    (
        "mean-0d",
        lambda: bf.predictive_mean(torch.tensor(1.0)),
        ValueError,
        "predictive_mean: expected samples with at least 1 dims",
    ),
    (
        "mean-int",
        lambda: bf.predictive_mean(torch.arange(3)),
        TypeError,
        "predictive_mean: expected samples to be a floating-point",
    ),
    (
        "mean-k0",
        lambda: bf.predictive_mean(torch.zeros(0, 3)),
        ValueError,
        "predictive_mean: expected samples with at least one sample",
    ),
    (
        "std-k1",
        lambda: bf.predictive_std(X[:1]),
        ValueError,
        "predictive_std: expected more than correction",
    ),
    (
        "std-correction",
        lambda: bf.predictive_std(X, correction=-1),
        ValueError,
        "predictive_std: expected correction to be an int >= 0",
    ),
    (
        "quantile-range",
        lambda: bf.predictive_quantiles(X, [0.5, 1.5]),
        ValueError,
        r"predictive_quantiles: expected q in \[0, 1\]",
    ),
    (
        "quantile-2d",
        lambda: bf.predictive_quantiles(X, [[0.5]]),
        ValueError,
        "predictive_quantiles: expected q to be a float or 1-d",
    ),
    (
        "quantile-empty",
        lambda: bf.predictive_quantiles(X, []),
        ValueError,
        "predictive_quantiles: expected at least one",
    ),
    (
        "quantile-type",
        lambda: bf.predictive_quantiles(X, "median"),
        TypeError,
        "predictive_quantiles: expected q to be a float",
    ),
    (
        "interval-level-1",
        lambda: bf.predictive_interval(X, level=1.0),
        ValueError,
        r"predictive_interval: expected level in \(0, 1\)",
    ),
    (
        "interval-level-0",
        lambda: bf.predictive_interval(X, level=0),
        ValueError,
        r"predictive_interval: expected level in \(0, 1\)",
    ),
    (
        "interval-level-type",
        lambda: bf.predictive_interval(X, level="90%"),
        TypeError,
        "predictive_interval: expected level to be a float",
    ),
    (
        "summarize-k1",
        lambda: bf.summarize(X[:1]),
        ValueError,
        "summarize: expected at least 2 samples",
    ),
    (
        "summarize-level",
        lambda: bf.summarize(X, level=90),
        ValueError,
        r"summarize: expected level in \(0, 1\)",
    ),
    (
        "mixture-int",
        lambda: bf.mixture_log_prob(torch.zeros(3, dtype=torch.long)),
        TypeError,
        "mixture_log_prob: expected log_probs to be a floating-point",
    ),
    (
        "nll-reduction",
        lambda: bf.predictive_nll(X, reduction="avg"),
        ValueError,
        "predictive_nll: expected reduction",
    ),
    (
        "logits-1d",
        lambda: bf.mutual_information(torch.randn(3)),
        ValueError,
        r"mutual_information: expected logits of shape \(K, \*batch, C\)",
    ),
    (
        "logits-list",
        lambda: bf.classification_summary([[0.0]]),
        TypeError,
        "classification_summary: expected logits to be a tensor",
    ),
    (
        "probs-sum",
        lambda: bf.categorical_nll(P * 2 / 3, L),
        ValueError,
        "categorical_nll: expected probabilities that sum to 1",
    ),
    (
        "probs-range",
        lambda: bf.categorical_nll(torch.tensor([[1.5, -0.5]]), L[:1]),
        ValueError,
        r"categorical_nll: expected probabilities in \[0, 1\]",
    ),
    (
        "labels-float",
        lambda: bf.categorical_nll(P, L.double()),
        TypeError,
        "categorical_nll: expected integer labels",
    ),
    (
        "labels-shape",
        lambda: bf.categorical_nll(P, L[:1]),
        ValueError,
        r"categorical_nll: expected labels of shape \(2,\)",
    ),
    (
        "labels-range",
        lambda: bf.categorical_nll(P, torch.tensor([0, 2])),
        ValueError,
        r"categorical_nll: expected labels in \[0, 1\]",
    ),
    (
        "ece-bins",
        lambda: bf.expected_calibration_error(P, L, bins=0),
        ValueError,
        "expected_calibration_error: expected bins to be a positive int, got 0",
    ),
    (
        "ece-bins-type",
        lambda: bf.expected_calibration_error(P, L, bins=2.0),
        TypeError,
        "expected_calibration_error: expected bins to be a positive int, got float",
    ),
    (
        "ece-sum",
        lambda: bf.expected_calibration_error(P + 0.1, L),
        ValueError,
        "expected_calibration_error: expected probabilities that sum to 1",
    ),
    (
        "ece-labels",
        lambda: bf.expected_calibration_error(P, L[:, None]),
        ValueError,
        "expected_calibration_error: expected labels of shape",
    ),
    (
        "curve-empty",
        lambda: bf.calibration_curve(P[:0], L[:0]),
        ValueError,
        "calibration_curve: expected at least one prediction",
    ),
    (
        "gaussian-shape",
        lambda: bf.gaussian_nll(X, X.abs(), X[0]),
        ValueError,
        "gaussian_nll: expected tensors of the same shape",
    ),
    (
        "gaussian-std",
        lambda: bf.gaussian_nll(X, -X.abs(), X),
        ValueError,
        "gaussian_nll: expected std > 0",
    ),
    (
        "gaussian-int",
        lambda: bf.gaussian_nll(X, X.abs(), torch.ones(4, 3, dtype=torch.long)),
        TypeError,
        "gaussian_nll: expected y to be a floating-point",
    ),
    (
        "coverage-shape",
        lambda: bf.interval_coverage(X[0], X[0] + 1, X),
        ValueError,
        "interval_coverage: expected tensors of the same shape",
    ),
    (
        "coverage-order",
        lambda: bf.interval_coverage(X + 1, X, X),
        ValueError,
        "interval_coverage: expected lower <= upper",
    ),
    (
        "coverage-empty",
        lambda: bf.interval_coverage(X[:0], X[:0], X[:0]),
        ValueError,
        "interval_coverage: expected at least one observation",
    ),
    # Meta tensors reached torch, whose errors (Tensor.item() cannot be called on meta
    # tensors) named no function.
    (
        "meta-sample",
        lambda: bf.sample(QM, 2),
        ValueError,
        r"sample: expected posterior tensors with data, got posterior.mean\['0.weight'\] on "
        r"the meta device",
    ),
    (
        "meta-kl",
        lambda: bf.kl_divergence(QM),
        ValueError,
        r"kl_divergence: expected posterior tensors with data",
    ),
    (
        "meta-prior-kl",
        lambda: bf.prior_kl(QM),
        ValueError,
        r"prior_kl: expected posterior tensors with data",
    ),
    (
        "meta-std",
        lambda: bf.std(QM),
        ValueError,
        r"std: expected posterior tensors with data",
    ),
    (
        "meta-local-call",
        lambda: bf.local_call(net_, QM, 2, x_),
        ValueError,
        r"local_call: expected posterior tensors with data",
    ),
    (
        "meta-linearized",
        lambda: bf.linearized_predictive(net_, QM, x_),
        ValueError,
        r"linearized_predictive: expected posterior tensors with data",
    ),
    (
        "meta-gaussian-prior",
        lambda: bf.GaussianPrior(var=torch.ones(2, device="meta")),
        ValueError,
        r"GaussianPrior: expected var with data, got a tensor on the meta device",
    ),
    (
        "meta-interval",
        lambda: bf.predictive_interval(XM),
        ValueError,
        r"predictive_interval: expected samples with data, got a tensor on the meta device",
    ),
    (
        "meta-quantiles",
        lambda: bf.predictive_quantiles(XM, [0.5]),
        ValueError,
        r"predictive_quantiles: expected samples with data",
    ),
    (
        "meta-probit",
        lambda: bf.probit_probs(XM, XM),
        ValueError,
        r"probit_probs: expected mean with data, got a tensor on the meta device",
    ),
    (
        "meta-categorical",
        lambda: bf.categorical_nll(P.to("meta"), L),
        ValueError,
        r"categorical_nll: expected probs with data",
    ),
    (
        "meta-gaussian-nll",
        lambda: bf.gaussian_nll(X, X.abs(), X.to("meta")),
        ValueError,
        r"gaussian_nll: expected y with data, got a tensor on the meta device",
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
    assert all("forward" not in vars(m) for m in net_.modules())  # no layer left patched


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


def test_same_shape_tensors_on_different_devices_are_refused():
    # The metrics check shapes here; a y on another device reached torch's own error. Every
    # public caller refuses a meta tensor before, so the devices are those of the check.
    from bayesflow._checks import check_same_shape

    with pytest.raises(
        ValueError,
        match=r"gaussian_nll: expected tensors on one device, got mean on cpu, std on cpu, "
        r"y on meta",
    ):
        check_same_shape("gaussian_nll", mean=X, std=X, y=X.to("meta"))
    check_same_shape("gaussian_nll", mean=X, std=X, y=X)


def test_a_module_with_lazy_parameters_is_refused_by_every_call(gen):
    # Only init, SWAG and the ensembles refused it; IVON, the calls, the objectives and the
    # bridge's calls raised torch's "Can't access the shape of an uninitialized parameter",
    # naming no function.
    lazy = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 2))
    q = bf.init(lazy, init_logvar=-3.0, include=["2"])  # the initialized layer: taken
    params, x, g = bf.sample(q, 2), torch.randn(5, 3), gen(0)
    ll = lambda m, x: m(x).sum(-1)
    calls = {
        "IVON": lambda: bf.IVON(lazy, lr=0.1, ess=100.0),
        "vmap_call": lambda: bf.vmap_call(lazy, params, x),
        "loop_call": lambda: bf.loop_call(lazy, params, x),
        "local_call": lambda: bf.local_call(lazy, q, 2, x, generator=g),
        "nelbo": lambda: bf.nelbo(lazy, q, x, fn=ll, num_data=5, generator=g),
        "local_nelbo": lambda: bf.local_nelbo(lazy, q, x, fn=ll, num_data=5, generator=g),
        # As zuko's, the wrapper takes a base whose lazy layers it does not sample; its
        # calls need them initialized.
        "BayesianModel.forward": lambda: bf.BayesianModel(lazy, include_params=["2"])(x, n=2),
    }
    for where, call in calls.items():
        what = "parameters" if where == "IVON" else "module"
        with pytest.raises(
            ValueError,
            match=rf"^{where}: expected (an )?initialized {what}, got \['0.weight', '0.bias'\] "
            r"uninitialized \(a lazy module, such as torch.nn.LazyLinear\): run one forward "
            r"pass of Sequential first",
        ):
            call()
        assert isinstance(lazy[0], nn.LazyLinear)  # nothing ran it
    assert torch.equal(g.get_state(), gen(0).get_state())

    # Once a forward pass has given them shapes, the same calls run.
    lazy(x)
    assert bf.vmap_call(lazy, params, x).shape == (2, 5, 2)
    assert bf.nelbo(lazy, q, x, fn=ll, num_data=5, generator=g).isfinite()


def test_std_and_mean_params_refuse_a_logvar_of_another_dtype_than_its_mean():
    # sample, kl_divergence and mean_model refused it; std gave float64 deviations of a
    # float32 posterior, and mean_params took it.
    q = bf.init(nn.Linear(3, 2).float())
    bad = bf.Posterior(q.mean, {k: v.double() for k, v in q.logvar.items()})
    for where, call in (("std", bf.std), ("mean_params", bf.mean_params)):
        with pytest.raises(
            ValueError,
            match=rf"{where}: expected posterior.logvar\['weight'\] with the dtype and device "
            r"of its mean \(torch.float32 on cpu\), got torch.float64",
        ):
            call(bad)
    assert bf.std(q)["weight"].dtype == torch.float32


def test_samples_are_checked_against_a_module_converted_after_a_first_call():
    # The structure of a module, cached at its first call, kept the dtype its parameters
    # had then: `module.float()` changes them in place (the same objects), and float64
    # samples then got torch's "mat1 and mat2 must have the same dtype", naming no function.
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = bf.sample(bf.init(module), 2)
    x = torch.randn(5, 3)
    y = bf.vmap_call(module, params, x)
    assert not torch.allclose(y[0], y[1])  # the samples do change the output
    module.float()
    for call in (bf.vmap_call, bf.loop_call):
        with pytest.raises(ValueError, match=rf"{call.__name__}: expected .*'0\.weight'"):
            call(module, params, x)
    f32 = {k: v.float() for k, v in params.items()}
    assert torch.allclose(bf.vmap_call(module, f32, x.float()), y.float(), rtol=1e-5)


def test_an_int_beyond_the_float_range_is_an_infinite_number():
    # 10**400 for a float argument gave a bare "OverflowError: int too large to convert to
    # float" that named no function; inf gets a ValueError that does.
    huge = 10**400
    ll = lambda m, x: m(x).sum(-1)
    for where, what, call in (
        ("nelbo", "num_data > 0", lambda v: bf.nelbo(net_, q_, x_, fn=ll, num_data=v)),
        (
            "nelbo",
            "kl_weight >= 0",
            lambda v: bf.nelbo(net_, q_, x_, fn=ll, num_data=5, kl_weight=v),
        ),
        ("prior_kl", "prior_var > 0", lambda v: bf.prior_kl(q_, v)),
        ("kl_divergence", "prior_var > 0", lambda v: bf.kl_divergence(q_, v)),
        ("ConstantSchedule", "weight >= 0", lambda v: bf.ConstantSchedule(v)(0)),
        ("ScaleMixturePrior", "var1 > 0", lambda v: bf.ScaleMixturePrior(0.5, v, 1.0)),
    ):
        for value in (float("inf"), huge):
            with pytest.raises(ValueError, match=rf"{where}: expected a finite {what}, got inf"):
                call(value)
    assert bf.kl_divergence(q_, 1.0).isfinite()  # what the calls compare with


def test_a_number_on_the_meta_device_is_refused_by_name():
    # kl_divergence(prior_var=<meta tensor>) gave torch's "Tensor.item() cannot be called
    # on meta tensors", naming no function.
    meta = torch.tensor(1.0, device="meta")
    ll = lambda m, x: m(x).sum(-1)
    for where, what, call in (
        ("kl_divergence", "prior_var", lambda: bf.kl_divergence(q_, prior_var=meta)),
        ("BayesianModel.kl_divergence", "prior_var", lambda: BNET.kl_divergence(meta)),
        ("prior_kl", "prior_var", lambda: bf.prior_kl(q_, meta)),
        ("nelbo", "prior variance", lambda: bf.nelbo(net_, q_, x_, fn=ll, num_data=5, prior=meta)),
        ("nelbo", "kl_weight", lambda: bf.nelbo(net_, q_, x_, fn=ll, num_data=5, kl_weight=meta)),
        ("ScaleMixturePrior", "var2", lambda: bf.ScaleMixturePrior(0.5, 1.0, meta)),
    ):
        with pytest.raises(
            ValueError, match=rf"{where}: expected {what} with data, got a tensor on the meta"
        ):
            call()
    assert bf.kl_divergence(q_, prior_var=torch.tensor(1.0)).isfinite()  # one with data runs
