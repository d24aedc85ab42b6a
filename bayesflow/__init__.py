r"""bayesflow: Bayesian neural networks and Bayesian normalizing flows, vectorized.

A mean-field Gaussian posterior over any subset of a module's parameters, many posterior
samples evaluated in one :func:`torch.func.vmap` pass, and :class:`BayesianModel`, a
drop-in superset of :class:`zuko.bayesian.BayesianModel`.
"""

__version__ = "0.1.0"

__all__ = [
    "BayesianModel",
    "Posterior",
    "VmapFallbackWarning",
    "init",
    "kl_divergence",
    "loop_call",
    "mean_model",
    "mean_params",
    "sample",
    "select",
    "std",
    "vmap_call",
]

from .bayesian import BayesianModel
from .call import VmapFallbackWarning, loop_call, vmap_call
from .posterior import (
    Posterior,
    init,
    kl_divergence,
    mean_model,
    mean_params,
    sample,
    select,
    std,
)
