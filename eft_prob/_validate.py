"""Input checks shared by the public API: clear errors that name the argument and the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._config import RegularizationWarning, is_concrete, warn

_ROUNDOFF = 100 * float(np.finfo(np.float64).eps)

__all__ = ["check_inputs", "check_order", "check_positive", "check_psd", "check_targets"]


def check_inputs(spec, X, name: str = "X") -> jax.Array:
    """X as a float array of shape (N, spec.input_dim); finite when concrete."""
    if X is None:
        raise ValueError(f"{name} is required: an array of shape (N, {spec.input_dim}).")
    X = jnp.asarray(X, dtype=jnp.result_type(float))
    if X.ndim == 1 and spec.input_dim == 1:
        X = X[:, None]
    if X.ndim != 2 or X.shape[1] != spec.input_dim:
        raise ValueError(
            f"{name} must have shape (N, input_dim) = (N, {spec.input_dim}), got {tuple(X.shape)}. "
            f"Reshape it, e.g. {name}.reshape(-1, {spec.input_dim})."
        )
    if X.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one input, got shape {tuple(X.shape)}.")
    # numpy, not jnp: inside a user's jit even operations on concrete arrays are staged (tracers)
    if is_concrete(X) and not np.all(np.isfinite(np.asarray(X))):
        bad = int(np.sum(~np.isfinite(np.asarray(X))))
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s); clean or drop those inputs.")
    return X


def check_targets(spec, y, n: int, name: str = "y") -> jax.Array:
    """y as a float array of shape (n, spec.output_dim); finite when concrete."""
    y = jnp.asarray(y, dtype=jnp.result_type(float))
    if y.ndim == 1 and spec.output_dim == 1:
        y = y[:, None]
    if y.shape != (n, spec.output_dim):
        raise ValueError(
            f"{name} must have shape (N_train, output_dim) = ({n}, {spec.output_dim}), got {tuple(y.shape)}."
        )
    if is_concrete(y) and not np.all(np.isfinite(np.asarray(y))):
        raise ValueError(f"{name} contains NaN or infinite values; clean or drop those targets.")
    return y


def check_positive(name: str, value, *, strict: bool = True):
    """A positive scalar (checked when concrete)."""
    if is_concrete(value):
        v = np.asarray(value, dtype=float)
        if v.shape != () or not np.isfinite(v) or (v <= 0 if strict else v < 0):
            rel = "> 0" if strict else ">= 0"
            raise ValueError(f"{name} must be a finite scalar {rel}, got {value!r}.")
    return value


def check_order(order) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order not in (0, 1):
        raise ValueError(
            f"order must be 0 (infinite width, Gaussian) or 1 (with 1/n corrections), got {order!r}"
            + (' (order="exact" exists for NetworkPrior only).' if order == "exact" else ".")
        )
    return int(order)


def check_psd(K, what: str, rtol: float | None = None) -> jax.Array:
    """Symmetrize K; when concrete, verify it is positive semi-definite.

    A kernel is PSD mathematically; rounding (deep networks, duplicated inputs) can leave
    eigenvalues slightly below zero.  Those are clipped to zero: silently when they are at the
    rounding level (|λ_min| <= 100·N·eps·λ_max, a singular kernel), otherwise with a
    :class:`RegularizationWarning` that says how much was changed.  NaN/inf raise.  ``rtol``
    replaces the rounding level for matrices computed less accurately than to rounding (e.g. by
    quadrature): eigenvalues down to −rtol·λ_max are then clipped silently.
    """
    K = (K + jnp.swapaxes(K, -1, -2)) / 2
    if not is_concrete(K):
        return K
    if not bool(jnp.all(jnp.isfinite(K))):
        raise FloatingPointError(
            f"{what} has NaN or infinite entries: the recursion overflowed. Lower C_W, the depth, or the input scale."
        )
    if K.ndim != 2:
        return K
    chol = jnp.linalg.cholesky(K)
    if bool(jnp.all(jnp.isfinite(chol))):
        return K
    w, U = jnp.linalg.eigh(K)
    scale = float(jnp.max(jnp.abs(w)))
    low = float(jnp.min(w))
    if low >= 0:
        return K
    K_fixed = (U * jnp.clip(w, 0.0, None)) @ U.T
    K_fixed = (K_fixed + K_fixed.T) / 2
    if abs(low) <= (_ROUNDOFF * K.shape[-1] if rtol is None else rtol) * scale:
        return K_fixed  # rounding of a singular PSD kernel (e.g. N > rank): not a regularization
    warn(
        f"{what} was not numerically positive semi-definite: eigenvalues down to {low:.3g} "
        f"(relative {abs(low) / max(scale, 1e-300):.2g} of the largest) were clipped to 0. "
        "This happens with duplicated or nearly collinear inputs and very deep networks.",
        RegularizationWarning,
    )
    return K_fixed
