"""Criticality, universality classes and the regime of the 1/n expansion (book Ch. 5; THEORY.md §4).

A single input's kernel obeys the map K ↦ C_b + C_W⟨σ²⟩_K (THEORY.md §4.1).  Its two
susceptibilities (§4.2)

    χ_∥(K) = C_W d⟨σ²⟩_K/dK = (C_W/K)⟨zσσ'⟩_K,        χ_⊥(K) = C_W⟨σ'σ'⟩_K

are the per-layer growth factors of a perturbation of the kernel along the input (the parallel
mode K_[1]) and of the distance between two nearby inputs (the perpendicular mode K_[2]).  A
**critical point** is (C_b >= 0, C_W > 0, K*) with

    K* = C_b + C_W⟨σ²⟩_{K*},        χ_∥(K*) = χ_⊥(K*) = 1,

so that neither mode grows or decays exponentially with depth.  Eliminating C_W = 1/⟨σ'²⟩_{K*},
a nonzero K* solves K⟨σ'²⟩_K = ⟨zσσ'⟩_K, and C_b = K* − C_W⟨σ²⟩_{K*} must come out >= 0.

Universality classes (book §5.2–5.3), decided here from σ itself, not from the registry:

* ``"scale-invariant"`` — σ(z) = a_+z (z >= 0), a_-z (z < 0): χ_∥ = χ_⊥ = C_W A_2 for every K,
  A_2 = (a_+² + a_-²)/2, so C_b = 0, C_W = 1/A_2 is critical with every K* a fixed point (a line);
* ``"K*=0"`` — σ(0) = 0, σ'(0) = σ_1 ≠ 0 and a_1 = σ_3/σ_1 + ¾(σ_2/σ_1)² < 0 (tanh, sin, erf): the
  critical point is the limit K* → 0 with C_b = 0, C_W = 1/σ_1², approached as K ≈ 1/((−a_1)ℓ);
* ``"half-stable"`` — a critical point with K* > 0 (GELU, SWISH; §5.3.4).  Since χ_∥(K*) = 1, a
  deviation obeys ΔK' = ΔK + ½C_W⟨σ²⟩''_{K*}ΔK², so K* attracts from one side and repels on the other;
* ``"none"`` — no critical point (sigmoid, softplus, nonlinear monomials; §5.3.2).

Nonzero critical points are found by scanning K on a log grid (:data:`K_SCAN`) for sign changes of
1 − χ_∥/χ_⊥ at equal C_W, each refined by Brent's method to machine precision.

The **regime** of the 1/n expansion (§5.4, THEORY.md §4.4) is measured by the normalized output
vertex ε = max_α V^(L)_{(αα)(αα)}/(n_{L-1}(K^(L)_{αα})²), the excess kurtosis of one output neuron
at O(1/n): 5(L−1)/n for ReLU and ≈ (2/3)L/n for tanh at criticality.  :func:`regime` reports it
with the aspect ratio r = L/n and advice; :func:`check_regime` warns when ε > :data:`REGIME_THRESHOLD`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import brentq

from . import gauss
from ._config import RegimeWarning, float64_theory, is_concrete, precision_scope, warn
from .activations import Activation, get_activation
from .spec import MLPSpec
from .theory.vertex import _compute as _vertex_compute

__all__ = [
    "K_SCAN",
    "REGIME_THRESHOLD",
    "CriticalPoint",
    "Regime",
    "check_regime",
    "chi_parallel",
    "chi_perp",
    "critical_point",
    "critical_points",
    "regime",
    "universality_class",
]

#: (K_min, K_max, points) of the log grid scanned for critical points with K* > 0.  Roots outside
#: it, or pairs of roots closer than one grid step (~6% in K), are not found.
K_SCAN = (1e-6, 1e4, 401)

#: ε above which the 1/n expansion is called strongly coupled (:func:`regime`).  At ε = 0.25 the
#: O(1/n) term misses about ε/2 ≈ 12% of the non-Gaussian deviation (ReLU, exact result).
REGIME_THRESHOLD = 0.25

# |1 − χ_∥/χ_⊥| below this on both ends of a grid step is rounding, not a sign change: activations
# with σ(0)σ''(0) = 0 have 1 − χ_∥/χ_⊥ = O(K) as K → 0.
_ROOT_NOISE = 1e-10


# --------------------------------------------------------------------------------------------
# Classification helpers (numerical, from σ).


@functools.lru_cache(maxsize=128)
def _slopes(act: Activation) -> tuple[float, float] | None:
    """(a_+, a_-) when σ(z) = a_+z (z >= 0), a_-z (z < 0) on a log grid of ±[1e-3, 1e3], else None."""
    with jax.enable_x64(True):
        z = np.geomspace(1e-3, 1e3, 25)
        z = np.concatenate([-z[::-1], [0.0], z, [1.0, -1.0]])
        s = np.asarray(act.fn(jnp.asarray(z)), dtype=np.float64)
    if s.shape != z.shape or not np.all(np.isfinite(s)):
        return None
    a_plus, a_minus = float(s[-2]), float(-s[-1])
    if a_plus == 0.0 and a_minus == 0.0:
        return None
    line = np.where(z >= 0, a_plus, a_minus) * z
    tol = 1e-12 * (abs(a_plus) + abs(a_minus)) * np.abs(z)
    return (a_plus, a_minus) if np.all(np.abs(s - line) <= tol) else None


@functools.lru_cache(maxsize=128)
def _taylor(act: Activation) -> tuple[float, float, float, float]:
    """(σ(0), σ'(0), σ''(0), σ'''(0)) in one compiled call (Activation.taylor compiles four)."""
    f = lambda z: act.fn(z)
    d1 = jax.grad(f)
    d2 = jax.grad(d1)
    d3 = jax.grad(d2)
    with jax.enable_x64(True):
        out = jax.jit(lambda z: jnp.stack([f(z), d1(z), d2(z), d3(z)]))(jnp.float64(0.0))
        return tuple(float(v) for v in out)


def _k_star_zero(act: Activation) -> float | None:
    """C_W = 1/σ_1² if σ is in the K* = 0 class (σ(0) = 0, σ_1 ≠ 0, a_1 < 0; THEORY.md §4.3), else None.

    The criterion of ``eft_prob.activations._k_star_zero_critical`` (which the registry applies to
    user callables; the tests check that the two agree), with the Taylor coefficients in one call.
    """
    if act.kinked:
        return None  # no derivatives at a kink
    s0, s1, s2, s3 = _taylor(act)
    if abs(s0) > 1e-12 or abs(s1) < 1e-12:
        return None
    a1 = s3 / s1 + 0.75 * (s2 / s1) ** 2
    return 1.0 / s1**2 if a1 < 0 else None


def _slope_A2(slopes):
    a, b = slopes
    return (a * a + b * b) / 2


@functools.lru_cache(maxsize=128)
def _moments_fn(act: Activation, kinked: bool):
    """Jitted K ↦ (⟨σ²⟩_K, ⟨σ'²⟩_K, ⟨zσσ'⟩_K) stacked on a leading axis of 3 (any shape of K)."""
    fn, gr = act.fn, act.grad

    def integrand(z):
        s, d = fn(z), gr(z)
        return jnp.stack([s * s, d * d, z * s * d])

    return jax.jit(lambda K: gauss.expect_1d(integrand, K, kinked=kinked))


def _moments(act: Activation, K):
    slopes = _slopes(act)
    kinked = act.kinked or (slopes is not None and slopes[0] != slopes[1])
    return _moments_fn(act, bool(kinked))(K)


@functools.lru_cache(maxsize=128)
def _cached_activation(fn) -> Activation:
    return get_activation(fn)


def _activation(activation) -> Activation:
    """get_activation, returning the same Activation for repeated calls with one user callable (so
    the per-Activation caches of this module apply to it too)."""
    if isinstance(activation, (str, Activation)) or not callable(activation):
        return get_activation(activation)
    try:
        return _cached_activation(activation)
    except TypeError:  # an unhashable callable
        return get_activation(activation)


def _check_positive_array(name: str, value, meaning: str):
    arr = jnp.asarray(value, dtype=jnp.result_type(float))
    if is_concrete(arr):
        a = np.asarray(arr)
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            bad = a[~(np.isfinite(a) & (a > 0))].ravel()[0]
            raise ValueError(f"{name} must be finite and > 0 ({meaning}), got {name} = {bad!r}.")
    return arr


# --------------------------------------------------------------------------------------------
# Susceptibilities.


def _chis(activation, K, C_W, quadrature):
    act = _activation(activation)
    K = _check_positive_array("K", K, "the variance ⟨z²⟩ of one preactivation")
    C_W = _check_positive_array("C_W", C_W, "the weight variance times the fan-in")
    K, C_W = jnp.broadcast_arrays(K, C_W)
    slopes = _slopes(act)
    if slopes is not None and not quadrature:
        chi = C_W * _slope_A2(slopes)
        return chi, chi
    if act.pair is not None and not quadrature:
        # Closed forms (erf, sin): ⟨σ²⟩_K = pair(K, K, K)[0], differentiated along K11 = K22 = K12 = K.
        ss = lambda k: act.pair(k, k, k)[0]
        d_ss = jax.jvp(ss, (K,), (jnp.ones_like(K),))[1]
        return C_W * d_ss, C_W * act.pair(K, K, K)[1]
    _, dd, zsd = _moments(act, K)
    return C_W * zsd / K, C_W * dd


@float64_theory
def chi_parallel(activation, K, C_W=1.0, *, quadrature: bool = False) -> jax.Array:
    """The parallel susceptibility χ_∥(K) = C_W d⟨σ²⟩_K/dK = (C_W/K)⟨zσσ'⟩_K (THEORY.md §4.2).

    χ_∥ = ∂K^(ℓ+1)/∂K^(ℓ) of the single-input kernel map: the per-layer growth factor of a change of
    one input's kernel (the parallel mode K_[1]).

    Parameters
    ----------
    activation : str, callable or Activation
    K : array_like, > 0
        Single-input kernels; the result has the broadcast shape of K and C_W.
    C_W : array_like, > 0
    quadrature : bool
        Force quadrature where a closed form exists (scale-invariant: C_W A_2; erf, sin).

    Returns
    -------
    float64 array.  Jit-able and differentiable in K and C_W.
    """
    return _chis(activation, K, C_W, quadrature)[0]


@float64_theory
def chi_perp(activation, K, C_W=1.0, *, quadrature: bool = False) -> jax.Array:
    """The perpendicular susceptibility χ_⊥(K) = C_W⟨σ'σ'⟩_K (THEORY.md §4.2).

    The per-layer growth factor of the distance between two nearby inputs (the perpendicular mode
    K_[2] of the γ-basis).  Arguments and result as :func:`chi_parallel`.
    """
    return _chis(activation, K, C_W, quadrature)[1]


# --------------------------------------------------------------------------------------------
# Critical points and universality classes.


@dataclasses.dataclass(frozen=True)
class CriticalPoint:
    """A critical initialization: K* = C_b + C_W⟨σ²⟩_{K*} with χ_∥(K*) = χ_⊥(K*) = 1.

    Attributes
    ----------
    K_star : float or None
        The fixed-point kernel; 0.0 for the K* = 0 class (a limit approached as K ~ 1/ℓ), None for
        the scale-invariant class (every K > 0 is a fixed point).
    C_b, C_W : float
        Bias variance (>= 0) and weight variance (> 0) of every layer after the first.
    chi_parallel, chi_perp : float
        The susceptibilities at K* with this C_W (1 up to rounding; for K* = 0 their K → 0 limits).
    kind : str
        The universality class the point belongs to: "scale-invariant", "K*=0" or "half-stable".
    """

    K_star: float | None
    C_b: float
    C_W: float
    chi_parallel: float
    chi_perp: float
    kind: str


@functools.lru_cache(maxsize=128)
def _solve(act: Activation) -> tuple[tuple[CriticalPoint, ...], tuple[tuple[float, float], ...]]:
    """(critical points, rejected (K*, C_b < 0) fixed points) of an activation, in float64."""
    slopes = _slopes(act)
    if slopes is not None:
        C_W = 1.0 / _slope_A2(slopes)
        chi = C_W * _slope_A2(slopes)
        return (CriticalPoint(None, 0.0, C_W, chi, chi, "scale-invariant"),), ()

    points = []
    C_W = _k_star_zero(act)
    if C_W is not None:
        s0, s1, s2, _ = _taylor(act)
        # K → 0 limits: ⟨σ'²⟩ → σ_1², ⟨zσσ'⟩/K = ⟨σ'² + σσ''⟩ → σ_1² + σ_0σ_2.
        points.append(CriticalPoint(0.0, 0.0, C_W, C_W * (s1**2 + s0 * s2), C_W * s1**2, "K*=0"))

    lo, hi, num = K_SCAN
    grid = np.geomspace(lo, hi, num)
    moments = lambda K: np.asarray(_moments(act, jnp.asarray(K, jnp.float64)), dtype=np.float64)
    _, dd, zsd = moments(grid)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = 1.0 - zsd / (grid * dd)  # 1 − χ_∥/χ_⊥ at equal C_W

    def h_scalar(K):
        _, d, z = moments(K)
        return float(1.0 - z / (K * d))

    rejected = []
    for i in range(num - 1):
        a, b = h[i], h[i + 1]
        if not (np.isfinite(a) and np.isfinite(b)) or a * b > 0 or max(abs(a), abs(b)) < _ROOT_NOISE:
            continue
        K_star = grid[i] if a == 0 else brentq(h_scalar, grid[i], grid[i + 1], xtol=1e-300, rtol=4e-15)
        s2, d2, z = moments(K_star)
        C_W = 1.0 / d2
        C_b = K_star - C_W * s2
        if C_b < 0:
            if C_b > -1e-12 * K_star:  # rounding of an exact C_b = 0
                C_b = 0.0
            else:
                rejected.append((float(K_star), float(C_b)))
                continue
        chis = float(C_W * z / K_star), float(C_W * d2)  # χ_⊥ = 1 by construction, up to rounding
        points.append(CriticalPoint(float(K_star), float(C_b), float(C_W), *chis, "half-stable"))
    return tuple(points), tuple(rejected)


@float64_theory
def critical_points(activation) -> list[CriticalPoint]:
    """All critical initializations (C_b >= 0, C_W > 0, K*) of an activation (book §5.1–5.3).

    For the scale-invariant class, the line C_b = 0, C_W = 1/A_2 (K_star None); for the K* = 0
    class, the limit K* → 0 with C_b = 0, C_W = 1/σ'(0)²; and every K* > 0 in :data:`K_SCAN` with
    K⟨σ'²⟩_K = ⟨zσσ'⟩_K, C_W = 1/⟨σ'²⟩_{K*} and C_b = K* − C_W⟨σ²⟩_{K*} >= 0, sorted by K*
    (smallest first).  An empty list means no criticality (e.g. sigmoid, softplus).

    ``activation`` may be a registered name, an :class:`~eft_prob.activations.Activation` or a
    JAX-traceable elementwise callable.  Results are cached per Activation object.
    """
    return list(_solve(_activation(activation))[0])


def critical_point(activation) -> tuple[float, float]:
    """(C_b, C_W) of the first critical point of :func:`critical_points` (see there for the order).

    Raises ValueError naming the activation when it has no critical point.
    """
    act = _activation(activation)
    points = critical_points(act)
    if points:
        return points[0].C_b, points[0].C_W
    with precision_scope():
        rejected = _solve(act)[1]
    lo, hi, _ = K_SCAN
    extra = "".join(f" (the fixed point K* = {K:.6g} with χ_∥ = χ_⊥ = 1 needs C_b = {b:.3g} < 0)" for K, b in rejected)
    raise ValueError(
        f"activation {act.name!r} has no critical point (universality class 'none', book §5.3.2): no "
        f"C_b >= 0, C_W > 0 makes χ_∥ = χ_⊥ = 1 at a fixed point K* = 0 or K* in [{lo:g}, {hi:g}]{extra}. "
        "Use an activation with one (relu, tanh, gelu, ...; see eft_prob.criticality.critical_points) "
        "or set C_b and C_W explicitly (off criticality the kernel flows exponentially with depth)."
    )


def universality_class(activation) -> str:
    """The universality class of σ: "scale-invariant", "K*=0", "half-stable" or "none" (module docstring).

    Scale invariance is tested on σ's values, the K* = 0 class from its Taylor coefficients at 0
    (σ(0) = 0, σ'(0) ≠ 0, a_1 < 0), "half-stable" by the existence of a critical point with K* > 0.
    """
    act = _activation(activation)
    points = critical_points(act)
    return points[0].kind if points else "none"


# --------------------------------------------------------------------------------------------
# Regime of the 1/n expansion.


@dataclasses.dataclass(frozen=True)
class Regime:
    """How far a network is from the Gaussian limit, and whether O(1/n) describes it.

    Attributes
    ----------
    aspect_ratio : float
        r = L/n (``spec.aspect_ratio``: L times the mean inverse hidden width).
    expansion_parameter : float
        ε = max_α V^(L)_{(αα)(αα)}/(n_{L-1}(K^(L)_{αα})²): the O(1/n) excess kurtosis
        E[z⁴]/(3E[z²]²) − 1 of one output neuron, the normalized vertex of THEORY.md §4.4.
    n_eff : float
        The harmonic mean of the hidden widths, 1/mean(1/n_ℓ), so that r = L/n_eff; the
        O(1/n) vertex accumulates Σ_ℓ 1/n_ℓ = (L−1)/n_eff.  inf for L = 1.
    threshold : float
        :data:`REGIME_THRESHOLD`.
    status : str
        "gaussian" (ε = 0, e.g. L = 1), "perturbative" (ε <= threshold) or "strongly-coupled".
    message : str
        A plain-language account of the above and what to do about it.
    """

    aspect_ratio: float
    expansion_parameter: float
    n_eff: float
    threshold: float
    status: str
    message: str

    def __str__(self):
        return self.message


def _exact_excess_kurtosis(spec: MLPSpec) -> float | None:
    """Π_ℓ(1 + (3A_4/A_2² − 1)/n_ℓ) − 1 for scale-invariant σ with zero biases after layer 1 (§4.4)."""
    slopes = _slopes(spec.activation)
    if slopes is None or spec.depth == 1 or np.any(np.asarray(spec.layer_values("C_b"))[1:] != 0):
        return None
    a, b = slopes
    c = 3 * (a**4 + b**4) / 2 / _slope_A2(slopes) ** 2 - 1
    return float(np.prod([1 + c / n for n in spec.hidden]) - 1)


def _message(spec: MLPSpec, eps: float, r: float, n_eff: float, status: str, n_inputs: int) -> str:
    L = spec.depth
    thr = REGIME_THRESHOLD
    if status == "gaussian":
        return (
            f"Gaussian: ε = 0 (depth L = {L}, aspect ratio r = L/n = {r:.3g}); the output is exactly "
            "Gaussian at any width, so the 1/n corrections vanish."
        )
    head = (
        f"ε = V/(n_(L-1)·K²) = {eps:.3g} (the O(1/n) excess kurtosis of one output; aspect ratio "
        f"r = L/n = {r:.3g}, depth L = {L}, harmonic-mean hidden width {n_eff:.4g})"
    )
    exact = _exact_excess_kurtosis(spec)
    truncation = f"the O(1/n) truncation misses roughly ε/2 ≈ {eps / 2:.0%} of the non-Gaussian deviation"
    if exact is not None and exact > 0:
        truncation += (
            f" (here exactly: the finite-width excess kurtosis is {exact:.3g}, so ε misses {1 - eps / exact:.0%} of it)"
        )
    if status == "perturbative":
        return f"perturbative: {head} <= {thr}; {truncation}, an error of order ε²."
    # ε ∝ 1/n at fixed depth and roughly ∝ L − 1 at fixed width; the slack absorbs rounding of ε
    n_wide = math.ceil(n_eff * eps / thr * (1 - 1e-9))
    L_max = max(1, math.floor(1 + (L - 1) * thr / eps * (1 + 1e-9)))
    exact_ok = exact is not None and n_inputs == 1
    where = (
        "which exists for this network"
        if exact_ok
        else "where it exists: scale-invariant activation, zero biases after layer 1, one input"
    )
    return (
        f"strongly coupled: {head} exceeds {thr}, so the 1/n expansion is not reliable here: {truncation}, "
        f"and higher orders matter. Widen the hidden layers to n >= {n_wide}, reduce the depth to "
        f"L <= {L_max}, or use the exact finite-width distribution ({where}; THEORY.md §4.4)."
    )


def regime(spec: MLPSpec, X=None, *, statistics=None) -> Regime:
    """Diagnose the regime of the 1/n expansion for ``spec`` on inputs X (book §5.4; THEORY.md §4.4).

    Computes ε = max_α V^(L)_{(αα)(αα)}/(n_{L-1}(K^(L)_{αα})²) from the exact O(1/n) recursion
    (:mod:`eft_prob.theory.vertex`).  X of shape (N, input_dim); None means one input with
    |x|²/n_0 = 1.  Needs concrete (not traced) spec and X.

    ``statistics``: the :class:`~eft_prob.theory.vertex.PriorStatistics` of ``spec`` on X, if
    already computed; its K and dense (exact) V then give ε without another pass of the recursion.
    A factored V, a Monte Carlo estimate, is not used: ε is then recomputed exactly.
    """
    if not isinstance(spec, MLPSpec):
        raise ValueError(f"spec must be an eft_prob.MLPSpec, got {type(spec).__name__}.")
    if X is None:
        X = np.ones((1, spec.input_dim))
    if not is_concrete(spec, X):
        raise ValueError(
            "regime(spec, X) needs concrete hyperparameters and inputs, not traced values; call it "
            "outside jit/grad/NUTS."
        )
    if statistics is not None and isinstance(statistics.V, jax.Array):
        N = statistics.K.shape[0]
        if N != np.shape(X)[0] or statistics.width != spec.widths[-2]:
            raise ValueError(
                f"statistics are for {N} inputs and width {statistics.width}, but X has {np.shape(X)[0]} inputs "
                f"and spec has n_(L-1) = {spec.widths[-2]}: pass the PriorStatistics of this spec on this X."
            )
        i = np.arange(N)
        Kd = np.diagonal(np.asarray(statistics.K, np.float64))
        Vd = np.asarray(statistics.V[i, i, i, i], np.float64)
    else:
        with precision_scope(spec, X):
            K, _, Vb = _vertex_compute(spec, X, False, False, False, None)
            Kd = np.diagonal(np.asarray(K, np.float64))
            Vd = np.diagonal(np.asarray(Vb[0, 0], np.float64))
    n_prev = spec.widths[-2]
    pos = Kd > 0
    ratios = np.where(pos, Vd / (n_prev * np.where(pos, Kd, 1.0) ** 2), 0.0)
    eps = max(float(np.max(ratios)), 0.0)
    r = spec.aspect_ratio
    n_eff = 1.0 / float(np.mean([1.0 / n for n in spec.hidden])) if spec.hidden else math.inf
    if eps == 0.0:
        status = "gaussian"
    elif eps <= REGIME_THRESHOLD:
        status = "perturbative"
    else:
        status = "strongly-coupled"
    msg = _message(spec, eps, r, n_eff, status, int(np.shape(X)[0]))
    return Regime(r, eps, n_eff, REGIME_THRESHOLD, status, msg)


def check_regime(spec: MLPSpec, X, what: str, stacklevel: int | None = None, *, statistics=None) -> Regime | None:
    """:func:`regime`, with a :class:`~eft_prob.RegimeWarning` (``what``: the message) when strongly coupled.

    ``what`` names the caller's object, e.g. "NetworkPrior(order=1)".  The warning is attributed to
    the innermost caller outside eft_prob, or, with ``stacklevel``, as :func:`warnings.warn` would
    (2: the caller of check_regime).  ``statistics`` as in :func:`regime`.  Returns the Regime, or
    None when spec or X are traced (inside jit/NUTS nothing is checked).
    """
    if not is_concrete(spec, X) or (statistics is not None and not is_concrete(statistics)):
        return None
    reg = regime(spec, X, statistics=statistics)
    if reg.status == "strongly-coupled":
        if stacklevel is None:
            warn(f"{what}: {reg.message}", RegimeWarning)
        else:
            warnings.warn(f"{what}: {reg.message}", RegimeWarning, stacklevel=stacklevel)
    return reg
