"""Infinite-width Bayesian learning: closed-form GP regression, evidence, hyperparameter recovery."""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS
from scipy import stats

import eft_prob as ep
from eft_prob.distributions import BayesianPosterior, NetworkPrior

SPEC = ep.MLPSpec(2, (64, 64), 2, "relu", C_b=0.1, C_W=2.0)
X = np.array([[-1.0, 0.3], [-0.2, 0.8], [0.5, -0.4], [1.1, 0.9], [0.3, 0.3]])
Y = np.random.default_rng(0).normal(size=(5, 2))
XT = np.array([[0.0, 0.0], [0.7, 0.2]])


def test_posterior_matches_joint_gaussian_conditioning():
    K = np.asarray(ep.theory.nngp(SPEC, np.concatenate([X, XT])))
    s2 = 0.05
    A, B = slice(0, 5), slice(5, 7)
    # condition the joint Gaussian of (y_A, f_B) with numpy's generic solver
    S_yy = K[A, A] + s2 * np.eye(5)
    mean = K[B, A] @ np.linalg.solve(S_yy, Y)
    cov = K[B, B] - K[B, A] @ np.linalg.solve(S_yy, K[A, B])
    d = BayesianPosterior(SPEC, X, Y, XT, noise_var=s2)
    np.testing.assert_allclose(d.mean, mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d.input_covariance, cov, rtol=1e-8, atol=1e-12)
    dn = BayesianPosterior(SPEC, X, Y, XT, noise_var=s2, include_noise=True)
    np.testing.assert_allclose(dn.input_covariance, cov + s2 * np.eye(2), rtol=1e-8)


def test_small_noise_interpolates_training_points():
    d = BayesianPosterior(SPEC, X, Y, X[:2], noise_var=1e-9)
    np.testing.assert_allclose(d.mean, Y[:2], atol=1e-6)
    assert float(d.variance.max()) < 1e-6


def test_log_evidence_matches_scipy_and_network_prior_likelihood():
    s2 = 0.1
    K = np.asarray(ep.theory.nngp(SPEC, X))
    ref = sum(stats.multivariate_normal(np.zeros(5), K + s2 * np.eye(5)).logpdf(Y[:, i]) for i in range(2))
    assert float(ep.theory.log_evidence(SPEC, X, Y, s2)) == pytest.approx(ref, rel=1e-10)
    # NetworkPrior adds its relative 1e-10 diagonal jitter, hence rel 1e-8 here
    assert float(NetworkPrior(SPEC, X, noise_var=s2).log_prob(Y)) == pytest.approx(ref, rel=1e-8)
    with pytest.raises(ValueError, match="order must be 0"):  # order=1: tests/theory/test_bayes_nlo.py
        ep.theory.log_evidence(SPEC, X, Y, s2, order=2)
    g = jax.grad(lambda c: ep.theory.log_evidence(SPEC.replace(C_W=c), X, Y, s2))(2.0)
    assert np.isfinite(float(g))


@pytest.mark.slow
def test_nuts_recovers_C_W_and_noise_var_from_data_of_real_networks():
    """Data: outputs of real width-256 ReLU networks plus noise; NUTS through NetworkPrior's likelihood."""
    true_cw, true_s2 = 1.6, 0.04
    spec = ep.MLPSpec(1, (256, 256), 1, "relu", C_b=0.1, C_W=true_cw)
    x = np.linspace(-2.0, 2.0, 15)[:, None]
    f = ep.ensemble.prior_outputs(spec, x, 40, jax.random.key(11))  # 40 independent data sets
    y = np.asarray(f) + np.sqrt(true_s2) * np.random.default_rng(12).normal(size=f.shape)

    def model(y):
        c = numpyro.sample("C_W", dist.LogNormal(0.0, 1.0))
        s2 = numpyro.sample("noise_var", dist.LogNormal(-2.0, 1.5))
        with numpyro.plate("datasets", y.shape[0]):
            numpyro.sample("y", NetworkPrior(spec.replace(C_W=c), x, noise_var=s2), obs=y)

    mcmc = MCMC(NUTS(model), num_warmup=300, num_samples=400, num_chains=1, progress_bar=False)
    mcmc.run(jax.random.key(13), y, extra_fields=("diverging",))
    s = mcmc.get_samples()
    assert int(mcmc.get_extra_fields()["diverging"].sum()) == 0
    for name, truth in (("C_W", true_cw), ("noise_var", true_s2)):
        v = np.asarray(s[name])
        assert abs(v.mean() - truth) < 4 * v.std(), (name, v.mean(), v.std(), truth)
        assert v.std() < 0.15 * truth  # the data actually constrain it
