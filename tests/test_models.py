"""NumPyro programs: the prior over θ reproduces the NNGP kernel; the Bayesian MLP runs under NUTS."""

import jax
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS, Predictive

import eft_prob as ep
from eft_prob.models import bayesian_mlp, network_prior

X = np.array([[-1.0, 0.5], [0.3, -0.2], [0.8, 0.9]])


def test_network_prior_sites_and_kernel():
    spec = ep.MLPSpec(2, (128, 128), 2, "tanh", C_b=0.2, C_W=1.5)
    pred = Predictive(network_prior, num_samples=4000)(jax.random.key(0), spec, X)
    assert set(pred) == {"W1", "b1", "W2", "b2", "W3", "b3", "f"}
    assert pred["W2"].shape == (4000, 128, 128)
    f = np.asarray(pred["f"])  # (S, N, n_L)
    emp = np.einsum("sai,sbi->sab", f, f) / 2
    K = np.asarray(ep.theory.nngp(spec, X))
    se = emp.std(0, ddof=1) / np.sqrt(emp.shape[0])
    # Gaussian-limit kernel within sampling error + the O(L/n) finite-width shift
    assert np.all(np.abs(emp.mean(0) - K) < 4 * se + 0.03 * np.abs(K))
    np.testing.assert_allclose(
        pred["f"][0],
        ep.nn.apply(spec, tuple({"W": pred[f"W{l}"][0], "b": pred[f"b{l}"][0]} for l in (1, 2, 3)), X),
        rtol=1e-12,
    )


def test_zero_bias_variance_has_no_bias_site():
    spec = ep.MLPSpec(2, (8,), 1, "relu", C_b=0.0)
    pred = Predictive(network_prior, num_samples=2)(jax.random.key(1), spec, X)
    assert "b1" not in pred and "W1" in pred


def test_bayesian_mlp_prior_predictive_and_errors():
    spec = ep.MLPSpec(2, (8,), 1, "tanh")
    pred = Predictive(bayesian_mlp, num_samples=3)(jax.random.key(2), spec, X, noise_var=0.1)
    assert pred["y"].shape == (3, 3, 1)
    with pytest.raises(ValueError, match="noise_var"):
        Predictive(bayesian_mlp, num_samples=1)(jax.random.key(2), spec, X, noise_var=-1.0)
    with pytest.raises(ValueError, match="y must have shape"):
        Predictive(bayesian_mlp, num_samples=1)(jax.random.key(2), spec, X, y=np.ones((2, 1)))


def test_bayesian_mlp_nuts_runs_and_learns_noise():
    spec = ep.MLPSpec(1, (8,), 1, "tanh", C_b=0.1)
    x = np.linspace(-1, 1, 10)[:, None]
    y = np.sin(2 * x) + 0.1 * np.random.default_rng(0).normal(size=x.shape)
    mcmc = MCMC(NUTS(bayesian_mlp), num_warmup=150, num_samples=150, progress_bar=False)
    mcmc.run(jax.random.key(3), spec, x, y, noise_var=dist.LogNormal(-3.0, 1.0))
    s = mcmc.get_samples()
    assert s["f"].shape == (150, 10, 1)
    resid = np.asarray(s["f"]).mean(0) - y
    assert np.sqrt(np.mean(resid**2)) < 0.3
