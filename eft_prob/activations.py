"""Activation registry: σ, its universality class and closed-form Gaussian two-point functions.

Each :class:`Activation` knows

* ``fn`` — σ itself (a JAX function, applied elementwise) and ``grad`` — σ',
* ``kinked`` — whether σ has kinks at z = 0 (then quadrature switches to a kink-aware rule,
  see :mod:`eft_prob.gauss`),
* ``slopes`` — (a_+, a_-) for the scale-invariant class σ(z) = a_+ z (z ≥ 0), a_- z (z < 0),
* ``universality`` — "scale-invariant", "K*=0", "half-stable", "none" or "unknown"
  (THEORY.md §4.3; book §5.2–5.3),
* ``critical`` — the critical initialization (C_b, C_W) where it is known in closed form,
* ``pair`` — closed-form Gaussian expectations (⟨σ_1σ_2⟩, ⟨σ'_1σ'_2⟩)_K of a 2×2 kernel, or None.

Closed forms: the arc-cosine family for scale-invariant activations (Cho & Saul 2009; THEORY.md
§4.5), the arcsine kernel for erf (Williams 1997), and exact trigonometric forms for sin.  Every
closed form is tested against quadrature to 1e-10 in ``tests/test_gauss.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ACTIVATIONS", "Activation", "get_activation", "register_activation"]


# --------------------------------------------------------------------------------------------
# Closed forms.  Every function takes the three entries (K11, K22, K12) of a 2×2 kernel,
# elementwise over arrays, and is NaN-free (values *and* gradients) on the whole PSD cone,
# including |ρ| = 1 (identical inputs) and K = 0 (zero input without bias).


def _safe_corr(K11, K22, K12):
    """ρ = K12/√(K11K22) clipped to [-1, 1], and s = √(K11K22); ρ = 0 where s = 0."""
    s2 = K11 * K22
    pos = s2 > 0
    s = jnp.sqrt(jnp.where(pos, s2, 1.0))
    rho = jnp.clip(jnp.where(pos, K12 / s, 0.0), -1.0, 1.0)
    # Snap |ρ| within a few ulps of 1 to ±1: an input paired with itself computes K/√(K·K), which
    # rounding can leave at 1 - 1e-16, i.e. a spurious angle ψ ≈ 1.5e-8 in non-smooth ⟨σ'σ'⟩.
    near = jnp.abs(rho) >= 1.0 - 4 * jnp.finfo(rho.dtype).eps
    rho = jnp.where(near, jnp.sign(rho), rho)
    return rho, jnp.where(pos, s, 0.0)


# arcsin as a rational approximation in plain jnp ops (Cephes asin.c, S. L. Moshier), accurate to
# ~2e-16 relative in float64: XLA:CPU lowers jnp.arcsin/arccos to scalar calls that cost ~7x more,
# and the closed-form kernels evaluate one per input pair and layer.
_ASIN_P = (
    4.253011369004428248960e-3,
    -6.019598008014123785661e-1,
    5.444622390564711410273e0,
    -1.626247967210700244449e1,
    1.956261983317594739197e1,
    -8.198089802484824371615e0,
)
_ASIN_Q = (
    1.0,
    -1.474091372988853791896e1,
    7.049610280856842141659e1,
    -1.471791292232726029859e2,
    1.395105614657485689735e2,
    -4.918853881490881290097e1,
)
_ASIN_R = (
    2.967721961301243206100e-3,
    -5.634242780008963776856e-1,
    6.968710824104713396794e0,
    -2.556901049652824852289e1,
    2.853665548261061424989e1,
)
_ASIN_S = (
    1.0,
    -2.194779531642920639778e1,
    1.470656354026814941758e2,
    -3.838770957603691357202e2,
    3.424398657913078477438e2,
)


def _polevl(x, coeffs):
    r = coeffs[0]
    for c in coeffs[1:]:
        r = r * x + c
    return r


@jax.custom_jvp
def _asin(x):
    """arcsin on [-1, 1]; float32 inputs fall back to jnp.arcsin (the coefficients are float64's)."""
    if jnp.result_type(x) != jnp.float64:
        return jnp.arcsin(x)
    a = jnp.abs(x)
    big = a > 0.625
    zs = a * a
    small = a + a * (zs * _polevl(zs, _ASIN_P) / _polevl(zs, _ASIN_Q))
    zz = jnp.where(big, 1.0 - a, 0.5)
    p = zz * _polevl(zz, _ASIN_R) / _polevl(zz, _ASIN_S)
    t = jnp.sqrt(zz + zz)
    pio4, morebits = 7.85398163397448309616e-1, 6.123233995736765886130e-17
    large = (pio4 - t) - (t * p - morebits) + pio4
    v = jnp.where(big, large, small)
    return jnp.where(x < 0, -v, v)


@_asin.defjvp
def _asin_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return _asin(x), t * jax.lax.rsqrt(jnp.maximum(1.0 - x * x, jnp.finfo(jnp.result_type(x)).tiny))


@jax.custom_jvp
def _arc_cosine_angles(rho):
    """(g(ρ), ψ) = (√(1-ρ²) + ρ arcsin ρ, arccos ρ) from a single arcsin evaluation.

    Derivatives: g' = arcsin ρ (finite on [-1, 1]); ψ' = -1/√(1-ρ²), set to 0 at |ρ| = 1 exactly
    (a double-where: finite, exact values at ±1 instead of ∞·0 = NaN).
    """
    inside = jnp.abs(rho) < 1.0
    r = jnp.where(inside, rho, 0.0)
    a = _asin(r)
    g = jnp.where(inside, jnp.sqrt(1.0 - r * r) + r * a, jnp.abs(rho) * jnp.pi / 2)
    psi = jnp.where(inside, jnp.pi / 2 - a, jnp.where(rho >= 1.0, 0.0, jnp.pi))
    return g, psi


@_arc_cosine_angles.defjvp
def _arc_cosine_angles_jvp(primals, tangents):
    (rho,), (t,) = primals, tangents
    g, psi = _arc_cosine_angles(rho)
    inside = jnp.abs(rho) < 1.0
    r = jnp.where(inside, rho, 0.0)
    dpsi = jnp.where(inside, -jax.lax.rsqrt(1.0 - r * r), 0.0)
    a = jnp.where(inside, jnp.pi / 2 - psi, jnp.sign(rho) * jnp.pi / 2)
    return (g, psi), (a * t, dpsi * t)


def _scale_invariant_pair(a_plus: float, a_minus: float):
    c1 = ((a_plus + a_minus) / 2) ** 2
    c2 = ((a_plus - a_minus) / 2) ** 2
    A2 = (a_plus**2 + a_minus**2) / 2

    def pair(K11, K22, K12):
        rho, s = _safe_corr(K11, K22, K12)
        g, psi = _arc_cosine_angles(rho)
        ss = c1 * K12 + c2 * (2 / jnp.pi) * s * g
        dd = A2 * (jnp.pi - psi) / jnp.pi + a_plus * a_minus * psi / jnp.pi
        return ss, dd

    return pair


def _erf_pair(K11, K22, K12):
    d = jnp.sqrt((1 + 2 * K11) * (1 + 2 * K22))
    ss = (2 / jnp.pi) * _asin(jnp.clip(2 * K12 / d, -1.0, 1.0))
    dd = (4 / jnp.pi) / jnp.sqrt(d * d - 4 * K12 * K12)
    return ss, dd


def _sin_pair(K11, K22, K12):
    e = jnp.exp(-(K11 + K22) / 2)
    return e * jnp.sinh(K12), e * jnp.cosh(K12)


# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Activation:
    """An activation function and what the theory knows about it (see the module docstring)."""

    name: str
    fn: Callable
    grad: Callable | None = None
    kinked: bool = False
    slopes: tuple[float, float] | None = None
    universality: str = "unknown"
    critical: tuple[float, float] | None = None
    pair: Callable | None = None

    def __post_init__(self):
        if not callable(self.fn):
            raise ValueError(f"Activation {self.name!r}: fn must be callable, got {self.fn!r}.")
        if self.grad is None:
            scalar_grad = jax.grad(lambda z: self.fn(z))
            object.__setattr__(
                self, "grad", lambda z: jnp.vectorize(scalar_grad)(jnp.asarray(z, jnp.result_type(float)))
            )

    def __call__(self, z):
        return self.fn(z)

    @property
    def A2(self) -> float:
        """(a_+² + a_-²)/2 for the scale-invariant class (THEORY.md §4.3)."""
        self._need_slopes("A2")
        a, b = self.slopes
        return (a * a + b * b) / 2

    @property
    def A4(self) -> float:
        """(a_+⁴ + a_-⁴)/2 for the scale-invariant class (THEORY.md §4.3)."""
        self._need_slopes("A4")
        a, b = self.slopes
        return (a**4 + b**4) / 2

    def _need_slopes(self, what):
        if self.slopes is None:
            raise ValueError(f"{what} is defined only for scale-invariant activations, not {self.name!r}.")

    def taylor(self) -> tuple[float, float, float, float]:
        """(σ(0), σ'(0), σ''(0), σ'''(0)) by automatic differentiation (float64)."""
        with jax.enable_x64(True):
            f = lambda z: self.fn(z)
            z0 = jnp.float64(0.0)
            d1 = jax.grad(f)
            d2 = jax.grad(d1)
            d3 = jax.grad(d2)
            return tuple(float(g(z0)) for g in (f, d1, d2, d3))

    def __repr__(self):
        return f"Activation({self.name!r}, universality={self.universality!r})"


def _k_star_zero_critical(act_fn) -> tuple[str, tuple[float, float] | None]:
    """Classify a smooth σ with σ(0) = 0: the K* = 0 class needs σ1 ≠ 0 and a_1 < 0 (THEORY.md §4.3)."""
    tmp = Activation("tmp", act_fn)
    s0, s1, s2, s3 = tmp.taylor()
    if abs(s0) > 1e-12 or abs(s1) < 1e-12:
        return "unknown", None
    a1 = s3 / s1 + 0.75 * (s2 / s1) ** 2
    if a1 < 0:
        return "K*=0", (0.0, 1.0 / s1**2)
    return "unknown", None


def _leaky(a: float):
    return lambda z: jnp.where(z >= 0, z, a * z)


def _scale_invariant(name, a_plus, a_minus):
    fn = _leaky(a_minus) if a_plus == 1.0 else (lambda z: jnp.where(z >= 0, a_plus * z, a_minus * z))
    grad = lambda z: jnp.where(jnp.asarray(z) >= 0, a_plus, a_minus) * jnp.ones_like(z)
    A2 = (a_plus**2 + a_minus**2) / 2
    return Activation(
        name,
        fn,
        grad=grad,
        kinked=a_plus != a_minus,
        slopes=(a_plus, a_minus),
        universality="scale-invariant",
        critical=(0.0, 1.0 / A2),
        pair=_scale_invariant_pair(a_plus, a_minus),
    )


def _tanh_grad(z):
    """σ' of the registry's tanh (named, so that eft_prob.gauss.shift_rule can recognize it)."""
    return 1 - jnp.tanh(z) ** 2


def _make_registry() -> dict[str, Activation]:
    gelu = lambda z: jax.nn.gelu(z, approximate=False)
    erf_fn = jax.scipy.special.erf
    reg = {
        "relu": _scale_invariant("relu", 1.0, 0.0),
        "leaky_relu": _scale_invariant("leaky_relu", 1.0, 0.01),
        "linear": _scale_invariant("linear", 1.0, 1.0),
        "tanh": Activation("tanh", jnp.tanh, grad=_tanh_grad, universality="K*=0", critical=(0.0, 1.0)),
        "erf": Activation(
            "erf",
            erf_fn,
            grad=lambda z: (2 / math.sqrt(math.pi)) * jnp.exp(-jnp.square(z)),
            universality="K*=0",
            critical=(0.0, math.pi / 4),
            pair=_erf_pair,
        ),
        "sin": Activation("sin", jnp.sin, grad=jnp.cos, universality="K*=0", critical=(0.0, 1.0), pair=_sin_pair),
        "gelu": Activation("gelu", gelu, universality="half-stable"),
        "swish": Activation("swish", jax.nn.swish, universality="half-stable"),
        "sigmoid": Activation(
            "sigmoid",
            jax.nn.sigmoid,
            grad=lambda z: jax.nn.sigmoid(z) * (1 - jax.nn.sigmoid(z)),
            universality="none",
        ),
        "softplus": Activation("softplus", jax.nn.softplus, grad=jax.nn.sigmoid, universality="none"),
    }
    return reg


ACTIVATIONS: dict[str, Activation] = _make_registry()


def leaky_relu(negative_slope: float) -> Activation:
    """A leaky ReLU with the given slope a_- for z < 0 (closed forms included)."""
    a = float(negative_slope)
    if not np.isfinite(a):
        raise ValueError(f"negative_slope must be finite, got {negative_slope!r}.")
    return _scale_invariant(f"leaky_relu({a:g})", 1.0, a)


def register_activation(act: Activation) -> None:
    """Add an activation to the registry under ``act.name``."""
    if not isinstance(act, Activation):
        raise TypeError(f"register_activation expects an Activation, got {type(act).__name__}.")
    ACTIVATIONS[act.name] = act


def get_activation(activation) -> Activation:
    """Resolve a name, an :class:`Activation` or a user callable into an :class:`Activation`.

    A user callable must be a JAX-traceable elementwise function; it is treated as smooth
    (Gauss–Hermite quadrature) unless wrapped in an ``Activation(..., kinked=True)``.  Its
    universality class is detected from its Taylor coefficients at 0 when it is in the K* = 0 class.
    """
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        key = activation.lower()
        if key not in ACTIVATIONS:
            known = ", ".join(sorted(ACTIVATIONS))
            raise ValueError(
                f"activation={activation!r} is not known. Use one of: {known}; "
                "or pass a JAX-traceable callable or an eft_prob.activations.Activation."
            )
        return ACTIVATIONS[key]
    if callable(activation):
        name = getattr(activation, "__name__", "custom")
        try:
            out = jnp.asarray(activation(jnp.linspace(-1.0, 1.0, 3)))
        except Exception as exc:  # a user function that cannot take an array
            raise ValueError(
                f"activation={name!r}: the callable must map a JAX array to an array of the same "
                f"shape elementwise ({type(exc).__name__}: {exc})."
            ) from None
        if out.shape != (3,):
            raise ValueError(
                f"activation={name!r}: the callable must act elementwise (input shape (3,) gave {out.shape})."
            )
        universality, critical = _k_star_zero_critical(activation)
        return Activation(name, activation, universality=universality, critical=critical)
    raise ValueError(f"activation must be a name, a callable or an Activation, got {type(activation).__name__}.")
