"""NetworkPrior(order=1): the O(1/n) prior as a proper mixture over the random kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS, Predictive
from scipy import stats

import eft_prob as ep
from eft_prob.distributions import FiniteWidthPrior, KernelMixture, NetworkPrior
from eft_prob.theory import four_point_vertex, nlo_kernel, nngp, prior_statistics

from .conftest import assert_consistent

SPEC = ep.MLPSpec.at_criticality(2, (48, 48), 2, "tanh")
RELU = ep.MLPSpec.at_criticality(2, (64, 64), 2, "relu")
X = np.array([[1.0, 0.3], [-0.4, 0.9], [0.2, -1.1]])


@pytest.fixture(scope="module")
def prior():
    return NetworkPrior(SPEC, X, order=1)


def test_order_one_is_a_mixture_with_the_theory_cumulants(prior):
    d = prior
    assert isinstance(d, FiniteWidthPrior) and isinstance(d, KernelMixture)
    assert d.event_shape == (3, 2) and d.n_components == 2 * 8  # ± the rows of an order-8 Hadamard matrix
    n = SPEC.hidden[-1]
    K, K1, V = nngp(SPEC, X), nlo_kernel(SPEC, X), four_point_vertex(SPEC, X)
    jitter = 1e-10 * float(jnp.mean(jnp.diagonal(K)))  # the documented relative diagonal jitter
    np.testing.assert_allclose(d.input_covariance, K + K1 / n + jitter * np.eye(3), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(d.kernel_covariance, V / n, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(V / n))))
    assert float(d.residual) < 1e-9
    # every support point is a positive-definite kernel: the density is a proper mixture
    assert np.linalg.eigvalsh(np.asarray(d.component_kernels)).min() > 0
    np.testing.assert_allclose(float(jnp.sum(jnp.exp(d.log_weights))), 1.0, rtol=1e-13)


def test_fourth_cumulant_layout(prior):
    """κ over the flattened event (index α·n_L + i): δ_{i1i2}δ_{i3i4}V_{(α1α2)(α3α4)}/n + 2 permutations;
    zero unless the output-neuron indices pair up (different neurons are uncorrelated but dependent)."""
    d = prior
    k4 = np.asarray(d.fourth_cumulant()).reshape((3, 2) * 4)
    Vn = np.asarray(d.kernel_covariance)
    a, b, c, e = 0, 1, 2, 1
    # i = j != k = l: only the (12)(34) pairing survives
    assert k4[a, 0, b, 0, c, 1, e, 1] == pytest.approx(Vn[a, b, c, e], rel=1e-12)
    # all four on one neuron: the three pairings
    want = Vn[a, b, c, e] + Vn[a, c, b, e] + Vn[a, e, b, c]
    assert k4[a, 0, b, 0, c, 0, e, 0] == pytest.approx(want, rel=1e-12)
    assert k4[a, 0, b, 1, c, 1, e, 1] == 0.0
    # and it is the mixture's actual fourth cumulant, from its components
    G = np.asarray(d.component_kernels)
    p = np.exp(np.asarray(d.log_weights))
    m4 = np.einsum("k,kab,kce->abce", p, G, G)
    Gm = np.asarray(d.input_covariance)
    # E[f_a0 f_b0 f_c1 f_e1] - E[f_a0 f_b0]E[f_c1 f_e1]
    assert k4[a, 0, b, 0, c, 1, e, 1] == pytest.approx(m4[a, b, c, e] - Gm[a, b] * Gm[c, e], rel=1e-9)


def test_log_prob_is_the_mixture_density(prior):
    d = prior
    v = np.asarray(d.sample(jax.random.key(0), (4,)))
    G = np.asarray(d.component_kernels)
    p = np.exp(np.asarray(d.log_weights))
    ref = []
    for x in v:
        dens = [np.prod([stats.multivariate_normal(np.zeros(3), Gk).pdf(x[:, i]) for i in range(2)]) for Gk in G]
        ref.append(np.log(np.dot(p, dens)))
    np.testing.assert_allclose(d.log_prob(v), ref, rtol=1e-9)


def test_single_input_density_is_normalized_with_the_right_moments():
    """N = 1, n_L = 1: integrate exp(log_prob) on a fine grid: total 1, second moment K + K^{1}/n,
    fourth moment 3(E f²)² + 3V/n (the theory's excess kurtosis), all to quadrature accuracy."""
    spec = ep.MLPSpec.at_criticality(1, (32, 32, 32), 1, "tanh")
    x = np.array([[1.3]])
    d = NetworkPrior(spec, x, order=1)
    f = np.linspace(-12, 12, 24001)
    w = np.exp(np.asarray(d.log_prob(f[:, None, None])))
    assert np.all(w > 0)
    h = f[1] - f[0]
    m0, m2, m4 = (np.sum(w * f**k) * h for k in (0, 2, 4))
    n = 32
    K, K1, V = (float(np.ravel(a)[0]) for a in (nngp(spec, x), nlo_kernel(spec, x), four_point_vertex(spec, x)))
    assert m0 == pytest.approx(1.0, abs=1e-10)
    assert m2 == pytest.approx(K + K1 / n, rel=1e-9)
    assert m4 == pytest.approx(3 * (K + K1 / n) ** 2 + 3 * V / n, rel=1e-9)


def test_samples_reproduce_the_cumulants(prior):
    d = prior
    M = 400_000
    s = np.asarray(d.sample(jax.random.key(1), (M,)))
    G = np.asarray(d.input_covariance)
    Vn = np.asarray(d.kernel_covariance)
    # second moments across inputs, each output neuron
    for i in range(2):
        prod = s[:, :, None, i] * s[:, None, :, i]
        assert_consistent(prod.mean(0), prod.std(0) / np.sqrt(M), G, 5.0, f"E[f f], neuron {i}")
    # dependence between the two output neurons: Cov(f_a0², f_b1²) = V_(aa)(bb)/n
    q = s[:, :, 0, None] ** 2 * s[:, None, :, 1] ** 2
    want = Vn[np.arange(3), np.arange(3)][:, np.arange(3), np.arange(3)]
    est = q.mean(0) - np.outer(np.diag(G), np.diag(G))
    assert_consistent(est, q.std(0) / np.sqrt(M), want, 5.0, "Cov(f_a0², f_b1²)")
    se = q.std(0) / np.sqrt(M)
    assert np.all(np.diag(want) > 5 * np.diag(se))  # resolved: the test can fail for order 0


def test_against_real_networks():
    """Real width-32 tanh networks (400k): order 1 matches the kernel and the dependence between
    output neurons, Cov(f_a0², f_b1²) = Cov(Ĝ_aa, Ĝ_bb) (estimated Rao–Blackwellized from each
    network's last-layer kernel Ĝ, exact since f | Ĝ is Gaussian); order 0 (independent Gaussian
    neurons, Cov = 0) is many standard errors off."""
    spec = ep.MLPSpec.at_criticality(2, (32, 32), 2, "tanh")
    d = NetworkPrior(spec, X, order=1)
    M = 400_000
    G = np.asarray(ep.ensemble.prior_kernels(spec, X, M, jax.random.key(5)))
    idx = np.arange(3)
    Gd = G[:, idx, idx]
    c = Gd - Gd.mean(0)
    prod = c[:, :, None] * c[:, None, :]
    est, se = prod.mean(0), prod.std(0) / np.sqrt(M)
    want1 = np.asarray(d.kernel_covariance)[idx, idx][:, idx, idx]
    # allowance for the O(1/n²) truncation: ε times the O(1/n) term (ε = V/(nK²) the expansion parameter)
    allow = d.regime.expansion_parameter * np.abs(want1).max()
    assert np.all(np.abs(est - want1) <= 5 * se + allow), (est, want1, se, allow)
    assert np.min(np.abs(est) / se) > 10, "order 0 predicts 0 here and must be visibly wrong"
    assert_consistent(G.mean(0), G.std(0) / np.sqrt(M), d.input_covariance, 5.0, "kernel vs order 1")


def test_jit_vmap_grad_and_pytree(prior):
    d = prior
    v = d.sample(jax.random.key(2))
    np.testing.assert_allclose(jax.jit(lambda dd, x: dd.log_prob(x))(d, v), d.log_prob(v), rtol=1e-12)
    f = lambda c: NetworkPrior(SPEC.replace(C_W=c), X, order=1).log_prob(v)
    g = float(jax.grad(f)(1.0))
    fd = (float(f(1.0 + 1e-6)) - float(f(1.0 - 1e-6))) / 2e-6
    assert np.isfinite(g) and g == pytest.approx(fd, rel=1e-5)
    lp = jax.vmap(f)(jnp.array([0.95, 1.05]))
    assert lp[1] == pytest.approx(float(f(1.05)), rel=1e-10)
    batched = jax.vmap(lambda x: d.log_prob(x))(d.sample(jax.random.key(3), (5,)))
    assert batched.shape == (5,)


def test_in_a_numpyro_model(prior):
    def model(obs=None):
        return numpyro.sample("f", prior, obs=obs)

    pr = Predictive(model, num_samples=3)(jax.random.key(4))
    assert pr["f"].shape == (3, 3, 2)
    tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(obs=pr["f"][0])
    assert np.isfinite(float(tr["f"]["fn"].log_prob(tr["f"]["value"])))


def test_relu_and_unequal_widths():
    spec = ep.MLPSpec(2, (120, 80, 100), 1, "relu", C_W=2.0)
    d = NetworkPrior(spec, X, order=1)
    n = 100
    np.testing.assert_allclose(d.kernel_covariance, four_point_vertex(spec, X) / n, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(d.input_covariance, nngp(spec, X) + nlo_kernel(spec, X) / n, rtol=1e-9)


def test_one_compilation_serves_every_width():
    """The widths enter the compiled theory only as traced numbers (the ratios n_ℓ/n_(ℓ-1) and n_(L-1)):
    a width sweep, or NUTS at several widths, compiles once per depth, and each width gets its own numbers."""
    from eft_prob.distributions import _prior_mixture_jit
    from eft_prob.theory.vertex import _statistics_jit

    spec = ep.MLPSpec(2, (30, 70), 1, "erf", C_W=1.3, C_b=0.05)
    NetworkPrior(spec, X, order=1)
    compiled = _statistics_jit._cache_size(), _prior_mixture_jit._cache_size()
    other = spec.replace(hidden=(90, 40), output_dim=3)
    d = NetworkPrior(other, X, order=1)
    assert (_statistics_jit._cache_size(), _prior_mixture_jit._cache_size()) == compiled
    n = 40
    np.testing.assert_allclose(d.kernel_covariance, four_point_vertex(other, X) / n, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(d.input_covariance, nngp(other, X) + nlo_kernel(other, X) / n, rtol=1e-9)
    assert d.event_shape == (3, 3)


def test_noise_var_adds_to_every_component():
    d0 = NetworkPrior(SPEC, X, order=1)
    d1 = NetworkPrior(SPEC, X, order=1, noise_var=0.1)
    np.testing.assert_allclose(d1.input_covariance - d0.input_covariance, 0.1 * np.eye(3), atol=1e-9)
    np.testing.assert_allclose(d1.kernel_covariance, d0.kernel_covariance, rtol=1e-8, atol=1e-14)


def test_many_inputs_use_the_factored_vertex():
    """N = 26 > 24: the Monte Carlo factored vertex; the mixture carries exactly that V/n."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(26, 2))
    spec = ep.MLPSpec.at_criticality(2, (1024, 1024), 1, "relu")
    d = NetworkPrior(spec, x, order=1, samples=1024)
    res = float(d.residual)  # 26 inputs: the fixed point converges more slowly (whitened Σλ ≈ 1.5 here)
    assert res < 1e-4
    st = prior_statistics(spec, x, samples=1024)
    Vn = np.asarray(st.V.dense()) / 1024
    np.testing.assert_allclose(d.kernel_covariance, Vn, rtol=0, atol=3 * res * np.abs(Vn).max())
    assert d.vertex is None or d.vertex.shape == (26,) * 4


def test_bad_input():
    with pytest.raises(ValueError, match="identical"):
        NetworkPrior(SPEC, np.array([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]]), order=1)
    with pytest.raises(ValueError, match="order must be 0"):
        NetworkPrior(SPEC, X, order=2)
    with pytest.raises(ValueError, match="up to 64 inputs"):
        NetworkPrior(SPEC, np.random.default_rng(0).normal(size=(65, 2)), order=1)
    with pytest.raises(ValueError, match=r"NaN|finite"):
        NetworkPrior(SPEC, np.array([[np.nan, 0.0], [0.5, 0.5]]), order=1)
    with pytest.raises(ValueError, match="hidden layer"):
        NetworkPrior(ep.MLPSpec(2, (), 1, "tanh"), X, order=1)
    with pytest.raises(ValueError, match="samples"):
        prior_statistics(SPEC, X, factored=True, samples=1)


def test_narrow_deep_networks_warn_with_the_number():
    spec = ep.MLPSpec.at_criticality(2, (8, 8, 8), 1, "relu")  # ε = 5·3/8
    with pytest.warns(ep.RegimeWarning) as rec:
        NetworkPrior(spec, X, order=1)
    assert any("1.88" in str(w.message) and "widen" in str(w.message).lower() for w in rec)


@pytest.mark.slow
@pytest.mark.heavy
def test_nuts_with_the_order_one_likelihood():
    """C_W inferred through the O(1/n) likelihood from data drawn from it; no divergences."""
    spec = ep.MLPSpec(2, (32, 32), 1, "tanh", C_b=0.0, C_W=1.3)
    x = X[:2]
    data = NetworkPrior(spec, x, order=1).sample(jax.random.key(9), (40,))

    def model(y):
        c = numpyro.sample("C_W", dist.LogNormal(0.0, 0.5))
        with numpyro.plate("datasets", y.shape[0]):
            numpyro.sample("y", NetworkPrior(spec.replace(C_W=c), x, order=1), obs=y)

    mcmc = MCMC(NUTS(model), num_warmup=100, num_samples=100, progress_bar=False)
    mcmc.run(jax.random.key(10), data, extra_fields=("diverging",))
    c = np.asarray(mcmc.get_samples()["C_W"])
    assert int(mcmc.get_extra_fields()["diverging"].sum()) == 0
    assert abs(c.mean() - 1.3) < 4 * c.std() + 0.05
