"""BayesianPosterior(order=1): the O(1/n) posterior as a proper NumPyro distribution.

The physics (agreement with THEORY.md §5.2 to O(1/n²), brute-force integrals) is tested in
tests/theory/test_bayes_nlo.py; here: the distribution contract (shapes, density, sampling,
moments, fourth cumulant, jit/vmap/grad, NumPyro models), bad input, and hyperparameter inference
with NUTS on data from real finite networks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions.batch_util import promote_batch_shape
from numpyro.infer import MCMC, NUTS, Predictive
from scipy import stats

import eft_prob as ep
from eft_prob.distributions import (
    BayesianPosterior,
    FiniteWidthPosterior,
    MatrixNormalMixture,
    MomentMatchedPosterior,
    NetworkPrior,
)
from eft_prob.theory import prior_statistics
from eft_prob.theory.bayes import gp_posterior, log_evidence, nlo_posterior_moments

from .conftest import assert_consistent

SPEC = ep.MLPSpec.at_criticality(2, (64, 64), 2, "tanh")
X = np.array([[1.0, 0.3], [-0.4, 0.9], [0.2, -1.1]])
XT = np.array([[0.5, 0.5], [-0.8, -0.2], [1.0, 0.3]])  # the last test input is X[0]
Y = np.array([[0.8, -0.3], [0.1, 0.6], [-0.5, 0.2]])
S2 = 0.05


@pytest.fixture(scope="module")
def mixture():
    return BayesianPosterior(SPEC, X, Y, XT, S2, order=1, form="mixture")


@pytest.fixture(scope="module")
def gaussian():
    return BayesianPosterior(SPEC, X, Y, XT, S2, order=1)


def test_dispatch_shapes_and_forms(mixture, gaussian):
    assert isinstance(mixture, FiniteWidthPosterior) and isinstance(mixture, MatrixNormalMixture)
    assert isinstance(gaussian, MomentMatchedPosterior)
    # 5 distinct inputs (X_test repeats X[0]): 15 kernel coordinates, 2·16 sigma points
    assert mixture.n_components == 32 and mixture.kernel_shift.shape == (6, 6)
    for d in (mixture, gaussian):
        assert d.event_shape == (3, 2) and d.batch_shape == ()
        assert d.sample(jax.random.key(0), (5, 4)).shape == (5, 4, 3, 2)
        assert d.log_prob(d.sample(jax.random.key(1), (7,))).shape == (7,)
        assert d.mean.shape == d.variance.shape == (3, 2)
        assert d.covariance_matrix.shape == (6, 6)
    assert isinstance(BayesianPosterior(SPEC, X, Y, XT, S2), ep.distributions.KernelGaussian)
    for bad in (2, "one", True):
        with pytest.raises(ValueError, match="order must be 0"):
            BayesianPosterior(SPEC, X, Y, XT, S2, order=bad)
    with pytest.raises(ValueError, match="form must be"):
        BayesianPosterior(SPEC, X, Y, XT, S2, order=1, form="exact")


def test_log_prob_is_the_mixture_of_component_gaussians(mixture):
    d = mixture
    v = np.asarray(d.sample(jax.random.key(2), (4,)))
    p = np.exp(np.asarray(d.log_weights))
    locs, covs = np.asarray(d.locs), np.asarray(d.component_covariances)
    ref = [
        np.log(
            sum(
                pk * np.prod([stats.multivariate_normal(m[:, i], S).pdf(x[:, i]) for i in range(2)])
                for pk, m, S in zip(p, locs, covs)
            )
        )
        for x in v
    ]
    np.testing.assert_allclose(d.log_prob(v), ref, rtol=1e-9)
    # the components really differ in their means (the posterior is not a KernelMixture)
    assert np.ptp(locs[:, 0, 0]) > 1e-3


def test_moments_are_the_law_of_total_covariance_and_the_formulas(mixture, gaussian):
    d = mixture
    p = np.exp(np.asarray(d.log_weights))
    locs = np.asarray(d.locs).reshape(d.n_components, -1)
    m = p @ locs
    within = np.einsum("k,kab->ab", p, np.asarray(d.component_covariances))
    cov = np.kron(within, np.eye(2)) + np.einsum("k,ka,kb->ab", p, locs - m, locs - m)
    np.testing.assert_allclose(d.mean, m.reshape(3, 2), rtol=1e-12)
    np.testing.assert_allclose(d.covariance_matrix, cov, rtol=1e-10, atol=1e-14)
    # the coupling between output neurons: nonzero, and absent at order 0
    assert abs(float(d.covariance_matrix[0, 1])) > 1e-5
    r = nlo_posterior_moments(SPEC, X, Y, XT, S2)
    jit = 1e-10 * float(np.mean(np.diagonal(r.gp_covariance)) + S2)  # the documented relative jitter
    np.testing.assert_allclose(gaussian.mean, r.mean, rtol=1e-12)
    np.testing.assert_allclose(gaussian.covariance_matrix, r.covariance + jit * np.eye(6), rtol=1e-9, atol=1e-13)
    assert float(gaussian.log_evidence) == pytest.approx(float(log_evidence(SPEC, X, Y, S2, order=1)), rel=1e-12)
    # mixture and formulas agree to O(1/n²) (see tests/theory/test_bayes_nlo.py for the scaling);
    # here: far closer than the O(1/n) corrections themselves
    g0 = gp_posterior(SPEC, X, Y, XT, S2)
    order1 = np.abs(np.asarray(r.mean) - np.asarray(g0.mean)).max()
    assert np.abs(np.asarray(d.mean) - np.asarray(r.mean)).max() < 0.1 * order1


def test_include_noise_adds_the_noise_to_every_form():
    for form in ("mixture", "gaussian"):
        a = BayesianPosterior(SPEC, X, Y, XT[:2], S2, order=1, form=form)
        b = BayesianPosterior(SPEC, X, Y, XT[:2], S2, order=1, form=form, include_noise=True)
        np.testing.assert_allclose(b.covariance_matrix - a.covariance_matrix, S2 * np.eye(4), atol=1e-10)
        np.testing.assert_allclose(b.mean, a.mean, rtol=1e-12)


def test_samples_reproduce_mean_and_covariance(mixture, gaussian):
    for d in (mixture, gaussian):
        M = 40_000
        s = np.asarray(d.sample(jax.random.key(3), (M,))).reshape(M, -1)
        mean, cov = np.asarray(d.mean).ravel(), np.asarray(d.covariance_matrix)
        sd = np.sqrt(np.diag(cov))
        assert_consistent(s.mean(0), sd / np.sqrt(M), mean, 4.5, f"{type(d).__name__} mean")
        c = (s - mean)[:, :, None] * (s - mean)[:, None, :]
        assert_consistent(c.mean(0), c.std(0) / np.sqrt(M), cov, 4.5, f"{type(d).__name__} covariance")


def test_fourth_cumulant_by_quadrature_of_the_density():
    """One test input, two output neurons: integrate exp(log_prob) on a 2-D grid; total mass 1 and
    mean, covariance and every fourth cumulant as the closed forms (trapezoid rule: spectral accuracy)."""
    st = prior_statistics(SPEC, X)
    n = 16  # narrow: a visible non-Gaussian posterior
    d = FiniteWidthPosterior.from_statistics(st.K + st.K1 / n, st.V, n, Y[:2], S2)
    sd = np.sqrt(np.diag(np.asarray(d.covariance_matrix)))
    mu = np.asarray(d.mean).ravel()
    g = [np.linspace(m - 10 * s, m + 10 * s, 401) for m, s in zip(mu, sd)]
    F = np.stack(np.meshgrid(*g, indexing="ij"), -1).reshape(-1, 1, 2)
    w = np.exp(np.asarray(d.log_prob(F))) * (g[0][1] - g[0][0]) * (g[1][1] - g[1][0])
    f = F.reshape(-1, 2)
    assert w.sum() == pytest.approx(1.0, abs=1e-10)
    m = w @ f
    c = f - m
    C = np.einsum("p,pa,pb->ab", w, c, c)
    m4 = np.einsum("p,pa,pb,pc,pd->abcd", w, c, c, c, c)
    k4 = m4 - (np.einsum("ab,cd->abcd", C, C) + np.einsum("ac,bd->abcd", C, C) + np.einsum("ad,bc->abcd", C, C))
    np.testing.assert_allclose(m, mu, atol=1e-10)
    np.testing.assert_allclose(C, d.covariance_matrix, rtol=1e-9)
    k = np.asarray(d.fourth_cumulant())
    np.testing.assert_allclose(k, k4, atol=1e-8 * np.abs(k4).max())
    assert np.abs(k4).max() > 1e-3 * np.max(np.diag(C)) ** 2  # not Gaussian: the test can fail for one


def test_training_input_in_X_test_and_small_noise():
    """X_test may repeat a training input: the mixture is built on the distinct inputs.  With small
    noise the posterior there sits at y with variance ≈ σ²."""
    s2 = 1e-6
    with pytest.warns(ep.ApproximationWarning, match="effective number"):  # σ² = 1e-6: a sharp likelihood
        d = BayesianPosterior(SPEC, X, Y, XT, s2, order=1, form="mixture")
    np.testing.assert_allclose(d.mean[2], Y[0], atol=1e-3)
    assert float(jnp.max(d.variance[2])) < 2 * s2
    assert np.isfinite(float(d.log_prob(d.mean)))
    ks = np.asarray(d.kernel_shift)
    np.testing.assert_array_equal(ks[0], ks[5])  # the same input, the same kernel row


def test_log_evidence_of_prior_mixture_posterior_mixture_and_formula_agree():
    """Three routes to log p(y) at O(1/n): NetworkPrior(order=1, noise_var).log_prob(y), the posterior
    mixture's normalizer and the §5.2 formula.  They differ at O(1/n²) only."""
    y = np.asarray(NetworkPrior(SPEC, X).sample(jax.random.key(4)))  # data typical of the prior
    d = BayesianPosterior(SPEC, X, y, XT[:2], S2, order=1, form="mixture")
    a = float(NetworkPrior(SPEC, X, order=1, noise_var=S2).log_prob(y))
    b = float(d.log_evidence)
    c = float(log_evidence(SPEC, X, y, S2, order=1))
    c0 = float(log_evidence(SPEC, X, y, S2))
    assert abs(c - c0) > 1e-3  # a resolved O(1/n) correction
    # the remainder is O(ε) relative to it, ε = V/(nK²) ≈ 0.03 here: allow 10·ε
    assert abs(a - c) < 0.3 * abs(c - c0) and abs(b - c) < 0.3 * abs(c - c0), (a, b, c, c0)


# transformations are tested on one training input and two test inputs, one of them the training
# input again: two distinct inputs keep the traced vertex to two-input integrals (fast to compile)
X1, Y1, XT1 = X[:1], Y[:1], np.stack([XT[0], X[0]])


def _make(c, form="mixture", xt=XT1):
    return BayesianPosterior(SPEC.replace(C_W=c), X1, Y1, xt, S2, order=1, form=form)


def _grad_vs_fd(form):
    """d/dC_W of log_prob + log_evidence (the latter: the O(1/n) evidence for the Gaussian form)."""
    v = _make(1.0, form, XT1[:1]).sample(jax.random.key(5))

    def f(c):
        d = _make(c, form, XT1[:1])
        return d.log_prob(v) + d.log_evidence

    g = float(jax.grad(f)(1.0))
    fd = (float(f(1.0 + 1e-6)) - float(f(1.0 - 1e-6))) / 2e-6
    assert np.isfinite(g) and g == pytest.approx(fd, rel=1e-5)


def test_jit_vmap_pytree_and_numpyro(mixture):
    d = _make(1.0)
    v = d.sample(jax.random.key(5))
    d2 = jax.jit(lambda: _make(1.0))()  # built under jit (pytree round trip), X_test repeating X[0]
    np.testing.assert_allclose(d2.log_prob(v), d.log_prob(v), rtol=1e-9)
    np.testing.assert_allclose(d2.kernel_shift, d.kernel_shift, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(jax.jit(lambda dd, x: dd.log_prob(x))(d, v), d.log_prob(v), rtol=1e-12)
    batched = promote_batch_shape(jax.vmap(_make)(jnp.array([0.9, 1.1])))
    assert batched.batch_shape == (2,)
    np.testing.assert_allclose(batched.log_prob(v)[1], _make(1.1).log_prob(v), rtol=1e-9)

    def model(obs=None):
        return numpyro.sample("f", mixture, obs=obs)

    pr = Predictive(model, num_samples=3)(jax.random.key(6))
    assert pr["f"].shape == (3, 3, 2) and not np.allclose(pr["f"][0], pr["f"][1])
    tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(obs=pr["f"][0])
    assert np.isfinite(float(tr["f"]["fn"].log_prob(tr["f"]["value"])))


@pytest.mark.slow
@pytest.mark.heavy
def test_grad_over_hyperparameters():
    for form in ("mixture", "gaussian"):
        _grad_vs_fd(form)


def test_many_inputs_give_the_moment_matched_gaussian():
    rng = np.random.default_rng(7)
    x, xt = rng.normal(size=(40, 2)), rng.normal(size=(25, 2))
    y = rng.normal(size=(40, 2)) * 0.3
    with pytest.raises(ValueError, match="up to 64 distinct inputs"):
        BayesianPosterior(SPEC, x, y, xt, S2, order=1, form="mixture")
    d = BayesianPosterior(SPEC, x, y, xt, S2, order=1, samples=512)
    assert isinstance(d, MomentMatchedPosterior) and d.event_shape == (25, 2)
    r = nlo_posterior_moments(SPEC, x, y, xt, S2, samples=512)
    np.testing.assert_allclose(d.mean, r.mean, rtol=1e-12)
    assert np.isfinite(float(d.log_prob(d.mean)))


def test_bad_input():
    with pytest.raises(ValueError, match=r"noise_var must be a finite scalar > 0.*X_test row 2 equals X row 0"):
        BayesianPosterior(SPEC, X, Y, XT, 0.0, order=1)
    with pytest.raises(ValueError, match="noise_var must be a finite scalar > 0"):
        BayesianPosterior(SPEC, X, Y, XT, -1.0, order=1, form="gaussian")
    with pytest.raises(ValueError, match=r"y must have shape \(N_train, output_dim\) = \(3, 2\)"):
        BayesianPosterior(SPEC, X, Y.T, XT, S2, order=1)
    with pytest.raises(ValueError, match="y contains NaN"):
        BayesianPosterior(SPEC, X, np.where(Y > 0.7, np.nan, Y), XT, S2, order=1)
    with pytest.raises(ValueError, match="X_test must have shape"):
        BayesianPosterior(SPEC, X, Y, XT[:, :1], S2, order=1)
    with pytest.raises(ValueError, match="hidden layer"):
        BayesianPosterior(ep.MLPSpec(2, (), 2, "tanh"), X, Y, XT, S2, order=1)
    with pytest.raises(ValueError, match="scale_trils must be"):
        MatrixNormalMixture(jnp.zeros((2, 3, 1)), jnp.broadcast_to(jnp.eye(2), (2, 2, 2)), jnp.zeros(2))


def test_narrow_networks_warn():
    spec = ep.MLPSpec.at_criticality(2, (4, 4), 2, "tanh")
    with pytest.warns(ep.RegimeWarning, match="1/n expansion is not reliable"):
        BayesianPosterior(spec, X, Y, XT[:1], S2, order=1)


# --------------------------------------------------------------------------------------------
# Hyperparameter inference (issue item 5).


@pytest.mark.slow
@pytest.mark.heavy
def test_nuts_recovers_hyperparameters_from_real_finite_networks():
    """Data: 3000 independent width-12 tanh networks evaluated at two inputs, plus noise.  NUTS over
    (C_W, C_b, noise_var) with NetworkPrior(order=1, noise_var) — the O(1/n) evidence — as the
    likelihood, and the same with order=0.  Both recover the truth within their posterior
    uncertainty (two inputs of different norms: the noise competes only with the kernel diagonal)."""
    true = {"C_W": 1.5, "C_b": 0.2, "noise_var": 0.1}
    x = np.array([[2.0, 0.0], [0.1, 0.3]])
    spec = ep.MLPSpec(2, (12, 12), 2, "tanh", C_b=true["C_b"], C_W=true["C_W"])
    f = np.asarray(ep.ensemble.prior_outputs(spec, x, 3000, jax.random.key(21)))
    y = f + np.sqrt(true["noise_var"]) * np.random.default_rng(22).normal(size=f.shape)

    def model(y, order):
        c = numpyro.sample("C_W", dist.LogNormal(0.0, 0.5))
        b = numpyro.sample("C_b", dist.LogNormal(np.log(0.1), 1.0))
        s2 = numpyro.sample("noise_var", dist.LogNormal(np.log(0.05), 1.5))
        with numpyro.plate("datasets", y.shape[0]):
            numpyro.sample("y", NetworkPrior(spec.replace(C_W=c, C_b=b), x, order=order, noise_var=s2), obs=y)

    summary = {}
    for order in (0, 1):
        kernel = NUTS(model, dense_mass=True, max_tree_depth=5)  # (C_W, C_b, σ²) are correlated
        mcmc = MCMC(kernel, num_warmup=60, num_samples=80, progress_bar=False)
        mcmc.run(jax.random.key(23), y, order, extra_fields=("diverging",))
        s = mcmc.get_samples()
        assert int(mcmc.get_extra_fields()["diverging"].sum()) <= 2
        summary[order] = {k: (float(np.mean(s[k])), float(np.std(s[k]))) for k in true}
        for k, t in true.items():
            m, sd = summary[order][k]
            assert abs(m - t) < 4 * sd, (order, k, m, sd, t)
        sd = {k: v[1] / true[k] for k, v in summary[order].items()}
        assert sd["C_W"] < 0.1 and sd["C_b"] < 0.1 and sd["noise_var"] < 0.5, sd  # the data constrain them
    print("NUTS hyperparameter recovery (mean ± sd):", summary)
