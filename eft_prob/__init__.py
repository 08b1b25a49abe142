"""eft_prob: the 1/n effective theory of deep MLPs as probabilistic programs.

Conventions (stated once here and in the README; THEORY.md §0.3, §1):

* Inputs X have shape (N, input_dim); network outputs f(X) = z^(L) have shape (N, n_L), and every
  distribution's event_shape is (N, n_L).
* Widths: n_0 = input_dim, n_1..n_{L-1} = ``hidden``, n_L = output_dim; L = depth = len(hidden)+1.
* Prior: b^(ℓ) ~ N(0, C_b^(ℓ)), W^(ℓ)_ij ~ N(0, C_W^(ℓ)/n_{ℓ-1}).  Learning rates: ηλ_b^(ℓ) for
  biases, ηλ_W^(ℓ)/n_{ℓ-1} for weights (the NTK scalings), MSE loss ½Σ(f − y)².
* 1/n normalization: every O(1/n) tensor living at layer ℓ is divided by n_{ℓ-1}, e.g. the
  connected four-point function is (1/n_{L-1})(V δδ + 2 permutations) and
  E[zz] = K + K^{1}/n_{L-1} + O(1/n²).  Index orders: V_{(α1α2)(α3α4)}.
* Theory is float64; see :mod:`eft_prob._config` for how x64 is handled without touching the
  user's global setting.
"""

from . import activations, criticality, distributions, ensemble, gauss, mc_kernels, models, nn, theory
from ._config import (
    ApproximationWarning,
    CostWarning,
    MemoryLimitError,
    PrecisionWarning,
    RegimeWarning,
    RegularizationWarning,
    StabilityWarning,
    enable_x64,
)
from .activations import Activation, get_activation
from .exact import ExactNetworkPrior
from .spec import MLPSpec

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "ApproximationWarning",
    "CostWarning",
    "ExactNetworkPrior",
    "MLPSpec",
    "MemoryLimitError",
    "PrecisionWarning",
    "RegimeWarning",
    "RegularizationWarning",
    "StabilityWarning",
    "activations",
    "criticality",
    "distributions",
    "enable_x64",
    "ensemble",
    "gauss",
    "get_activation",
    "mc_kernels",
    "models",
    "nn",
    "theory",
]
