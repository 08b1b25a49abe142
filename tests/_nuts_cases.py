"""NUTS runs shared by tests/test_inference.py and tests/test_compare.py, each run once per session.

Small on purpose (6 points, 1-D input, tanh, one hidden layer): NUTS is the slow part of the
suite.  ``functools.cache`` (not a fixture) lets both test modules reuse one run.
"""

import functools
import warnings

import numpy as np

import eft_prob as ep
from eft_prob import inference

NOISE_VAR = 0.01
X = np.linspace(-1.0, 1.0, 6)[:, None]
Y = np.sin(2 * X) + np.sqrt(NOISE_VAR) * np.random.default_rng(0).normal(size=X.shape)
X_TEST = np.array([[-0.8], [0.0], [0.5], [1.5]])  # three inside the data, one extrapolated


def heldout_targets(seed: int = 1) -> np.ndarray:
    """Noisy targets of the same function at X_TEST."""
    return np.sin(2 * X_TEST) + np.sqrt(NOISE_VAR) * np.random.default_rng(seed).normal(size=X_TEST.shape)


SMALL = dict(
    spec=ep.MLPSpec(1, (16,), 1, "tanh", C_b=0.1, C_W=1.0),
    num_chains=2,
    num_warmup=200,
    num_samples=200,
    seed=0,
)
# width 64: close enough to infinite width that NUTS must agree with the GP posterior (THEORY §5.1)
WIDE = dict(
    spec=ep.MLPSpec(1, (64,), 1, "tanh", C_b=0.1, C_W=1.0),
    num_chains=2,
    num_warmup=300,
    num_samples=300,
    seed=3,
)


def run(case: dict, **overrides):
    kw = {**case, **overrides}
    spec = kw.pop("spec")
    return inference.run_nuts(spec, X, Y, X_TEST, noise_var=NOISE_VAR, **kw)


@functools.cache
def small_run():
    """(idata, warnings raised while sampling) of the SMALL case."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = run(SMALL)
    return idata, tuple(caught)


@functools.cache
def wide_run():
    return run(WIDE)
