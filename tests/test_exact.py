"""ExactNetworkPrior: the exact finite-width law of scale-invariant networks (THEORY.md §2, §4.4).

Oracles: closed forms (variance-gamma densities for one hidden layer, the g1/g2 recursion of
THEORY.md §4.4 and eq. (3.25)), numerical integration of the tabulated density, and Monte Carlo
of real networks (``ensemble.prior_outputs``) with tolerances from computed standard errors.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions.batch_util import promote_batch_shape
from numpyro.infer import MCMC, NUTS, Predictive
from scipy import integrate, special, stats

import eft_prob as ep
from eft_prob.activations import Activation, leaky_relu
from eft_prob.ensemble import prior_outputs
from eft_prob.exact import ExactNetworkPrior
from tests.conftest import assert_consistent

X1 = np.array([[0.7, -1.1]])
# four inputs in three dimensions, so that G1 = C_b + C_W X Xᵀ/3 has full rank
X4 = np.array([[1.0, 0.2, -0.4], [-0.5, 0.9, 0.1], [0.3, -1.2, 0.8], [1.4, 1.1, 0.6]])
RELU_DEEP = ep.MLPSpec(2, (8, 8, 8), 1, "relu", C_W=2.0)  # L = 4, n = 8: r = L/n = 0.5
LINEAR_MULTI = ep.MLPSpec(3, (3, 5, 4), 1, "linear", C_b=(0.3, 0.0, 0.0, 0.0), C_W=(1.2, 0.9, 1.1, 1.3))


def _binomial(n):
    k = np.arange(n + 1)
    return k, np.exp(special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1) - n * math.log(2))


def _variance_gamma(x, m, scale):
    """Density of √(scale·χ²_m)·ξ, ξ ~ N(0, 1): |y|^{λ-½} K_{λ-½}(|y|)/(√π Γ(λ) 2^{λ-½}), λ = m/2, y = x/√scale."""
    lam, y = m / 2, np.abs(x) / np.sqrt(scale)
    log = (
        (lam - 0.5) * np.log(y)
        + np.log(special.kve(lam - 0.5, y))
        - y
        - special.gammaln(lam)
        - (lam - 0.5) * math.log(2)
    )
    return np.exp(log) / np.sqrt(np.pi * scale)


def _log_prob_1d(d, x):
    return np.asarray(d.log_prob(jnp.asarray(x, float).reshape(-1, 1, 1)))


def _moment_integrals(d, powers=(0, 2, 4)):
    """∫ f^p exp(log_prob(f)) df for one input and one output, by the trapezoid rule in t = log|f|
    (the density is even, smooth for f ≠ 0 and at worst logarithmically singular at 0)."""
    sd = float(jnp.sqrt(d.variance[0, 0]))
    t = np.linspace(math.log(sd) - 40, math.log(sd) + 6, 9201)
    f = np.exp(t)
    p = np.exp(_log_prob_1d(d, f))
    return [2 * integrate.trapezoid(f ** (k + 1) * p, t) for k in powers]


def _g_recursion(spec, X):
    """(g1, g2) of THEORY.md §4.4 for one input, run layer by layer with the per-layer (C_b, C_W)."""
    act = spec.activation
    C_b, C_W = np.broadcast_to(spec.C_b, (spec.depth,)), np.broadcast_to(spec.C_W, (spec.depth,))
    g1 = C_b[0] + C_W[0] * float(X[0] @ X[0]) / spec.input_dim
    g2 = g1**2
    for ell, n in enumerate(spec.hidden, start=1):
        cb, cw = C_b[ell], C_W[ell]
        g1, g2 = (
            cb + cw * act.A2 * g1,
            cb**2 + 2 * cb * cw * act.A2 * g1 + cw**2 * (act.A2**2 + (3 * act.A4 - act.A2**2) / n) * g2,
        )
    return g1, g2


# --------------------------------------------------------------------------------------------
# The density against closed forms and against its own closed-form moments


@pytest.mark.parametrize(("activation", "n"), [("relu", 5), ("linear", 7)])
def test_one_hidden_layer_density_is_the_variance_gamma_law(activation, n):
    """L = 2: f = √(C_W G1 Q/n)·ξ with Q = χ²_B (ReLU, B ~ Bin(n, ½), B ≥ 1) or χ²_n (linear)."""
    spec = ep.MLPSpec(2, (n,), 1, activation, C_b=(0.2, 0.0), C_W=1.7)
    d = ExactNetworkPrior(spec, X1)
    scale = float(d.kernel[0, 0]) * 1.7 / n
    x = np.array([1e-6, 1e-3, 0.1, 0.6, 1.3, 3.0, 8.0])
    if activation == "relu":
        k, w = _binomial(n)
        ref = sum(wk * _variance_gamma(x, kk, scale) for kk, wk in zip(k[1:], w[1:]))
        assert d.atom_probability == pytest.approx(2.0**-n, rel=1e-14)
    else:
        ref = _variance_gamma(x, n, scale)
        assert d.atom_probability == 0.0
    np.testing.assert_allclose(_log_prob_1d(d, x), np.log(ref), rtol=0, atol=1e-12)


def test_leaky_relu_density_is_a_convolution_of_two_variance_gamma_laws():
    """Given B, f = √(cB)·(χ_B ξ1) + a√(cB)·(χ_{n-B} ξ2): an independent check of the Kummer-function layer law."""
    n, a = 4, 0.1
    spec = ep.MLPSpec(2, (n,), 1, leaky_relu(a), C_W=1.3)
    d = ExactNetworkPrior(spec, X1)
    base = float(d.kernel[0, 0]) * 1.3 / n
    k, w = _binomial(n)

    def density(x):
        total = w[0] * _variance_gamma(x, n, a * a * base) + w[-1] * _variance_gamma(x, n, base)
        for kk, wk in zip(k[1:-1], w[1:-1]):
            f = lambda y, kk=kk: _variance_gamma(y, kk, base) * _variance_gamma(x - y, n - kk, a * a * base)
            cuts = sorted({-60.0, 0.0, x, 60.0})  # integrable log singularities at y = 0 and y = x
            pieces = itertools.pairwise(cuts)
            total += wk * sum(integrate.quad(f, lo, hi, limit=400, epsabs=0, epsrel=1e-13)[0] for lo, hi in pieces)
        return total

    x = np.array([0.05, 0.4, 1.5, 4.0])
    np.testing.assert_allclose(_log_prob_1d(d, x), np.log([density(v) for v in x]), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "spec",
    [
        RELU_DEEP,
        ep.MLPSpec(2, (6, 11, 4), 1, leaky_relu(0.1), C_b=(0.4, 0, 0, 0), C_W=(1.0, 1.9, 1.6, 2.2)),
        ep.MLPSpec(2, (3, 2, 5, 4), 1, "linear", C_W=1.1),
    ],
    ids=["relu", "leaky", "linear"],
)
@pytest.mark.parametrize("noise_var", [0.0, 0.3])
def test_density_integrates_to_the_closed_form_moments(spec, noise_var):
    """∫p = 1 - P(atom) (the atom is the component N(0, σ²) once there is noise); ∫f²p = E s G1 + σ²,
    ∫f⁴p = 3 E[(s G1 + σ²)²]: the tabulated law of s against its closed-form moments."""
    d = ExactNetworkPrior(spec, X1, noise_var=noise_var)
    mass, m2, m4 = _moment_integrals(d)
    assert mass == pytest.approx(1 - (d.atom_probability if noise_var == 0 else 0.0), rel=1e-10)
    assert m2 == pytest.approx(float(d.moment(2)[0, 0]), rel=1e-9)
    assert m4 == pytest.approx(float(d.moment(4)[0, 0]), rel=1e-9)
    g, s1, s2 = float(d.kernel[0, 0]), float(d.scale_moment(1)), float(d.scale_moment(2))
    assert float(d.moment(4)[0, 0]) == pytest.approx(
        3 * (g * g * s2 + 2 * g * s1 * noise_var + noise_var**2), rel=1e-13
    )
    assert float(d.moment(3)[0, 0]) == 0.0
    log_s, log_w = d.scale_mixture()
    for k in (1, 2, 3):  # the lattice law of s itself
        assert float(jnp.sum(jnp.exp(log_w + k * log_s))) == pytest.approx(float(d.scale_moment(k)), rel=1e-10)


def test_wide_and_mixed_layers_keep_the_moments():
    """Lattice step set by the widest layer, range by the narrowest; a small slope (Kummer integrals
    far into ₁F₁'s underflow range) and 20 layers."""
    for spec in [
        ep.MLPSpec(1, (8, 1000, 30), 1, "relu", C_W=2.0),
        ep.MLPSpec(1, (1000, 1000), 1, "leaky_relu", C_W=1.9),
        ep.MLPSpec(1, (50,) * 20, 1, "relu", C_W=2.0),
    ]:
        d = ExactNetworkPrior(spec, [[1.0]])
        log_s, log_w = d.scale_mixture()
        for k in (1, 2, 3):
            assert float(jnp.sum(jnp.exp(log_w + k * log_s))) == pytest.approx(float(d.scale_moment(k)), rel=1e-10)


# --------------------------------------------------------------------------------------------
# Closed forms against THEORY.md


@pytest.mark.parametrize(
    ("activation", "coefficient"),
    [("relu", 5.0), ("linear", 2.0), (leaky_relu(0.1), 3 * 0.50005 / 0.505**2 - 1)],
)
def test_kurtosis_is_the_product_formula_of_theory_4_4(activation, coefficient):
    """At criticality E f⁴/(3(E f²)²) = Π_ℓ(1 + (3A_4/A_2² - 1)/n_ℓ): ReLU 5, linear 2 (eq. (3.25)),
    leaky ReLU 0.1: 4.882."""
    act = ep.get_activation(activation)
    assert 3 * act.A4 / act.A2**2 - 1 == pytest.approx(coefficient, rel=1e-14)
    hidden = (4, 9, 6, 13)
    d = ExactNetworkPrior(ep.MLPSpec.at_criticality(2, hidden, 1, act), X1)
    ratio = float(d.moment(4)[0, 0] / (3 * d.moment(2)[0, 0] ** 2))
    assert ratio == pytest.approx(math.prod(1 + coefficient / n for n in hidden), rel=1e-13)
    assert float(d.excess_kurtosis()[0, 0]) == pytest.approx(3 * (ratio - 1), rel=1e-12)
    # the O(1/n) vertex of THEORY.md §4.4 is the first term: n·κ4/(3K²) -> coefficient·(L-1) at large width
    wide = ExactNetworkPrior(ep.MLPSpec.at_criticality(2, (10**6,) * 3, 1, act), X1)
    assert 1e6 * float(wide.excess_kurtosis()[0, 0]) / 3 == pytest.approx(3 * coefficient, rel=1e-4)


@pytest.mark.parametrize("activation", ["relu", leaky_relu(-0.3), "linear"])
def test_moments_follow_the_g_recursion_with_per_layer_hyperparameters(activation):
    """E f² = g1^(L), E f⁴ = 3 g2^(L) (THEORY.md §4.4) for unequal widths, per-layer C_W and a first-layer bias."""
    spec = ep.MLPSpec(2, (5, 12, 3), 2, activation, C_b=(0.35, 0.0, 0.0, 0.0), C_W=(1.4, 2.3, 0.7, 1.9))
    d = ExactNetworkPrior(spec, X1)
    g1, g2 = _g_recursion(spec, X1)
    np.testing.assert_allclose(d.moment(2), g1, rtol=1e-13)
    np.testing.assert_allclose(d.moment(4), 3 * g2, rtol=1e-13)
    np.testing.assert_allclose(d.variance, g1, rtol=1e-13)
    np.testing.assert_allclose(d.mean, 0.0)
    # two outputs share s: E[f1² f2²] - E f1² E f2² = Var(s) G1² = V/n, the connected four-point function
    k4 = np.asarray(d.fourth_cumulant())
    assert k4.shape == (2, 2, 2, 2)
    np.testing.assert_allclose(k4[0, 0, 1, 1], g2 - g1**2, rtol=1e-12)
    np.testing.assert_allclose(k4[0, 0, 0, 0], 3 * (g2 - g1**2), rtol=1e-12)
    assert k4[0, 1, 0, 0] == 0.0
    np.testing.assert_allclose(d.kernel_covariance[0, 0, 0, 0], g2 - g1**2, rtol=1e-12)


def test_linear_multi_input_covariances_are_eq_3_25():
    """Deep linear net, several inputs: E[f fᵀ] = Π C_W · G1 and E[f_α² f_β²] = Π C_W² Π(1+2/n)(G_αα G_ββ + 2 G_αβ²)."""
    d = ExactNetworkPrior(LINEAR_MULTI, X4)
    G1 = 0.3 + 1.2 * X4 @ X4.T / 3
    cw = 0.9 * 1.1 * 1.3
    np.testing.assert_allclose(d.input_covariance, cw * G1, rtol=1e-13)
    np.testing.assert_allclose(d.covariance_matrix, cw * G1, rtol=1e-13)
    Es2 = cw**2 * (1 + 2 / 3) * (1 + 2 / 5) * (1 + 2 / 4)
    C = np.asarray(d.kernel_covariance)
    np.testing.assert_allclose(C, (Es2 - cw**2) * np.einsum("ab,cd->abcd", G1, G1), rtol=1e-12)
    k4 = np.asarray(d.fourth_cumulant())
    np.testing.assert_allclose(
        k4[1, 1, 2, 2] + (cw * G1[1, 1]) * (cw * G1[2, 2]) + 2 * (cw * G1[1, 2]) ** 2,
        Es2 * (G1[1, 1] * G1[2, 2] + 2 * G1[1, 2] ** 2),
        rtol=1e-12,
    )


def test_depth_one_is_exactly_gaussian_for_any_activation():
    spec = ep.MLPSpec(3, (), 2, "tanh", C_b=0.2, C_W=1.3)
    d = ExactNetworkPrior(spec, X4)
    K = 0.2 + 1.3 * X4 @ X4.T / 3
    v = np.asarray(d.sample(jax.random.key(0), (3,)))
    ref = stats.multivariate_normal(np.zeros(8), np.kron(K + 1e-10 * np.mean(np.diag(K)) * np.eye(4), np.eye(2)))
    np.testing.assert_allclose(d.log_prob(v), ref.logpdf(v.reshape(3, -1)), rtol=1e-10)
    assert d.atom_probability == 0.0 and float(d.excess_kurtosis().max()) == 0.0


# --------------------------------------------------------------------------------------------
# Monte Carlo of real networks and of .sample


def _cdf_checks(samples, cdf_at, gaussian_cdf_at, what):
    """Empirical CDF at 200 sample quantiles: (i) within 4.5 binomial standard errors of the exact
    CDF pointwise, (ii) within the DKW bound sqrt(log(2/α)/2M), α = 1e-6, everywhere; and the
    Gaussian of the same variance must violate (ii) (so the check has power)."""
    M = samples.size
    xs = np.quantile(samples, np.linspace(0.0025, 0.9975, 200))
    emp = np.searchsorted(np.sort(samples), xs, side="right") / M
    exact = np.asarray(cdf_at(xs))
    se = np.sqrt(np.clip(exact * (1 - exact), 1e-12, None) / M)
    assert_consistent(emp, se, exact, n_sigma=4.5, what=f"{what} CDF")
    dkw = math.sqrt(math.log(2 / 1e-6) / (2 * M))
    assert np.max(np.abs(emp - exact)) < dkw, what
    assert np.max(np.abs(emp - gaussian_cdf_at(xs))) > dkw, f"{what}: the Gaussian law passes too"


def _moment_checks(f, d, what):
    f = f.reshape(f.shape[0], -1)[:, 0]
    M = f.size
    for k in (2, 4):
        est, se = np.mean(f**k), np.std(f**k) / math.sqrt(M)
        assert_consistent(est, se, float(d.moment(k)[0, 0]), what=f"{what} E f^{k}")


def _relu_checks(f, d, what):
    f = np.asarray(f).ravel()
    M = f.size
    _moment_checks(f[:, None], d, what)
    # the atom: a dead hidden layer gives exactly f = 0
    p = d.atom_probability
    assert_consistent(np.mean(f == 0.0), math.sqrt(p * (1 - p) / M), p, what=f"{what} P(f = 0)")
    sd = float(jnp.sqrt(d.variance[0, 0]))
    _cdf_checks(
        f,
        lambda x: d.marginal_cdf(jnp.asarray(x).reshape(-1, 1, 1)).ravel(),
        lambda x: stats.norm.cdf(x / sd),
        what,
    )


@pytest.mark.slow
def test_relu_deep_narrow_networks_follow_the_exact_law():
    """ReLU, L = 4, n = 8 (r = 0.5): excess kurtosis 3((13/8)³ - 1) = 9.87 where the O(1/n) vertex
    predicts 3·5(L-1)/n = 5.63; 2·10^5 real networks."""
    d = ExactNetworkPrior(RELU_DEEP, X1)
    f = np.asarray(prior_outputs(RELU_DEEP, X1, 200_000, jax.random.key(2024)))
    assert float(d.excess_kurtosis()[0, 0]) == pytest.approx(3 * (1.625**3 - 1), rel=1e-13)
    _relu_checks(f, d, "real ReLU networks")


@pytest.mark.slow
def test_linear_multi_input_networks_follow_the_exact_law():
    """Deep linear, 4 inputs, widths (3, 5, 4): second and fourth moments over input pairs, and the
    CDF of fᵀG1⁻¹f = s·χ²_4, whose exact law comes from the tabulated law of s."""
    d = ExactNetworkPrior(LINEAR_MULTI, X4)
    f = np.asarray(prior_outputs(LINEAR_MULTI, X4, 200_000, jax.random.key(7)))[..., 0]
    _linear_checks(f, d, "real linear networks")


def _linear_checks(f, d, what):
    M = f.shape[0]
    S = np.asarray(d.input_covariance)
    a, b = np.triu_indices(4)
    prod = f[:, a] * f[:, b]
    assert_consistent(prod.mean(0), prod.std(0) / math.sqrt(M), S[a, b], what=f"{what} E f_α f_β")
    sq = f[:, a] ** 2 * f[:, b] ** 2
    E4 = np.asarray(d.kernel_covariance)[a, a, b, b] + 2 * np.asarray(d.kernel_covariance)[a, b, a, b]
    E4 = E4 + S[a, a] * S[b, b] + 2 * S[a, b] ** 2
    assert_consistent(sq.mean(0), sq.std(0) / math.sqrt(M), E4, what=f"{what} E f_α² f_β²")
    G = np.asarray(d.kernel)
    r2 = np.einsum("ma,ab,mb->m", f, np.linalg.inv(G), f)
    log_s, log_w = (np.asarray(v) for v in d.scale_mixture())
    w = np.exp(log_w)
    Es = float(d.scale_moment(1))
    _cdf_checks(
        r2,
        lambda x: stats.chi2.cdf(x[:, None] * np.exp(-log_s)[None], 4) @ w,
        lambda x: stats.chi2.cdf(x / Es, 4),
        f"{what} fᵀG⁻¹f",
    )


@pytest.mark.slow
def test_samples_follow_the_exact_law():
    """.sample against the same checks as the real networks (ReLU with its atom; linear multi-input)."""
    d = ExactNetworkPrior(RELU_DEEP, X1)
    _relu_checks(d.sample(jax.random.key(5), (100_000,)), d, "ReLU .sample")
    dl = ExactNetworkPrior(LINEAR_MULTI, X4)
    _linear_checks(np.asarray(dl.sample(jax.random.key(6), (100_000,)))[..., 0], dl, "linear .sample")


def test_samples_share_the_scale_across_outputs_and_differ_between_draws():
    spec = ep.MLPSpec(2, (6, 6), 2, leaky_relu(0.2), C_W=1.8)
    d = ExactNetworkPrior(spec, X1, noise_var=0.05)
    a, b = d.sample(jax.random.key(0)), d.sample(jax.random.key(1))
    assert a.shape == (1, 2) and not np.allclose(a, b)
    M = 50_000
    f = np.asarray(d.sample(jax.random.key(2), (M,)))[:, 0, :]
    _moment_checks(f, d, "leaky .sample")
    cross = f[:, 0] ** 2 * f[:, 1] ** 2
    expect = float(d.kernel_covariance[0, 0, 0, 0] + d.variance[0, 0] * d.variance[0, 1])
    assert_consistent(cross.mean(), cross.std() / math.sqrt(M), expect, what="E f1² f2²")
    assert_consistent(np.mean(f[:, 0] * f[:, 1]), np.std(f[:, 0] * f[:, 1]) / math.sqrt(M), 0.0, what="E f1 f2")


# --------------------------------------------------------------------------------------------
# NumPyro: shapes, jit, vmap, grad, models


def test_shapes_pytree_jit_and_grad_in_the_value():
    spec = ep.MLPSpec(2, (8, 8), 3, "relu", C_b=(0.1, 0.0, 0.0), C_W=2.0)
    d = ExactNetworkPrior(spec, X1)
    assert d.event_shape == (1, 3) and d.batch_shape == ()
    v = d.sample(jax.random.key(0), (5, 2))
    assert v.shape == (5, 2, 1, 3) and d.log_prob(v).shape == (5, 2)
    assert d.covariance_matrix.shape == (3, 3)
    assert ExactNetworkPrior.infer_shapes((4, 1, 3), (1, 1), (), ()) == ((4,), (1, 3))
    x = v[0, 0]
    lp = float(d.log_prob(x))
    assert np.isfinite(lp)
    assert float(jax.jit(lambda dd, y: dd.log_prob(y))(d, x)) == pytest.approx(lp, rel=1e-12)
    assert float(jax.jit(lambda: ExactNetworkPrior(spec, X1))().log_prob(x)) == pytest.approx(lp, rel=1e-12)
    g = jax.grad(lambda y: d.log_prob(y))(x)
    eps = 1e-6
    e = jnp.zeros_like(x).at[0, 1].set(eps)
    assert float(g[0, 1]) == pytest.approx(float(d.log_prob(x + e) - d.log_prob(x - e)) / (2 * eps), rel=1e-6)
    assert np.allclose(jax.vmap(d.log_prob)(v[:, 0]), d.log_prob(v[:, 0]), rtol=1e-12)


def test_vmap_and_grad_over_hyperparameters():
    spec = ep.MLPSpec(2, (8, 8), 3, "relu", C_b=(0.1, 0.0, 0.0), C_W=2.0)
    x = jnp.array([[0.4, -1.3, 0.9]])
    f = lambda c: ExactNetworkPrior(spec.replace(C_W=c), X1, noise_var=0.2).log_prob(x)
    cws = jnp.array([1.5, 2.0, 2.5])
    np.testing.assert_allclose(jax.vmap(f)(cws), [float(f(float(c))) for c in cws], rtol=1e-12)
    dc = float(jax.grad(f)(2.0))
    assert np.isfinite(dc) and dc == pytest.approx(float(f(2.0 + 1e-6) - f(2.0 - 1e-6)) / 2e-6, rel=1e-6)
    h = lambda s2: ExactNetworkPrior(spec, X1, noise_var=s2).log_prob(x)
    assert float(jax.grad(h)(0.2)) == pytest.approx(float(h(0.2 + 1e-7) - h(0.2 - 1e-7)) / 2e-7, rel=1e-6)
    batched = promote_batch_shape(jax.vmap(lambda c: ExactNetworkPrior(spec.replace(C_W=c), X1))(cws))
    assert batched.batch_shape == (3,) and batched.log_prob(x).shape == (3,)
    assert batched.sample(jax.random.key(1), (4,)).shape == (4, 3, 1, 3) and batched.variance.shape == (3, 1, 3)


def test_linear_multi_input_noise_and_gradients():
    d0 = ExactNetworkPrior(LINEAR_MULTI, X4)
    x = d0.sample(jax.random.key(3))
    # per-lattice-point factorization with noise agrees with the shared factor as σ² -> 0
    tiny = ExactNetworkPrior(LINEAR_MULTI, X4, noise_var=1e-13)
    assert float(tiny.log_prob(x)) == pytest.approx(float(d0.log_prob(x)), abs=1e-4)
    f = lambda c: ExactNetworkPrior(LINEAR_MULTI.replace(C_W=c), X4, noise_var=0.1).log_prob(x)
    g = float(jax.grad(f)(1.1))
    assert np.isfinite(g) and g == pytest.approx(float(f(1.1 + 1e-6) - f(1.1 - 1e-6)) / 2e-6, rel=1e-6)
    assert np.all(np.isfinite(jax.grad(lambda y: d0.log_prob(y))(x)))


def test_validate_args_and_float32_ambient_precision():
    with numpyro.validation_enabled():
        d = ExactNetworkPrior(RELU_DEEP, X1, validate_args=True)
        assert np.isfinite(float(d.log_prob(jnp.full((1, 1), 0.3))))
    with jax.enable_x64(False):
        d32 = ExactNetworkPrior(RELU_DEEP, X1)
        assert d32.loc.dtype == jnp.float32 and d32.log_weights.dtype == jnp.float32
        assert d32.log_prob(jnp.ones((1, 1), jnp.float32)).dtype == jnp.float32
        x = jnp.full((1, 1), 0.7, jnp.float32)
        assert float(d32.log_prob(x)) == pytest.approx(float(ExactNetworkPrior(RELU_DEEP, X1).log_prob(x)), rel=1e-5)


@pytest.mark.slow
def test_model_site_predictive_and_nuts():
    spec = ep.MLPSpec(2, (6, 6), 2, leaky_relu(0.1), C_W=1.6)
    data = ExactNetworkPrior(spec, X1).sample(jax.random.key(9), (40,))

    def model(y=None):
        c = numpyro.sample("C_W", dist.LogNormal(0.5, 0.5))
        with numpyro.plate("networks", 40):
            return numpyro.sample("y", ExactNetworkPrior(spec.replace(C_W=c), X1), obs=y)

    pr = Predictive(model, num_samples=3)(jax.random.key(1))
    assert pr["y"].shape == (3, 40, 1, 2) and not np.allclose(pr["y"][0], pr["y"][1])
    mcmc = MCMC(NUTS(model), num_warmup=80, num_samples=80, progress_bar=False)
    mcmc.run(jax.random.key(10), data, extra_fields=("diverging",))
    c = np.asarray(mcmc.get_samples()["C_W"])
    assert int(mcmc.get_extra_fields()["diverging"].sum()) == 0
    assert abs(c.mean() - 1.6) < 4 * c.std() + 0.05


# --------------------------------------------------------------------------------------------
# Rejected configurations


def test_rejected_configurations_say_what_and_how_to_fix():
    fallback = r"NetworkPrior\(order=0 or 1\)"
    with pytest.raises(ValueError, match=f"scale-invariant activation.*'tanh'.*{fallback}"):
        ExactNetworkPrior(ep.MLPSpec(2, (8,), 1, "tanh"), X1)
    with pytest.raises(ValueError, match=rf"C_b = 0 in layers 2..L.*C_b=\(c_1, 0.0, 0.0\).*{fallback}"):
        ExactNetworkPrior(ep.MLPSpec(2, (8, 8), 1, "relu", C_b=0.1), X1)
    with pytest.raises(ValueError, match=r"C_b = 0 in layers 2\.\.L"):
        ExactNetworkPrior(ep.MLPSpec(2, (8, 8), 1, "relu", C_b=(0.1, 0.0, 0.2)), X1)
    with pytest.raises(ValueError, match=f"N=4 inputs.*nonlinear activation.*'relu'.*{fallback}"):
        ExactNetworkPrior(ep.MLPSpec(3, (8,), 1, "relu"), X4)
    with pytest.raises(ValueError, match=f"N=4 inputs.*output_dim=2.*{fallback}"):
        ExactNetworkPrior(ep.MLPSpec(3, (8,), 2, "linear"), X4)
    with pytest.raises(ValueError, match="both slopes zero"):
        zero = Activation("zero", lambda z: 0 * z, slopes=(0.0, 0.0), universality="scale-invariant")
        ExactNetworkPrior(ep.MLPSpec(2, (8,), 1, zero), X1)
    traced = lambda cb: ExactNetworkPrior(RELU_DEEP.replace(C_b=cb), X1).log_prob(jnp.ones((1, 1)))
    with pytest.raises(ValueError, match="concrete zeros"):
        jax.jit(traced)(0.0)
    with pytest.raises(ValueError, match=r"G\^\(1\) = 0.*give layer 1 a bias"):
        ExactNetworkPrior(RELU_DEEP, np.zeros((1, 2)))
    with pytest.raises(ValueError, match="noise_var"):
        ExactNetworkPrior(RELU_DEEP, X1, noise_var=-0.1)
    with pytest.raises(ValueError, match=r"X must have shape \(N, input_dim\) = \(N, 2\)"):
        ExactNetworkPrior(RELU_DEEP, np.ones((1, 3)))
    with pytest.raises(ValueError, match="k must be a non-negative integer"):
        ExactNetworkPrior(RELU_DEEP, X1).scale_moment(-1)
    # a traced first-layer bias with concrete zeros after it is fine (NUTS over C_b^(1))
    assert np.isfinite(float(jax.jit(lambda c1: traced((c1, 0.0, 0.0, 0.0)))(0.3)))
