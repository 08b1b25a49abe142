"""Analytic results of the effective theory, as pure functions of (spec, X) (float64)."""

from .bayes import (
    NLOMarginals,
    NLOMoments,
    gp_posterior,
    log_evidence,
    nlo_posterior_marginals,
    nlo_posterior_moments,
    posterior_kernel_shift,
)
from .kernels import Kernels, kernels, nngp, ntk, output_kernels
from .ntk_stats import NTKStatistics, ntk_statistics
from .training import (
    NLOTrainedCoefficients,
    NLOTrainedMarginals,
    TrainedMarginals,
    TrainedMoments,
    gd_prediction,
    nlo_trained_coefficients,
    nlo_trained_marginals,
    nlo_trained_moments,
)
from .vertex import FactoredVertex, PriorStatistics, four_point_vertex, nlo_kernel, prior_statistics

__all__ = [
    "FactoredVertex",
    "Kernels",
    "NLOMarginals",
    "NLOMoments",
    "NLOTrainedCoefficients",
    "NLOTrainedMarginals",
    "NTKStatistics",
    "PriorStatistics",
    "TrainedMarginals",
    "TrainedMoments",
    "four_point_vertex",
    "gd_prediction",
    "gp_posterior",
    "kernels",
    "log_evidence",
    "nlo_kernel",
    "nlo_posterior_marginals",
    "nlo_posterior_moments",
    "nlo_trained_coefficients",
    "nlo_trained_marginals",
    "nlo_trained_moments",
    "nngp",
    "ntk",
    "ntk_statistics",
    "output_kernels",
    "posterior_kernel_shift",
    "prior_statistics",
]
