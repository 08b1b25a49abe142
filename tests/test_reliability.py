"""Bad input through the public API and the CLI: a clear error naming the argument and the fix,
raised by eft_prob itself (not from deep inside JAX/NumPyro), and no partial output.

The spec-file cases of the CLI (40 kinds: unknown keys, wrong types, impossible values, corrupt
TOML, missing data files, unwritable --out, ...) are in tests/test_cli.py; here a few of them go
through the installed ``eft-prob`` command in a subprocess to check that no traceback reaches the
user.
"""

import os
import pathlib
import subprocess
import sys
import traceback

import jax
import numpy as np
import pytest

import eft_prob as ep
from eft_prob import distributions as D
from eft_prob import inference

S = ep.MLPSpec(2, (16, 16), 1, "tanh", C_b=0.1, C_W=1.5)
X = np.array([[-1.0, 0.3], [-0.2, 0.8], [0.5, -0.4]])
Y = np.array([[0.5], [0.2], [-0.4]])
XT = np.array([[0.0, 0.0]])
NAN = np.nan
K0 = jax.random.key(0)
ODD = ep.MLPSpec(1, (256, 256), 1, "tanh", C_b=0.0, C_W=1.0)  # odd functions: a near-singular K on a 1-D grid

CASES = {
    # architecture and prior
    "input_dim 0": (lambda: ep.MLPSpec(0, (16,), 1, "tanh"), "input_dim must be a positive integer"),
    "zero width": (lambda: ep.MLPSpec(2, (0, 16), 1, "tanh"), r"hidden\[0\] .* positive integer"),
    "negative width": (lambda: ep.MLPSpec(2, (-4,), 1, "tanh"), r"hidden\[0\]"),
    "fractional width": (lambda: ep.MLPSpec(2, (16.5,), 1, "tanh"), r"hidden\[0\]"),
    "output_dim 0": (lambda: ep.MLPSpec(2, (16,), 0, "tanh"), "output_dim"),
    "unknown activation": (lambda: ep.MLPSpec(2, (16,), 1, "tanhh"), "'tanhh' is not known. Use one of"),
    "negative C_W": (lambda: ep.MLPSpec(2, (16,), 1, "tanh", C_W=-1.0), "C_W must be > 0"),
    "negative C_b": (lambda: ep.MLPSpec(2, (16,), 1, "tanh", C_b=-0.1), "C_b must be >= 0"),
    "NaN C_W": (lambda: ep.MLPSpec(2, (16,), 1, "tanh", C_W=NAN), "C_W must be finite"),
    "per-layer list length": (lambda: ep.MLPSpec(2, (16,), 1, "tanh", C_W=[1.0] * 3), "L=2 per-layer"),
    "negative lambda_W": (lambda: ep.MLPSpec(2, (16,), 1, "tanh", lambda_W=-1.0), "lambda_W must be >= 0"),
    # inputs and targets
    "X wrong input_dim": (lambda: D.NetworkPrior(S, np.zeros((3, 3))), r"X must have shape \(N, input_dim\)"),
    "X one-dimensional": (lambda: D.NetworkPrior(S, np.zeros(3)), r"reshape\(-1, 2\)"),
    "X empty": (lambda: D.NetworkPrior(S, np.zeros((0, 2))), "at least one input"),
    "X NaN": (lambda: D.NetworkPrior(S, np.where(X > 0.7, NAN, X)), "X contains 1 NaN"),
    "X inf": (lambda: ep.theory.kernels(S, np.where(X > 0.7, np.inf, X)), "NaN or infinite"),
    "X_test wrong shape": (lambda: D.BayesianPosterior(S, X, Y, np.zeros((2, 5)), 0.1), "X_test must have shape"),
    "y wrong shape": (lambda: D.BayesianPosterior(S, X, Y[:2], XT, 0.1), r"y must have shape .* \(3, 1\)"),
    "y NaN": (lambda: D.BayesianPosterior(S, X, np.where(Y > 0.4, NAN, Y), XT, 0.1), "y contains NaN"),
    "y wrong shape (training)": (lambda: ep.ensemble.train(S, X, Y[:2], XT, 4, 0.1, 5, K0), "y must have shape"),
    "duplicated inputs at order 1": (lambda: D.NetworkPrior(S, np.concatenate([X, X[:1]]), order=1), "rows 0 and 3"),
    # variances, orders, learning rates
    "negative noise_var": (lambda: D.NetworkPrior(S, X, noise_var=-1.0), "noise_var must be a finite scalar >= 0"),
    "NaN noise_var": (lambda: D.NetworkPrior(S, X, noise_var=NAN), "noise_var"),
    "zero noise_var (posterior)": (lambda: D.BayesianPosterior(S, X, Y, XT, 0.0), "noise_var must be .* > 0"),
    "zero noise_var (evidence)": (lambda: ep.theory.bayes.log_evidence(S, X, Y, 0.0), "noise_var"),
    "unknown order": (lambda: D.NetworkPrior(S, X, order=3), "order must be 0"),
    "negative learning_rate": (lambda: D.TrainedNetwork(S, X, Y, XT, -0.1), "learning_rate must be"),
    "steps without learning_rate": (lambda: D.TrainedNetwork(S, X, Y, XT, steps=10), "learning_rate is required"),
    "negative steps": (lambda: D.TrainedNetwork(S, X, Y, XT, 0.1, steps=-1), "steps must be a non-negative"),
    "order 1 training with ReLU": (
        lambda: D.TrainedNetwork(S.replace(activation="relu"), X, Y, XT, 0.1, order=1),
        "not available for the kinked activation 'relu'",
    ),
    "learning rate above the bound (order 1)": (
        lambda: D.TrainedNetwork(S, X, Y, XT, 50.0, order=1),
        "stability bound",
    ),
    "exact law outside its domain": (lambda: D.NetworkPrior(S, X, order="exact"), "scale-invariant activation"),
    # distributions built by hand
    "non-PSD scale_tril": (lambda: D.KernelGaussian(np.zeros((2, 1)), -np.eye(2), validate_args=True), "scale_tril"),
    "scale_tril shape": (lambda: D.KernelGaussian(np.zeros((2, 1)), np.eye(3)), r"N = loc.shape\[-2\] = 2"),
    # ensembles and samplers
    "zero networks (training)": (lambda: ep.ensemble.train(S, X, Y, XT, 0, 0.1, 5, K0), "n_networks"),
    "zero networks (prior)": (lambda: ep.ensemble.prior_outputs(S, X, 0, K0), "n_networks"),
    "NaN learning rate (training)": (lambda: ep.ensemble.train(S, X, Y, XT, 4, NAN, 5, K0), "learning_rate"),
    "negative steps (training)": (lambda: ep.ensemble.train(S, X, Y, XT, 4, 0.1, -3, K0), "steps"),
    "zero chains (NUTS)": (
        lambda: inference.run_nuts(S, X, Y, XT, noise_var=0.1, num_chains=0, num_warmup=5, num_samples=5, seed=0),
        "num_chains",
    ),
    "zero noise (NUTS)": (
        lambda: inference.run_nuts(S, X, Y, XT, noise_var=0.0, num_chains=1, num_warmup=5, num_samples=5, seed=0),
        "noise_var",
    ),
    "unknown activation (criticality)": (lambda: ep.criticality.critical_points("foo"), "'foo' is not known"),
    "near-singular kernel (order-1 mixture)": (
        lambda: D.NetworkPrior(ODD, np.linspace(-1.25, 1.5, 7)[:, None], order=1),
        "cannot be built on these inputs: the kernel K \\+ K1/n is numerically near-singular",
    ),
    "overflowing recursion": (
        lambda: D.NetworkPrior(ep.MLPSpec(2, (16,) * 400, 1, "relu", C_W=30.0), X),
        "NaN or infinite",
    ),
}
FROM_NUMPYRO_VALIDATION = {"non-PSD scale_tril"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_a_clear_error_from_eft_prob(name):
    fn, match = CASES[name]
    with pytest.raises((ValueError, FloatingPointError)) as info:
        fn()
    assert info.match(match)
    # raised by eft_prob's own checks, not from inside JAX or NumPyro (NumPyro's validate_args,
    # which the user asked for, is the documented exception)
    frames = traceback.extract_tb(info.value.__traceback__)
    origin = "numpyro" if name in FROM_NUMPYRO_VALIDATION else "eft_prob"
    assert f"{os.sep}{origin}{os.sep}" in frames[-1].filename, frames[-1]


def test_near_singular_kernel_posterior():
    """The mixture cannot be built (clear error); the default O(1/n) moments are fine there."""
    X1, XT1 = np.linspace(-1.25, 1.5, 3)[:, None], np.array([[-0.9], [-0.2], [0.6], [1.2]])
    with pytest.raises(ValueError, match="near-singular"):
        D.BayesianPosterior(ODD, X1, np.sin(X1), XT1, 0.0025, order=1, form="mixture")
    d = D.BayesianPosterior(ODD, X1, np.sin(X1), XT1, 0.0025, order=1)
    assert isinstance(d, D.MomentMatchedPosterior) and np.all(np.isfinite(np.asarray(d.mean)))
    d0 = D.BayesianPosterior(ODD, X1, np.sin(X1), XT1, 0.0025)
    np.testing.assert_allclose(d.mean, d0.mean, atol=0.02)  # an O(1/n) shift at n = 256


def test_sharp_likelihood_warns_for_the_mixture():
    """Small noise on 5 points at width 16: the data pick out a few of the mixture's kernel points."""
    spec = ep.MLPSpec(1, (16, 16), 1, "tanh", C_b=0.1, C_W=1.0)
    X1 = np.linspace(-1.5, 1.5, 5)[:, None]
    y1 = np.sin(1.5 * X1) + 0.3 + 0.1 * np.random.default_rng(0).normal(size=X1.shape)
    with pytest.warns(ep.ApproximationWarning, match="effective number"):
        D.BayesianPosterior(spec, X1, y1, np.array([[0.4]]), 0.01, order=1, form="mixture")


def test_there_are_at_least_30_kinds():
    assert len(CASES) >= 30


ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("[model\nhidden = [8]\n", "not valid TOML"),
        ("[model]\nhiden = [8]\n", "hiden"),
        ('[model]\nactivation = "tanhh"\n', "activation"),
        ("[model]\nhidden = [0, 8]\n", "hidden"),
        ('[data]\ngenerator = "file"\npath = "missing.npz"\n', "not found"),
    ],
)
def test_cli_errors_reach_the_user_without_a_traceback_or_output(tmp_path, text, word):
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-m", "eft_prob.cli", "run", str(spec), "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and word in r.stderr and str(spec) in r.stderr
    assert not out.exists()


class _Stop(Exception):
    """Raised after a warning, to skip an expensive computation that follows it."""


def _in_a_numpyro_model():
    import numpyro
    from numpyro import handlers

    def model():
        numpyro.sample("f", D.NetworkPrior(ep.MLPSpec.at_criticality(2, (8, 8, 8), 1, "relu"), X, order=1))

    handlers.seed(model, 0)()


def _trained_many_inputs(monkeypatch):
    from eft_prob.theory import training

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(training, "_trained_statistics", stop)
    XA = np.random.default_rng(0).normal(size=(33, 2))
    D.TrainedNetwork(S, XA[:10], np.zeros((10, 1)), XA[10:], order=1)


def _traced_in_float32():
    with jax.enable_x64(False):
        jax.jit(lambda x: ep.theory.nngp(S, x))(X)


def _sharp_mixture():
    spec = ep.MLPSpec(1, (16, 16), 1, "tanh", C_b=0.1, C_W=1.0)
    X1 = np.linspace(-1.5, 1.5, 5)[:, None]
    y1 = np.sin(1.5 * X1) + 0.3 + 0.1 * np.random.default_rng(0).normal(size=X1.shape)
    D.BayesianPosterior(spec, X1, y1, np.array([[0.4]]), 0.01, order=1, form="mixture")


NARROW = ep.MLPSpec.at_criticality(2, (4, 4), 1, "tanh")  # ε ≈ 0.3: outside the 1/n regime
WARNING_PATHS = {
    "theory function (StabilityWarning)": lambda mp: ep.theory.gd_prediction(S, X, Y, XT, 10.0, 5),
    "distribution (StabilityWarning)": lambda mp: D.TrainedNetwork(S, X, Y, XT, learning_rate=10.0, steps=5),
    "NetworkPrior(order=1) (RegimeWarning)": lambda mp: D.NetworkPrior(NARROW, X, order=1),
    "BayesianPosterior(order=1) (RegimeWarning)": lambda mp: D.BayesianPosterior(NARROW, X, Y, XT, 0.1, order=1),
    "nlo_posterior_moments (RegimeWarning)": lambda mp: ep.theory.nlo_posterior_moments(NARROW, X, Y, XT, 0.1),
    "inside a NumPyro model (RegimeWarning)": lambda mp: _in_a_numpyro_model(),
    "ensemble.train (StabilityWarning)": lambda mp: ep.ensemble.train(S, X, Y, XT, 4, 50.0, 3, K0),
    "TrainedNetwork(order=1), 33 inputs (CostWarning)": _trained_many_inputs,
    "traced with x64 off (PrecisionWarning)": lambda mp: _traced_in_float32(),
    "the mixture form (ApproximationWarning)": lambda mp: _sharp_mixture(),
}


@pytest.mark.parametrize("path", list(WARNING_PATHS))
def test_warnings_name_the_callers_line(path, monkeypatch):
    """Every eft_prob warning is attributed to the first frame outside the package, however deep the
    library's own call chain (direct calls, distributions, NumPyro handlers, jit) — not to eft_prob."""
    import warnings

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            WARNING_PATHS[path](monkeypatch)
        except _Stop:
            pass
    ours = [w for w in rec if w.category.__module__.startswith("eft_prob")]
    assert ours, [str(w.message) for w in rec]
    assert {w.filename for w in ours} == {__file__}, [(w.category.__name__, w.filename, w.lineno) for w in ours]
