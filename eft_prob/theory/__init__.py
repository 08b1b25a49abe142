"""Analytic results of the effective theory, as pure functions of (spec, X) (float64)."""

from .bayes import gp_posterior, log_evidence
from .kernels import Kernels, kernels, nngp, ntk, output_kernels
from .training import gd_prediction
from .vertex import FactoredVertex, PriorStatistics, four_point_vertex, nlo_kernel, prior_statistics

__all__ = [
    "FactoredVertex",
    "Kernels",
    "PriorStatistics",
    "four_point_vertex",
    "gd_prediction",
    "gp_posterior",
    "kernels",
    "log_evidence",
    "nlo_kernel",
    "nngp",
    "ntk",
    "output_kernels",
    "prior_statistics",
]
