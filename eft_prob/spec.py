"""`MLPSpec`: one description of an MLP that feeds the network, its prior and its theory.

Conventions (THEORY.md §1, book eqs. 4.2–4.4): layers ℓ = 1..L, widths n_0 = input_dim,
n_1..n_{L-1} = hidden, n_L = output_dim;

    z^(1) = b^(1) + W^(1) x,    z^(ℓ+1) = b^(ℓ+1) + W^(ℓ+1) σ(z^(ℓ)),
    b^(ℓ) ~ N(0, C_b^(ℓ)),      W^(ℓ)_ij ~ N(0, C_W^(ℓ)/n_{ℓ-1}),

and gradient descent uses the learning-rate tensor λ_b^(ℓ) for biases and λ_W^(ℓ)/n_{ℓ-1} for
weights (the NTK scalings).  Every hyperparameter is a scalar (the same for all L layers) or a
sequence of L per-layer values.

An ``MLPSpec`` is a JAX pytree whose leaves are the four hyperparameters, so ``C_W`` or ``C_b`` can
be traced (sampled by NUTS, differentiated) while the architecture stays static.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._config import is_concrete
from .activations import Activation, get_activation

__all__ = ["MLPSpec"]

_HYPER = ("C_b", "C_W", "lambda_b", "lambda_W")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"MLPSpec: {name} must be a positive integer (>= 1), got {value!r}.")
    return int(value)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class MLPSpec:
    """A fully connected network and its initialization / learning-rate hyperparameters.

    Parameters
    ----------
    input_dim : int
        n_0, the dimension of one input x.
    hidden : sequence of int
        Hidden widths (n_1, ..., n_{L-1}); ``()`` gives a linear model with L = 1.
    output_dim : int
        n_L, the number of output neurons.
    activation : str, callable or Activation
        One of ``eft_prob.activations.ACTIVATIONS`` or any JAX-traceable elementwise function.
    C_b, C_W : float or sequence of L floats
        Bias variance (>= 0) and weight variance (> 0, divided by the fan-in).
    lambda_b, lambda_W : float or sequence of L floats
        NTK learning-rate scalings (>= 0; λ_W is divided by the fan-in).

    Examples
    --------
    >>> spec = MLPSpec(input_dim=2, hidden=(64, 64), output_dim=1, activation="tanh", C_W=1.0)
    >>> spec.depth, spec.aspect_ratio
    (3, 0.046875)
    """

    input_dim: int
    hidden: tuple[int, ...]
    output_dim: int = 1
    activation: str | Activation | object = "relu"
    C_b: float | Sequence[float] = 0.0
    C_W: float | Sequence[float] = 1.0
    lambda_b: float | Sequence[float] = 1.0
    lambda_W: float | Sequence[float] = 1.0

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("input_dim", _positive_int("input_dim", self.input_dim))
        set_("output_dim", _positive_int("output_dim", self.output_dim))
        hidden = self.hidden
        if isinstance(hidden, (int, np.integer)) and not isinstance(hidden, bool):
            hidden = (hidden,)
        try:
            hidden = tuple(hidden)
        except TypeError:
            raise ValueError(
                f"MLPSpec: hidden must be a sequence of positive integers (hidden widths), got {self.hidden!r}."
            ) from None
        for k, w in enumerate(hidden):
            _positive_int(f"hidden[{k}] (width of layer {k + 1})", w)
        set_("hidden", tuple(int(w) for w in hidden))
        set_("activation", get_activation(self.activation))
        L = self.depth
        for name in _HYPER:
            set_(name, self._check_hyper(name, getattr(self, name), L))

    @staticmethod
    def _check_hyper(name, value, L):
        if not is_concrete(value):
            return value  # traced (NUTS, grad): checked by the caller's priors, not here
        arr = np.asarray(value, dtype=float) if not isinstance(value, jax.Array) else np.asarray(value)
        if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != L):
            raise ValueError(
                f"MLPSpec: {name} must be a scalar or a sequence of L={L} per-layer values, got shape {arr.shape}."
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"MLPSpec: {name} must be finite, got {value!r}.")
        if name == "C_W" and np.any(arr <= 0):
            raise ValueError(f"MLPSpec: C_W must be > 0 (weight variance times fan-in), got {value!r}.")
        if np.any(arr < 0):
            raise ValueError(f"MLPSpec: {name} must be >= 0, got {value!r}.")
        if arr.ndim == 0:
            return float(arr)
        return tuple(float(v) for v in arr)

    # -- pytree -----------------------------------------------------------------------------
    def tree_flatten(self):
        children = tuple(getattr(self, k) for k in _HYPER)
        aux = (self.input_dim, self.hidden, self.output_dim, self.activation)
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)  # no validation: JAX passes placeholders through here
        for k, v in zip(("input_dim", "hidden", "output_dim", "activation"), aux):
            object.__setattr__(obj, k, v)
        for k, v in zip(_HYPER, children):
            object.__setattr__(obj, k, v)
        return obj

    # -- derived ----------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """L, the number of weight layers (hidden layers + 1)."""
        return len(self.hidden) + 1

    @property
    def widths(self) -> tuple[int, ...]:
        """(n_0, n_1, ..., n_L)."""
        return (self.input_dim, *self.hidden, self.output_dim)

    @property
    def aspect_ratio(self) -> float:
        """r = L/n, with 1/n the mean inverse hidden width (L/n exactly for equal widths; 0 for L = 1).

        This is the expansion parameter of the 1/n theory: r → 0 is the Gaussian limit,
        0 < r ≪ 1 the regime the 1/n corrections describe, r ≳ 1 strong coupling.
        """
        if not self.hidden:
            return 0.0
        return self.depth * float(np.mean([1.0 / n for n in self.hidden]))

    def layer_values(self, name: str, dtype=None) -> jax.Array:
        """The hyperparameter ``name`` as an array of its L per-layer values (layer 1 first)."""
        if name not in _HYPER:
            raise ValueError(f"name must be one of {_HYPER}, got {name!r}.")
        v = jnp.asarray(getattr(self, name), dtype=dtype or jnp.result_type(float))
        return jnp.broadcast_to(v, (self.depth,))

    def replace(self, **changes) -> MLPSpec:
        """A copy with some fields changed (``spec.replace(C_W=c)`` works with a traced ``c``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def at_criticality(cls, input_dim, hidden, output_dim=1, activation="relu", **kwargs) -> MLPSpec:
        """The spec with (C_b, C_W) at the activation's critical point (THEORY.md §4.3)."""
        act = get_activation(activation)
        if act.critical is None:
            raise ValueError(
                f"activation {act.name!r} ({act.universality} class) has no closed-form critical point; "
                "pass C_b and C_W explicitly."
            )
        C_b, C_W = act.critical
        return cls(input_dim, hidden, output_dim, act, C_b=C_b, C_W=C_W, **kwargs)

    def __repr__(self):
        hyper = ", ".join(f"{k}={getattr(self, k)!r}" for k in _HYPER)
        return (
            f"MLPSpec(input_dim={self.input_dim}, hidden={self.hidden}, output_dim={self.output_dim}, "
            f"activation={self.activation.name!r}, {hyper})"
        )

    def describe(self) -> str:
        """A one-paragraph human-readable summary (used by the CLI)."""
        r = self.aspect_ratio
        regime = "Gaussian limit" if r == 0 else ("1/n regime" if r < 0.3 else "outside the 1/n regime")
        return (
            f"MLP {' -> '.join(map(str, self.widths))} ({self.activation.name}, "
            f"{self.activation.universality} class), depth L={self.depth}, "
            f"aspect ratio r=L/n={r:.4g} ({regime})"
        )
