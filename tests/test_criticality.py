"""Criticality, universality classes and the regime diagnostic (THEORY.md §4; book Ch. 5).

Susceptibilities against closed forms, finite differences of the kernel map and independent
adaptive quadrature (scipy); critical points against known values, the GELU closed form and the
two-input kernel recursion; universality classes against the registry and user callables; the
regime parameter ε against the exact results of THEORY.md §4.4.
"""

import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special

import eft_prob as ep
from eft_prob import criticality as crit
from eft_prob import gauss
from eft_prob.activations import ACTIVATIONS, get_activation, leaky_relu

KS = np.array([0.05, 0.7, 3.0, 20.0])


def _gauss_quad(f, K):
    """⟨f(z)⟩ for z ~ N(0, K) by adaptive quadrature (independent of eft_prob.gauss)."""
    w = lambda z: f(z) * math.exp(-z * z / (2 * K)) / math.sqrt(2 * math.pi * K)
    s = math.sqrt(K)
    return sum(integrate.quad(w, a * s, b * s, epsabs=0, epsrel=1e-13, limit=200)[0] for a, b in ((-40, 0), (0, 40)))


# numpy versions of the half-stable activations and their derivatives, for _gauss_quad
_phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
_NUMPY = {
    "gelu": (lambda z: z * special.ndtr(z), lambda z: special.ndtr(z) + z * _phi(z)),
    "swish": (lambda z: z * special.expit(z), lambda z: special.expit(z) * (1 + z * (1 - special.expit(z)))),
}


# --------------------------------------------------------------------------------------------
# Susceptibilities.


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "linear", leaky_relu(0.3), "erf", "sin"])
def test_closed_form_chis_match_quadrature(act):
    for chi in (crit.chi_parallel, crit.chi_perp):
        closed = np.asarray(chi(act, KS, 1.7))
        quad = np.asarray(chi(act, KS, 1.7, quadrature=True))
        assert closed.dtype == np.float64 and closed.shape == KS.shape
        np.testing.assert_allclose(closed, quad, rtol=1e-11, atol=1e-15, err_msg=f"{chi.__name__}")
    a = get_activation(act)
    if a.slopes is not None:  # χ_∥ = χ_⊥ = C_W A_2 at every K
        np.testing.assert_allclose(np.asarray(crit.chi_parallel(act, KS, 1.7)), 1.7 * a.A2, rtol=1e-15)


@pytest.mark.parametrize("act", ["tanh", "sin", "relu", "gelu", "swish", "softplus"])
def test_chi_parallel_is_the_slope_of_the_kernel_map(act):
    """χ_∥ = dK^(ℓ+1)/dK^(ℓ) of K ↦ C_b + C_W⟨σ²⟩_K: central differences of the map."""
    a = get_activation(act)
    C_W = 1.3
    g = lambda K: np.asarray(gauss.expect_1d(lambda z: a.fn(z) ** 2, jnp.asarray(K), kinked=a.kinked))
    h = 1e-4 * KS
    fd = C_W * (g(KS + h) - g(KS - h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(crit.chi_parallel(act, KS, C_W)), fd, rtol=1e-7, atol=1e-14)


@pytest.mark.parametrize("name", sorted(_NUMPY))
def test_chis_against_independent_quadrature(name):
    f, df = _NUMPY[name]
    for K in (0.3, 4.0):
        zsd = _gauss_quad(lambda z: z * f(z) * df(z), K)
        dd = _gauss_quad(lambda z: df(z) ** 2, K)
        assert float(crit.chi_parallel(name, K, 2.0)) == pytest.approx(2.0 * zsd / K, rel=1e-10)
        assert float(crit.chi_perp(name, K, 2.0)) == pytest.approx(2.0 * dd, rel=1e-10)


def test_chis_broadcast_jit_and_grad():
    K = jnp.asarray([[0.5], [2.0]])
    C_W = jnp.asarray([1.0, 1.5, 2.0])
    out = crit.chi_perp("tanh", K, C_W)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out[:, 1:] / out[:, :1], np.broadcast_to([1.5, 2.0], (2, 2)), rtol=1e-14)
    jitted = jax.jit(lambda k: crit.chi_parallel("tanh", k, 2.0))
    assert float(jitted(1.3)) == pytest.approx(float(crit.chi_parallel("tanh", 1.3, 2.0)), rel=1e-14)
    # h(K) = ½ dχ_⊥/dK = (C_W/4K²)⟨σ'²(z² − K)⟩_K (THEORY.md §4.2), by autodiff vs that Stein form
    a = get_activation("tanh")
    K0 = 0.8
    h_ad = 0.5 * float(jax.grad(lambda k: crit.chi_perp("tanh", k))(K0))
    h_stein = float(gauss.expect_1d(lambda z: a.grad(z) ** 2 * (z * z - K0), K0)) / (4 * K0**2)
    assert h_ad == pytest.approx(h_stein, rel=1e-10)


# --------------------------------------------------------------------------------------------
# Critical points and universality classes.


@pytest.mark.parametrize(
    "act, expected",
    [
        ("tanh", (0.0, 1.0)),
        ("sin", (0.0, 1.0)),
        ("erf", (0.0, math.pi / 4)),
        ("relu", (0.0, 2.0)),
        ("leaky_relu", (0.0, 2 / (1 + 0.01**2))),
        (leaky_relu(0.3), (0.0, 2 / (1 + 0.3**2))),
        ("linear", (0.0, 1.0)),
    ],
)
def test_known_critical_points(act, expected):
    C_b, C_W = crit.critical_point(act)
    assert C_b == expected[0]
    assert C_W == pytest.approx(expected[1], rel=1e-13)
    (p,) = crit.critical_points(act)
    assert p.chi_parallel == pytest.approx(1.0, abs=1e-13) and p.chi_perp == pytest.approx(1.0, abs=1e-13)
    if p.kind == "scale-invariant":
        assert p.K_star is None
    else:
        assert p.kind == "K*=0" and p.K_star == 0.0
        # C_W⟨σ²⟩_K = K + a_1K² + ...: the K* = 0 limit is approached from above, K^(ℓ+1) < K^(ℓ)
        K = np.array([1e-3, 1e-2])
        s2 = np.asarray(gauss.expect_1d(lambda z: get_activation(act).fn(z) ** 2, jnp.asarray(K)))
        assert np.all(C_W * s2 < K)


@pytest.mark.parametrize("act", ["gelu", "swish"])
def test_half_stable_points_are_self_consistent(act):
    (p,) = crit.critical_points(act)
    assert p.kind == "half-stable" and p.K_star > 0 and p.C_b >= 0
    # plugged back in, with quadrature of the library ...
    for chi in (crit.chi_parallel, crit.chi_perp):
        assert abs(float(chi(act, p.K_star, p.C_W)) - 1) < 1e-10
    a = get_activation(act)
    s2 = float(gauss.expect_1d(lambda z: a.fn(z) ** 2, p.K_star))
    assert p.C_b + p.C_W * s2 == pytest.approx(p.K_star, rel=1e-12)
    # ... and with independent adaptive quadrature
    f, df = _NUMPY[act]
    K = p.K_star
    assert p.C_W * _gauss_quad(lambda z: z * f(z) * df(z), K) / K == pytest.approx(1.0, abs=1e-10)
    assert p.C_W * _gauss_quad(lambda z: df(z) ** 2, K) == pytest.approx(1.0, abs=1e-10)
    assert p.C_b + p.C_W * _gauss_quad(lambda z: f(z) ** 2, K) == pytest.approx(K, rel=1e-10)
    assert crit.critical_point(act) == (p.C_b, p.C_W)


def test_gelu_critical_kernel_closed_form():
    """K* solves K⟨σ'²⟩ = ⟨zσσ'⟩, i.e. ⟨σσ''⟩_K = 0 (Stein).  For σ = zΦ(z), σ'' = φ(z)(2 − z²);
    Gaussian integrals of φ(z)·N(z; 0, K) reduce it to 2/(1+K) = K/(1+2K): K*² − 3K* − 2 = 0."""
    (p,) = crit.critical_points("gelu")
    assert p.K_star == pytest.approx((3 + math.sqrt(17)) / 2, rel=1e-13)
    assert (p.C_b, p.C_W) == pytest.approx((0.172922, 1.983058), abs=1e-6)


@pytest.mark.parametrize("act", ["gelu", "swish", "relu"])
def test_perpendicular_mode_is_marginal_at_criticality(act):
    """Two inputs at a small angle through 50 critical layers: K_[2]/K_[0] neither grows nor decays
    exponentially (THEORY.md §4.2); with χ_⊥ = χ_∥ = 0.95 at the same fixed point it decays ~0.95^50."""
    (p,) = crit.critical_points(act)
    K_star = p.K_star if p.K_star is not None else 1.0
    s2 = float(gauss.expect_1d(lambda z: get_activation(act).fn(z) ** 2, K_star, kinked=get_activation(act).kinked))
    theta = 0.01
    X = math.sqrt(2 * K_star) * np.array([[1.0, 0.0], [math.cos(theta), math.sin(theta)]])

    def angle_ratio(C_b, C_W):
        # layer 1 (C_b = 0, C_W = 1) puts both inputs at K = K*, then 50 layers of the map
        spec = ep.MLPSpec(2, (4,) * 50, 1, act, C_b=(0.0,) + (C_b,) * 50, C_W=(1.0,) + (C_W,) * 50)
        K = np.asarray(ep.theory.nngp(spec, X, all_layers=True))
        gap = lambda k: 1 - k[0, 1] / math.sqrt(k[0, 0] * k[1, 1])  # ∝ K_[2]/K_[0] for small angles
        assert K[-1, 0, 0] == pytest.approx(K_star, rel=1e-9)  # K* stays a fixed point
        return gap(K[-1]) / gap(K[0])

    assert 0.7 < angle_ratio(p.C_b, p.C_W) < 1.0 / 0.7
    C_W = 0.95 * p.C_W
    off = angle_ratio(K_star - C_W * s2, C_W)
    assert off < 0.2 and off == pytest.approx(0.95**50, rel=0.3)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_universality_class_agrees_with_registry(name):
    assert crit.universality_class(name) == ACTIVATIONS[name].universality


def test_no_critical_point_for_sigmoid_and_softplus():
    for name in ("sigmoid", "softplus"):
        assert crit.critical_points(name) == []
        with pytest.raises(ValueError, match=f"activation '{name}' has no critical point"):
            crit.critical_point(name)


@pytest.mark.parametrize(
    "fn, cls, point",
    [
        (lambda z: jnp.sin(z), "K*=0", (0.0, 1.0)),
        (lambda z: 2.0 * jnp.tanh(z), "K*=0", (0.0, 0.25)),
        (lambda z: z + z**2, "none", None),
        (lambda z: z**3, "none", None),
        (lambda z: jnp.maximum(z, 0.0), "scale-invariant", (0.0, 2.0)),
        (lambda z: jnp.where(z > 0, 2.0 * z, -0.5 * z), "scale-invariant", (0.0, 1 / 2.125)),
        (lambda z: z * jax.nn.sigmoid(z), "half-stable", crit.critical_point("swish")),
    ],
)
def test_user_callables(fn, cls, point):
    act = get_activation(fn)
    assert crit.universality_class(act) == cls
    if point is None:
        assert crit.critical_points(act) == []
    else:
        assert crit.critical_point(act) == pytest.approx(point, rel=1e-12)
    # the registry's K*=0 test for callables (Taylor coefficients at 0) agrees
    assert (act.universality == "K*=0") == (cls == "K*=0")


def test_z_plus_z_squared_has_no_nonzero_fixed_point():
    """σ = z + z²: K⟨σ'²⟩ − ⟨zσσ'⟩ = K(1 + 4K) − (K + 6K²) = −2K² < 0, and a_1 = 3 > 0."""
    K = np.geomspace(1e-3, 10, 7)
    ratio = np.asarray(crit.chi_parallel(lambda z: z + z**2, K) / crit.chi_perp(lambda z: z + z**2, K))
    np.testing.assert_allclose(ratio, (1 + 6 * K) / (1 + 4 * K), rtol=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: crit.chi_parallel("relux", 1.0), r"activation='relux' is not known"),
        (lambda: crit.critical_points("tahn"), r"activation='tahn' is not known"),
        (lambda: crit.universality_class(3.0), r"activation must be"),
        (lambda: crit.chi_parallel("tanh", 0.0), r"K must be finite and > 0"),
        (lambda: crit.chi_perp("tanh", [1.0, -2.0]), r"K must be finite and > 0.*-2\.0"),
        (lambda: crit.chi_perp("tanh", np.nan), r"K must be finite and > 0"),
        (lambda: crit.chi_parallel("relu", 1.0, C_W=0.0), r"C_W must be finite and > 0"),
        (lambda: crit.chi_perp("gelu", 1.0, C_W=-1.0), r"C_W must be finite and > 0"),
        (lambda: crit.regime("relu"), r"spec must be an eft_prob.MLPSpec"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------
# Regime.


def _relu_spec(depth, n=64):
    return ep.MLPSpec(3, (n,) * (depth - 1), 1, "relu", C_b=0.0, C_W=2.0)


@pytest.mark.parametrize("depth", [3, 5])
def test_relu_epsilon_is_five_l_over_n(depth):
    reg = crit.regime(_relu_spec(depth))
    assert reg.expansion_parameter == pytest.approx(5 * (depth - 1) / 64, rel=1e-12)
    assert reg.aspect_ratio == depth / 64 and reg.n_eff == 64 and reg.threshold == crit.REGIME_THRESHOLD
    assert reg.status == ("perturbative" if depth == 3 else "strongly-coupled")


def test_scale_invariant_epsilon_with_unequal_widths():
    act = leaky_relu(0.3)
    hidden = (30, 50, 70)
    spec = ep.MLPSpec(2, hidden, 1, act, C_b=0.0, C_W=1 / act.A2)
    X = np.array([[0.3, -1.2], [2.0, 0.5]])  # ε is the same for every input here
    reg = crit.regime(spec, X)
    c = 3 * act.A4 / act.A2**2 - 1
    assert reg.expansion_parameter == pytest.approx(c * sum(1 / n for n in hidden), rel=1e-11)
    assert reg.n_eff == pytest.approx(3 / sum(1 / n for n in hidden), rel=1e-14)
    assert reg.status == "strongly-coupled"


@pytest.mark.parametrize("depth, v_over_k2", [(3, 1.213), (5, 2.408), (10, 5.524)])
def test_tanh_epsilon_matches_theory_numbers(depth, v_over_k2):
    """THEORY.md §4.4: V/K² of tanh at criticality from one input with K^(1) = 1."""
    n = 50
    spec = ep.MLPSpec(1, (n,) * (depth - 1), 1, "tanh", C_b=0.0, C_W=1.0)
    assert crit.regime(spec).expansion_parameter * n == pytest.approx(v_over_k2, abs=6e-4)


def test_depth_one_is_gaussian():
    reg = crit.regime(ep.MLPSpec(3, (), 2, "tanh"))
    assert reg.status == "gaussian" and reg.expansion_parameter == 0.0 and reg.aspect_ratio == 0.0
    assert "exactly Gaussian" in reg.message


def test_regime_warning_above_threshold_only():
    strong = _relu_spec(5)  # ε = 20/64 = 0.3125
    eps = crit.regime(strong).expansion_parameter
    with pytest.warns(ep.RegimeWarning, match=re.escape(f"ε = V/(n_(L-1)·K²) = {eps:.3g}")) as rec:
        reg = crit.check_regime(strong, None, "NetworkPrior(order=1)")
    (w,) = rec
    msg = str(w.message)
    assert msg.startswith("NetworkPrior(order=1): strongly coupled") and reg.status == "strongly-coupled"
    assert "r = L/n = 0.0781" in msg
    # the exact ReLU result Π(1 + 5/n) − 1 against ε, and the advice
    exact = (1 + 5 / 64) ** 4 - 1
    assert f"excess kurtosis is {exact:.3g}" in msg and f"misses {1 - eps / exact:.0%}" in msg
    # 5(L−1)/n <= 0.25 needs n >= 80 at L = 5, or L <= 4 at n = 64
    assert "n >= 80" in msg and "L <= 4" in msg and "which exists for this network" in msg

    weak = _relu_spec(3)  # ε = 10/64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg = crit.check_regime(weak, None, "NetworkPrior(order=1)")
    assert reg.status == "perturbative" and "perturbative: ε" in reg.message


def test_regime_from_precomputed_statistics(monkeypatch):
    """ε read off a PriorStatistics with a dense V equals the separate exact pass; NetworkPrior and
    BayesianPosterior(order=1) use their own statistics (no second vertex program), and warn alike."""
    from eft_prob.distributions import BayesianPosterior, NetworkPrior
    from eft_prob.theory.bayes import nlo_posterior_moments
    from eft_prob.theory.vertex import prior_statistics

    strong = ep.MLPSpec.at_criticality(2, (64,) * 4, 1, "relu")  # ε ≈ 5(L − 1)/n = 0.31
    X = np.array([[0.3, -1.1], [1.2, 0.4], [-0.7, 0.9]])
    direct = crit.regime(strong, X)
    st = prior_statistics(strong, X)
    read = crit.regime(strong, X, statistics=st)
    assert read.status == direct.status == "strongly-coupled"
    assert read.expansion_parameter == pytest.approx(direct.expansion_parameter, rel=1e-10)
    assert read.message.replace(f"{read.expansion_parameter:.3g}", "") == direct.message.replace(
        f"{direct.expansion_parameter:.3g}", ""
    )
    with pytest.raises(ValueError, match="statistics are for 3 inputs and width 64, but X has 2 inputs"):
        crit.regime(strong, X[:2], statistics=st)
    with pytest.raises(ValueError, match="spec has n_\\(L-1\\) = 20"):
        crit.regime(strong.replace(hidden=(64, 64, 64, 20)), X, statistics=st)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the regime check recomputed the vertex")

    monkeypatch.setattr(crit, "_vertex_compute", no_second_pass)
    with pytest.warns(ep.RegimeWarning, match=re.escape("NetworkPrior(order=1): strongly coupled")):
        prior = NetworkPrior(strong, X, order=1)
    assert prior.regime.expansion_parameter == pytest.approx(direct.expansion_parameter, rel=1e-10)
    y = np.array([[0.2], [-0.4]])
    with pytest.warns(ep.RegimeWarning, match=re.escape("BayesianPosterior(order=1): strongly coupled")):
        post = BayesianPosterior(strong, X[:2], y, X[2:], 0.1, order=1, form="mixture")
    assert post.regime.expansion_parameter == pytest.approx(direct.expansion_parameter, rel=1e-10)
    with pytest.warns(ep.RegimeWarning, match=re.escape("nlo_posterior_moments: strongly coupled")):
        nlo_posterior_moments(strong, X[:2], y, X[2:], 0.1)


def test_check_regime_skips_traced_specs():
    spec = _relu_spec(5)

    def f(c):
        assert crit.check_regime(spec.replace(C_W=c), None, "traced") is None
        return c

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.jit(f)(2.0)
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda c: crit.regime(spec.replace(C_W=c)).expansion_parameter)(2.0)
