"""Closed-form Gaussian expectations against quadrature, and quadrature convergence."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eft_prob as ep
from eft_prob import gauss
from eft_prob.activations import get_activation, leaky_relu

CLOSED = ["relu", "leaky_relu", "linear", "erf", "sin"]
KERNELS_2x2 = [(1.3, 0.7, 0.5), (1.0, 1.0, 0.999), (2.0, 0.3, -0.7), (0.5, 0.5, -0.5), (1e-3, 4.0, 0.01)]


@pytest.mark.parametrize("name", CLOSED)
@pytest.mark.parametrize("K", KERNELS_2x2)
def test_closed_form_matches_quadrature(name, K):
    act = get_activation(name)
    cf = gauss.pair_moments(act, *K)
    q = gauss.pair_moments(act, *K, quadrature=True, orders={"smooth2": 96})
    for a, b in zip(cf, q):
        assert abs(float(a) - float(b)) < 1e-10 * max(1.0, abs(float(a)))


def test_leaky_relu_any_slope_closed_form():
    act = leaky_relu(-0.3)
    cf = gauss.pair_moments(act, 1.3, 0.7, 0.5)
    q = gauss.pair_moments(act, 1.3, 0.7, 0.5, quadrature=True)
    np.testing.assert_allclose(cf, q, atol=1e-10)


def test_relu_two_input_oracle_O13():
    act = get_activation("relu")
    ss, dd = gauss.pair_moments(act, 1.3, 0.7, 0.5)
    assert float(ss) == pytest.approx(0.29820, abs=5e-6)
    assert float(dd) == pytest.approx(0.33781, abs=5e-6)
    fourth = gauss.expect_2d(lambda a, b: act(a) ** 2 * act(b) ** 2, 1.3, 0.7, 0.5, kinked=True)
    assert float(fourth) == pytest.approx(0.67026, abs=5e-6)


def test_single_input_scale_invariant_moments():
    # THEORY.md §4.5: <σ²> = A2 K, <σ⁴> = 3 A4 K², <σ'²> = A2
    for name in ["relu", "leaky_relu", "linear"]:
        act = get_activation(name)
        for K in [0.3, 2.0]:
            assert float(gauss.expect_1d(lambda z, act=act: act(z) ** 2, K, kinked=True)) == pytest.approx(
                act.A2 * K, rel=1e-12
            )
            assert float(gauss.expect_1d(lambda z, act=act: act(z) ** 4, K, kinked=True)) == pytest.approx(
                3 * act.A4 * K**2, rel=1e-12
            )
            assert float(gauss.expect_1d(lambda z, act=act: act.grad(z) ** 2, K, kinked=True)) == pytest.approx(
                act.A2, rel=1e-12
            )


def test_smooth_rule_converges_slowly_across_kinks_and_polar_rule_is_exact():
    """A rule for smooth integrands converges only algebraically for ReLU; the kink-aware one is exact."""
    relu = get_activation("relu")
    K = (1.3, 0.7, 0.5)
    exact = float(gauss.pair_moments(relu, *K)[1])  # <σ'σ'>: a step-function product, the hardest case
    f = lambda a, b: relu.grad(a) * relu.grad(b)
    errs = [abs(float(gauss.expect_2d(f, *K, orders={"smooth2": n})) - exact) for n in (8, 16, 32, 64, 128)]
    assert all(e2 < e1 for e1, e2 in zip(errs[1::2], errs[3::2])) or errs[-1] < errs[0] / 4
    assert errs[-1] < errs[0] / 4  # converging ...
    assert errs[-1] > 1e-6  # ... slowly: this is why the polar rule exists
    polar = [
        abs(float(gauss.expect_2d(f, *K, kinked=True, orders={"arc": m, "radial": 16})) - exact) for m in (2, 4, 8)
    ]
    assert polar[-1] < 1e-12


def test_matrix_moments_closed_vs_quadrature():
    X = np.random.default_rng(1).normal(size=(5, 3))
    K = 0.2 + 1.5 * X @ X.T / 3
    for name in ["relu", "erf", "sin", "leaky_relu"]:
        act = get_activation(name)
        c = gauss.sigma_moments(act, K)
        q = gauss.sigma_moments(act, K, quadrature=True, orders={"smooth2": 96})
        for a, b in zip(c, q):
            np.testing.assert_allclose(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["tanh", "relu"])
def test_quadrature_chunking_does_not_change_results(monkeypatch, name):
    """Smooth σ: unordered pairs in blocks (21 pairs in blocks of 4, with a remainder); kinked σ:
    rows in chunks."""
    X = np.random.default_rng(2).normal(size=(6, 2))
    K = 0.1 + X @ X.T
    act = get_activation(name)
    full = gauss.sigma_moments(act, K, quadrature=True)
    monkeypatch.setattr(gauss, "_MAX_CHUNK_ELEMS", 1)
    monkeypatch.setattr(gauss, "_PAIR_BATCH", 4)
    chunked = gauss.sigma_moments(act, K, quadrature=True)
    for a, b in zip(full, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
        np.testing.assert_array_equal(a, a.T)


def test_inner_loop_unroll_does_not_change_results(monkeypatch):
    """The pair integrals' inner loop runs unrolled 4 above _UNROLL_MIN_PAIRS pairs and not below
    (compile time of small kernels): sigma_moments, the smooth pair tables and their gradients agree."""
    from eft_prob.theory import vertex

    assert gauss.inner_unroll(64) == gauss._INNER_UNROLL == 4 and gauss.inner_unroll(63) == 1
    act = get_activation("tanh")
    X = np.random.default_rng(3).normal(size=(5, 2))
    K = jnp.asarray(0.1 + X @ X.T / 2)

    def run():
        f = lambda c: (*gauss.sigma_moments(act, c * K, quadrature=True), vertex._smooth_pair_integrals(act, c * K))
        g = jax.grad(lambda c: sum(jnp.sum(jnp.sin(a)) for a in f(c)))(1.2)
        return (*f(1.2), g)

    assert gauss.inner_unroll(5) == 1
    small = run()
    monkeypatch.setattr(gauss, "_UNROLL_MIN_PAIRS", 0)
    assert gauss.inner_unroll(5) == 4
    for a, b in zip(small, run()):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name, reach", [("tanh", 300.0), ("sin", 40.0)])
def test_addition_theorems_equal_direct_evaluation(name, reach):
    """shift_rule: σ^(p)(a + b), p = 0..5, from the states of a and b equals σ^(p) evaluated at a + b
    to rounding, saturated tanh tails (|a|, |b| up to the rule's bound 300) included, and so do the
    derivatives in a and b (at 0 too, where the tanh state switches branch).  (sin is compared up to
    |a + b| <= 80 only because the reference's own argument a + b carries rounding ∝ |a|.)"""
    from eft_prob.theory.ntk_stats import _derivative_fns

    act = get_activation(name)
    rule = gauss.shift_rule(act)
    assert rule is not None and rule.max_abs == (300.0 if name == "tanh" else None)
    fns = _derivative_fns(act, 5)
    a = np.concatenate([np.linspace(-reach, reach, 601), np.linspace(-3, 3, 61), [0.0]])
    A, B = np.meshgrid(a, a[::3])
    vals = rule.values(rule.split(jnp.asarray(A)), rule.split(jnp.asarray(B)), 5)
    for v, f in zip(vals, fns):
        ref = np.asarray(f(jnp.asarray(A + B)))
        np.testing.assert_allclose(np.asarray(v), ref, rtol=0, atol=2e-14 * max(1.0, np.abs(ref).max()))
    for a0, b0 in [(0.0, 0.0), (0.3, 0.0), (0.0, -0.7), (5.0, -5.2), (-20.0, 19.5)]:
        for p in range(4):
            g = jax.grad(lambda a, b, p=p: rule.values(rule.split(a), rule.split(b), p)[p], argnums=(0, 1))(a0, b0)
            g_ref = jax.grad(lambda a, b, p=p: fns[p](a + b), argnums=(0, 1))(a0, b0)
            np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["tanh", "sin"])
def test_pair_integrals_by_the_addition_theorem(monkeypatch, name):
    """sigma_moments and the smooth pair tables with the inner axis from σ's addition theorem equal
    direct evaluation to rounding, values and gradients, repeated inputs included (the rule applies
    above _SHIFT_MIN_PAIRS pairs: the threshold is lowered to 0 here)."""
    from eft_prob.theory import vertex

    act = get_activation(name)
    assert gauss.pair_rule(act, 64, True) is not None and gauss.pair_rule(act, 63, True) is None
    assert gauss.pair_rule(act, 64, False) is None
    monkeypatch.setattr(gauss, "_SHIFT_MIN_PAIRS", 0)
    X = np.random.default_rng(3).normal(size=(5, 2))
    X[4] = X[1]
    K = jnp.asarray(0.1 + X @ X.T / 2)

    def run(shift):
        f = lambda c: (
            *gauss.sigma_moments(act, c * K, quadrature=True, shift=shift),
            vertex._smooth_pair_integrals(act, c * K, shift=shift),
        )
        g = jax.grad(lambda c: sum(jnp.sum(jnp.sin(a)) for a in f(c)))(1.7)
        return (*f(1.7), g)

    for a, b in zip(run(True), run(False)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * max(1.0, np.abs(b).max()))


def test_kernels_by_the_addition_theorem_at_many_inputs(monkeypatch):
    """End to end, N = 70 (the unrolled pair loop): tanh kernels and the prior statistics (K, K^{1},
    the factored V's exact parts) with the addition theorem (the default here) equal direct evaluation
    to rounding.  The factored V's draws σ(ξ·√K) agree to 1e-10 only: the square root of the nearly
    singular K amplifies rounding differences of K (1e-16) on its smallest eigenvalues."""
    kernels = importlib.import_module("eft_prob.theory.kernels")  # eft_prob.theory.kernels is also a function
    from eft_prob.theory import vertex

    spec = ep.MLPSpec.at_criticality(3, (32, 32), 1, "tanh")
    X = np.random.default_rng(0).normal(size=(70, 3))
    assert kernels._shift_ok(spec, X)

    def run():
        st = ep.theory.prior_statistics(spec, X, samples=16)
        exact = (ep.theory.nngp(spec, X, all_layers=True), ep.theory.ntk(spec, X), st.K, st.K1, st.V.M, st.V.P)
        return exact, (st.V.phi, st.V.last)

    on = run()
    monkeypatch.setattr(kernels, "_shift_ok", lambda spec, X: False)
    monkeypatch.setattr(vertex, "_shift_ok", lambda spec, X: False)
    off = run()
    for group, tol in zip(range(2), (1e-13, 1e-10)):
        for a, b in zip(on[group], off[group]):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, np.abs(b).max()))


def test_addition_theorems_only_for_the_registry_functions():
    """Only the registry's tanh and sin (by their functions) get a rule: a user's callable that
    happens to be jnp.tanh has its σ' from autodiff, so it keeps direct evaluation."""
    from eft_prob.activations import Activation

    assert gauss.shift_rule(get_activation("TANH")) is gauss.shift_rule(get_activation("tanh")) is not None
    for act in ("gelu", "erf", "swish", "sigmoid", "relu", jnp.tanh, Activation("t", jnp.tanh)):
        assert gauss.shift_rule(get_activation(act)) is None, act


@pytest.mark.parametrize("name", ["tanh", "gelu"])
def test_smooth_matrix_moments_equal_the_elementwise_rule(name):
    """The pairwise path of sigma_moments (each unordered pair once, inner axis as a loop) against
    the elementwise 2-D rule on every ordered pair, diagonal and a near-duplicate included; and its
    gradient against finite differences."""
    act = get_activation(name)
    X = np.random.default_rng(4).normal(size=(7, 3))
    X[2] = X[1] * 1.001
    K = jnp.asarray(X @ X.T / 3 + 0.05)
    d = jnp.diagonal(K)
    ss, dd = gauss.sigma_moments(act, K)
    ref = gauss.pair_moments(act, d[:, None], d[None, :], K, quadrature=True)
    for a, b in zip((ss, dd), ref):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)

    def total(c):
        s, t = gauss.sigma_moments(act, c * K)
        return jnp.sum(s * t)

    h = 1e-5
    fd = (float(total(1.1 + h)) - float(total(1.1 - h))) / (2 * h)
    assert float(jax.grad(total)(1.1)) == pytest.approx(fd, rel=1e-7)


@pytest.mark.parametrize("name", ["relu", "erf", "tanh", "leaky_relu", "gelu"])
def test_gradients_finite_at_identical_inputs_and_zero_kernel(name):
    act = get_activation(name)
    K = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # duplicate input, zero input

    def total(c):
        ss, dd = gauss.sigma_moments(act, c * K + jnp.diag(jnp.array([0.0, 0.0, 0.0])))
        return jnp.sum(ss) + jnp.sum(dd)

    g = jax.grad(total)(1.3)
    assert np.isfinite(float(g))


def test_gradient_matches_finite_differences():
    act = get_activation("relu")
    X = np.random.default_rng(3).normal(size=(4, 3))
    K = X @ X.T / 3 + 0.1

    def total(c):
        ss, dd = gauss.sigma_moments(act, c * K)
        return jnp.sum(ss * dd)

    g = float(jax.grad(total)(1.1))
    h = 1e-6
    fd = (float(total(1.1 + h)) - float(total(1.1 - h))) / (2 * h)
    assert g == pytest.approx(fd, rel=1e-6)


def test_universality_and_critical_points():
    assert get_activation("relu").universality == "scale-invariant"
    assert get_activation("tanh").critical == (0.0, 1.0)
    assert get_activation("erf").critical == pytest.approx((0.0, np.pi / 4))
    assert get_activation("gelu").universality == "half-stable"
    assert get_activation("softplus").universality == "none"
    custom = get_activation(lambda z: jnp.tanh(2.0 * z))  # σ1 = 2 → C_W = 1/4, K*=0 class
    assert custom.universality == "K*=0"
    assert custom.critical[1] == pytest.approx(0.25)
    assert get_activation(lambda z: z**2 + 1.0).universality == "unknown"


def test_bad_activation_messages():
    with pytest.raises(ValueError, match="not known"):
        get_activation("tanhh")
    with pytest.raises(ValueError, match="elementwise"):
        get_activation(lambda z: jnp.sum(z))
    with pytest.raises(ValueError, match="callable"):
        get_activation(3.0)


def test_user_callable_runs_through_kernels():
    spec = ep.MLPSpec(2, (8,), 1, lambda z: jnp.tanh(z), C_W=1.0)
    ref = ep.MLPSpec(2, (8,), 1, "tanh", C_W=1.0)
    X = np.array([[1.0, 0.5], [-0.3, 0.8]])
    np.testing.assert_allclose(ep.theory.nngp(spec, X), ep.theory.nngp(ref, X), rtol=1e-13)


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@pytest.mark.parametrize("K", [0.1, 1.0, 4.0, 16.0])
def test_tanh_quadrature_against_adaptive_integration(K):
    """The smooth rule stays accurate for steep (saturating) activations, where Gauss–Hermite is not."""
    from scipy import integrate

    tanh = get_activation("tanh")
    f = lambda x: np.tanh(np.sqrt(K) * x) ** 2 * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    ref = integrate.quad(f, -12, 12, epsabs=1e-15, epsrel=1e-14, limit=500)[0]
    Kmat = jnp.array([[K, 0.3 * K], [0.3 * K, K]])
    ss, _ = gauss.sigma_moments(tanh, Kmat)
    assert float(ss[0, 0]) == pytest.approx(ref, rel=1e-11)
    assert float(gauss.expect_1d(lambda z: jnp.tanh(z) ** 2, K)) == pytest.approx(ref, rel=1e-12)
    g = lambda y, x: (
        np.tanh(np.sqrt(K) * x)
        * np.tanh(np.sqrt(K) * (0.3 * x + np.sqrt(0.91) * y))
        * np.exp(-(x * x + y * y) / 2)
        / (2 * np.pi)
    )
    ref2 = integrate.dblquad(g, -10, 10, -10, 10, epsabs=1e-12, epsrel=1e-11)[0]
    assert float(ss[0, 1]) == pytest.approx(ref2, rel=1e-9, abs=1e-12)


def test_bad_quadrature_orders():
    act = get_activation("tanh")
    with pytest.raises(ValueError, match="smooth2"):
        gauss.pair_moments(act, 1.0, 1.0, 0.5, orders={"smooth2": 0})
    with pytest.raises(ValueError, match="unknown key"):
        gauss.pair_moments(act, 1.0, 1.0, 0.5, orders={"gh2": 64})
