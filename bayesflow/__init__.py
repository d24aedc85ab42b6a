r"""bayesflow: Bayesian neural networks and Bayesian normalizing flows, vectorized.

A mean-field Gaussian posterior over any subset of a module's parameters, many posterior
samples evaluated in one :func:`torch.func.vmap` pass, and :class:`BayesianModel`, a
drop-in superset of :class:`zuko.bayesian.BayesianModel`.
"""

__version__ = "0.2.0"

__all__ = [
    "IVON",
    "SWAG",
    "BayesianModel",
    "CalibrationCurve",
    "ConstantSchedule",
    "CyclicalSchedule",
    "Ensemble",
    "GaussianPrior",
    "LaplaceFit",
    "LinearWarmup",
    "Posterior",
    "Prior",
    "ScaleMixturePrior",
    "VmapFallbackWarning",
    "auroc",
    "calibration_curve",
    "categorical_nll",
    "clear_caches",
    "ensemble",
    "expected_calibration_error",
    "flipout_nelbo",
    "flow_sample",
    "gaussian_nll",
    "init",
    "interval_coverage",
    "kl_divergence",
    "laplace",
    "laplace_fit",
    "laplace_marglik",
    "laplace_posterior",
    "linearized_predictive",
    "local_call",
    "local_layers",
    "local_nelbo",
    "loop_call",
    "loop_nelbo",
    "mean_model",
    "mean_params",
    "nelbo",
    "optimize_prior_precision",
    "prior_kl",
    "probit_probs",
    "sample",
    "select",
    "stack_modules",
    "stack_params",
    "std",
    "vmap_call",
]

from . import datasets, predictive  # noqa: F401
from ._caches import clear_caches
from .bayesian import BayesianModel
from .call import VmapFallbackWarning, loop_call, vmap_call
from .ensemble import Ensemble, ensemble, stack_modules
from .flows import flow_sample
from .ivon import IVON
from .laplace import (
    LaplaceFit,
    laplace,
    laplace_fit,
    laplace_marglik,
    laplace_posterior,
    optimize_prior_precision,
)
from .linearized import linearized_predictive, probit_probs
from .local import local_call, local_layers
from .metrics import (
    CalibrationCurve,
    auroc,
    calibration_curve,
    categorical_nll,
    expected_calibration_error,
    gaussian_nll,
    interval_coverage,
)
from .objectives import flipout_nelbo, local_nelbo, loop_nelbo, nelbo
from .posterior import (
    Posterior,
    init,
    kl_divergence,
    mean_model,
    mean_params,
    sample,
    select,
    stack_params,
    std,
)
from .predictive import *  # noqa: F403 (the names of predictive.__all__)
from .priors import GaussianPrior, Prior, ScaleMixturePrior, prior_kl
from .schedules import ConstantSchedule, CyclicalSchedule, LinearWarmup
from .swag import SWAG

__all__ += predictive.__all__
