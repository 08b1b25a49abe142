"""Analytic results of the effective theory, as pure functions of (spec, X) (float64)."""

from .bayes import gp_posterior, log_evidence
from .kernels import Kernels, kernels, nngp, ntk, output_kernels
from .training import gd_prediction

__all__ = ["Kernels", "gd_prediction", "gp_posterior", "kernels", "log_evidence", "nngp", "ntk", "output_kernels"]
