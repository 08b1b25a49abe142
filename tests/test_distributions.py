"""One generic battery over every distribution class (NumPyro's pattern), plus class specifics."""

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
from eft_prob.distributions import BayesianPosterior, KernelGaussian, NetworkPrior, TrainedNetwork

SPEC = ep.MLPSpec(2, (64, 64), 2, "tanh", C_b=0.1, C_W=1.3, lambda_b=0.5)
X = np.array([[-1.0, 0.3], [-0.2, 0.8], [0.5, -0.4], [1.1, 0.9]])
Y = np.array([[0.5, -0.1], [0.2, 0.3], [-0.4, 0.6], [0.1, 0.0]])
XT = np.array([[0.0, 0.0], [0.7, 0.2], [-1.0, 0.3]])  # the last test point is a training point

MAKERS = {
    "prior": lambda spec, xt: NetworkPrior(spec, X),
    "prior_noisy": lambda spec, xt: NetworkPrior(spec, X, noise_var=0.05),
    "bayes": lambda spec, xt: BayesianPosterior(spec, X, Y, xt, noise_var=0.01),
    "bayes_noisy": lambda spec, xt: BayesianPosterior(spec, X, Y, xt, noise_var=0.01, include_noise=True),
    "trained": lambda spec, xt: TrainedNetwork(spec, X, Y, xt, learning_rate=0.1, steps=20),
    "trained_inf": lambda spec, xt: TrainedNetwork(spec, X, Y, xt),
}
CASES = sorted(MAKERS)


@pytest.fixture(params=CASES)
def case(request):
    return request.param


def _make(case, spec=SPEC, xt=XT):
    return MAKERS[case](spec, xt)


def test_shapes_and_infer_shapes(case):
    d = _make(case)
    N = X.shape[0] if case.startswith("prior") else XT.shape[0]
    assert d.event_shape == (N, 2) and d.batch_shape == ()
    assert d.sample(jax.random.key(0)).shape == (N, 2)
    assert d.sample(jax.random.key(0), (5, 3)).shape == (5, 3, N, 2)
    assert d.log_prob(d.sample(jax.random.key(1), (7,))).shape == (7,)
    assert d.mean.shape == d.variance.shape == (N, 2)
    assert d.covariance_matrix.shape == (2 * N, 2 * N)
    assert KernelGaussian.infer_shapes(loc=(4, N, 2), scale_tril=(N, N)) == ((4,), (N, 2))


def test_log_prob_matches_scipy_and_entropy(case):
    d = _make(case)
    v = d.sample(jax.random.key(2), (3,))
    ref = stats.multivariate_normal(np.asarray(d.mean).ravel(), np.asarray(d.covariance_matrix), allow_singular=True)
    # scipy works from the eigenvalues of the reconstructed covariance; with the jittered
    # zero-variance test point (eigenvalue ~1e-11) that costs it ~7 digits, hence rel 1e-7
    rtol = 1e-7 if case.startswith("trained") else 1e-10
    np.testing.assert_allclose(d.log_prob(v), ref.logpdf(np.asarray(v).reshape(3, -1)), rtol=rtol)
    assert float(d.entropy()) == pytest.approx(ref.entropy(), rel=rtol)


def test_two_draws_differ_and_moments_match_samples(case):
    d = _make(case)
    a, b = d.sample(jax.random.key(3)), d.sample(jax.random.key(4))
    assert not np.allclose(a, b)
    s = np.asarray(d.sample(jax.random.key(5), (20000,))).reshape(20000, -1)
    mean, cov = np.asarray(d.mean).ravel(), np.asarray(d.covariance_matrix)
    sd = np.sqrt(np.diag(cov))
    ok = sd > 1e-6
    se = sd[ok] / np.sqrt(s.shape[0])
    assert np.all(np.abs(s.mean(0)[ok] - mean[ok]) < 4.5 * se)
    var_se = np.sqrt(2) * sd[ok] ** 2 / np.sqrt(s.shape[0])
    assert np.all(np.abs(s.var(0)[ok] - sd[ok] ** 2) < 4.5 * var_se)


def _rounding_atol(d):
    """log_prob's sensitivity to rounding in building the distribution: the input covariance carries
    ~eps relative rounding (jit reorders and fuses floating-point work differently), which moves its
    smallest eigenvalue, and so log_prob, by ~eps·κ (κ its condition number: ~1e10 with a jittered
    zero-variance test point).  100·eps·κ, never below 1e-12."""
    ev = np.linalg.eigvalsh(np.asarray(d.input_covariance))
    return max(1e-12, 100 * np.finfo(float).eps * ev[-1] / ev[0])


def test_pytree_jit_roundtrip(case):
    d = _make(case)
    v = d.sample(jax.random.key(6))
    d2 = jax.jit(lambda: _make(case))()
    np.testing.assert_allclose(d2.loc, d.loc, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(d2.input_covariance, d.input_covariance, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(d2.log_prob(v), d.log_prob(v), rtol=1e-12, atol=_rounding_atol(d))
    out = jax.jit(lambda dd, x: dd.log_prob(x))(d, v)
    np.testing.assert_allclose(out, d.log_prob(v), rtol=1e-12)
    leaves = jax.tree_util.tree_leaves(d)
    assert len(leaves) == 2


def test_vmap_over_hyperparameters_and_grad(case):
    v = _make(case).sample(jax.random.key(7))
    cws = jnp.array([1.0, 1.3, 1.6])
    lp = jax.vmap(lambda c: _make(case, SPEC.replace(C_W=c)).log_prob(v))(cws)
    for c, l in zip(cws, lp):
        d = _make(case, SPEC.replace(C_W=float(c)))
        assert float(l) == pytest.approx(float(d.log_prob(v)), rel=1e-10, abs=_rounding_atol(d))
    batched = promote_batch_shape(jax.vmap(lambda c: _make(case, SPEC.replace(C_W=c)))(cws))
    assert batched.batch_shape == (3,)
    # away from the (jittered, zero-variance) training point, where finite differences are exact
    v = _make(case, xt=XT[:2]).sample(jax.random.key(7))
    f = lambda c: _make(case, SPEC.replace(C_W=c), XT[:2]).log_prob(v)
    g = float(jax.grad(f)(1.3))
    fd = (float(f(1.3 + 1e-6)) - float(f(1.3 - 1e-6))) / 2e-6
    assert np.isfinite(g) and g == pytest.approx(fd, rel=1e-4, abs=1e-6)


def test_validate_args(case):
    d = _make(case)
    with numpyro.validation_enabled():
        d2 = KernelGaussian(d.loc, d.scale_tril, validate_args=True)
        assert np.isfinite(float(d2.log_prob(jnp.full(d.event_shape, 0.1))))
        with pytest.raises(ValueError, match="scale_tril"):
            KernelGaussian(d.loc, -jnp.eye(d.event_shape[0]), validate_args=True)


def test_predictive_prior_and_obs_site(case):
    def model(obs=None):
        return numpyro.sample("f", _make(case), obs=obs)

    pr = Predictive(model, num_samples=4)(jax.random.key(8))
    assert pr["f"].shape[0] == 4 and not np.allclose(pr["f"][0], pr["f"][1])
    pr2 = Predictive(model, num_samples=4, parallel=True)(jax.random.key(8))
    assert pr2["f"].shape == pr["f"].shape


def test_order_dispatch_and_bad_order():
    from eft_prob.distributions import FiniteWidthPrior
    from eft_prob.exact import ExactNetworkPrior

    assert isinstance(NetworkPrior(SPEC, X, order=1), FiniteWidthPrior)
    relu = ep.MLPSpec.at_criticality(2, (16, 16), 1, "relu")
    assert isinstance(NetworkPrior(relu, X[:1], order="exact"), ExactNetworkPrior)
    with pytest.raises(ValueError, match="form must be"):  # order=1 goes to the finite-width posterior
        BayesianPosterior(SPEC, X, Y, XT, 0.1, order=1, form="bogus")
    from eft_prob.distributions import FiniteWidthTrained

    assert isinstance(TrainedNetwork(SPEC, X, Y, XT, 0.1, order=1), FiniteWidthTrained)
    for bad in (2, -1, 0.5, True, "one"):
        with pytest.raises(ValueError, match="order must be 0"):
            NetworkPrior(SPEC, X, order=bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="noise_var"):
        BayesianPosterior(SPEC, X, Y, XT, noise_var=0.0)
    with pytest.raises(ValueError, match="noise_var"):
        NetworkPrior(SPEC, X, noise_var=-1.0)
    with pytest.raises(ValueError, match=r"y must have shape \(N_train, output_dim\) = \(4, 2\)"):
        BayesianPosterior(SPEC, X, Y[:, :1], XT, 0.1)
    with pytest.raises(ValueError, match="X_test"):
        TrainedNetwork(SPEC, X, Y, XT[:, :1])
    with pytest.raises(ValueError, match="learning_rate is required"):
        TrainedNetwork(SPEC, X, Y, XT, steps=10)
    with pytest.raises(ValueError, match="NaN"):
        BayesianPosterior(SPEC, X, np.where(Y > 0.55, np.nan, Y), XT, 0.1)
    with pytest.warns(ep.StabilityWarning, match="stability bound"):
        TrainedNetwork(SPEC, X, Y, XT, learning_rate=10.0, steps=5)


def test_training_point_is_interpolated_after_training():
    d = TrainedNetwork(SPEC, X, Y, XT)
    np.testing.assert_allclose(d.mean[2], Y[0], atol=1e-8)
    assert float(d.variance[2, 0]) < 1e-8
    assert np.isfinite(float(d.log_prob(d.mean)))


def test_float32_ambient_precision_is_respected():
    with jax.enable_x64(False):
        d = NetworkPrior(SPEC, X)
        assert d.loc.dtype == jnp.float32
        assert np.isfinite(float(d.log_prob(jnp.zeros((4, 2), jnp.float32))))


def test_nuts_with_distribution_as_likelihood():
    """NUTS samples C_W through NetworkPrior's analytic likelihood (obs=) without divergences."""
    spec = ep.MLPSpec(2, (64, 64), 1, "tanh", C_b=0.1, C_W=1.5)
    data = NetworkPrior(spec, X).sample(jax.random.key(9), (30,))

    def model(y):
        c = numpyro.sample("C_W", dist.LogNormal(0.0, 0.5))
        with numpyro.plate("datasets", y.shape[0]):
            numpyro.sample("y", NetworkPrior(spec.replace(C_W=c), X), obs=y)

    mcmc = MCMC(NUTS(model), num_warmup=150, num_samples=150, progress_bar=False)
    mcmc.run(jax.random.key(10), data, extra_fields=("diverging",))
    c = np.asarray(mcmc.get_samples()["C_W"])
    assert int(mcmc.get_extra_fields()["diverging"].sum()) == 0
    assert abs(c.mean() - 1.5) < 4 * c.std() + 0.05


@pytest.mark.slow
def test_every_distribution_as_likelihood_under_nuts(case):
    """Each class works as ``obs=`` under NUTS with a latent C_W, and the posterior covers the truth."""
    data = _make(case, SPEC.replace(C_W=1.5)).sample(jax.random.key(11), (20,))

    def model(y):
        c = numpyro.sample("C_W", dist.LogNormal(0.0, 0.5))
        with numpyro.plate("datasets", y.shape[0]):
            numpyro.sample("y", _make(case, SPEC.replace(C_W=c)), obs=y)

    mcmc = MCMC(NUTS(model), num_warmup=60, num_samples=60, progress_bar=False)
    mcmc.run(jax.random.key(12), data, extra_fields=("diverging",))
    c = np.asarray(mcmc.get_samples()["C_W"])
    assert np.all(np.isfinite(c)) and int(mcmc.get_extra_fields()["diverging"].sum()) == 0
    assert abs(c.mean() - 1.5) < 5 * c.std() + 0.05
