"""Precision policy and the library's warning classes.

eft_prob never changes JAX's global ``jax_enable_x64`` flag behind a user's back.  Theory code needs
float64 (kernels of deep networks span many decades, and 1/n corrections are small differences), so:

* If x64 is enabled globally (``eft_prob.enable_x64()``, ``numpyro.enable_x64()`` or
  ``JAX_ENABLE_X64=1``), everything runs in float64.
* If it is not, and a theory function is called eagerly (its inputs are concrete arrays), the
  computation runs inside a local ``jax.enable_x64(True)`` scope and returns float64 arrays; the
  global flag is untouched afterwards.
* If it is not, and the inputs are tracers (inside a user's ``jit``/NUTS with x64 off), float64 is
  impossible without changing the user's setting; the computation runs in float32 and a
  :class:`PrecisionWarning` says how to switch x64 on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

import jax

__all__ = [
    "ApproximationWarning",
    "PrecisionWarning",
    "RegimeWarning",
    "RegularizationWarning",
    "StabilityWarning",
    "enable_x64",
    "float64_theory",
]


class PrecisionWarning(UserWarning):
    """Theory quantities had to be computed in float32 (x64 disabled inside a trace)."""


class RegularizationWarning(UserWarning):
    """A kernel was not numerically positive semi-definite and had to be regularized."""


class StabilityWarning(UserWarning):
    """A learning rate at or above the gradient-descent stability bound 2/λ_max(Θ̃)."""


class RegimeWarning(UserWarning):
    """The aspect ratio r = L/n is outside the regime where the requested order is valid."""


class ApproximationWarning(UserWarning):
    """A result is a cheaper approximation than asked for (moment matching) or carries a large Monte Carlo error."""


class CostWarning(UserWarning):
    """A computation whose time and memory grow steeply with its size was asked for at a large size."""


class MemoryLimitError(ValueError):
    """A computation would need more memory than its limit; raised before any work is done."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: frameworks whose frames sit between a user's line and eft_prob (NumPyro's Distribution metaclass and
#: effect handlers, JAX's jit/vmap tracing); a warning skips them as it skips eft_prob's own frames
_PASS_THROUGH = ("jax", "jaxlib", "numpyro")


def _outside_stacklevel() -> int:
    """The ``stacklevel`` of the innermost frame outside eft_prob, counted from this function's caller.

    Every call path (a direct call, a distribution built inside a NumPyro model, a theory function
    reached through the runner) puts a different number of eft_prob frames between the user's line
    and the line that warns, so a fixed stacklevel is right for one of them at most.  Frames of the
    package (and of JAX and NumPyro, which call into it on the user's behalf) are skipped instead;
    if no frame is left (``python -m eft_prob``), the outermost one is named.
    """
    skip = [_PACKAGE_DIR]
    for name in _PASS_THROUGH:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__file__", None):
            skip.append(os.path.dirname(os.path.abspath(mod.__file__)) + os.sep)
    skip = tuple(skip)
    frame, level = sys._getframe(2), 2  # level 1 would be warn() itself, 2 its caller
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def warn(message: str, category: type[Warning]) -> None:
    """:func:`warnings.warn` attributed to the user's line: the innermost caller outside eft_prob."""
    warnings.warn(message, category, stacklevel=_outside_stacklevel())


def enable_x64(use_x64: bool = True) -> None:
    """Switch JAX's global float64 mode (the same as ``numpyro.enable_x64``).

    Call it once at the top of a program, before any array is created.
    """
    jax.config.update("jax_enable_x64", bool(use_x64))


def x64_enabled() -> bool:
    return bool(jax.config.jax_enable_x64)


def _has_tracer(*trees) -> bool:
    leaves = jax.tree_util.tree_leaves(trees)
    return any(isinstance(x, jax.core.Tracer) for x in leaves)


def precision_scope(*inputs):
    """Context manager for a theory computation on ``inputs`` (see the module docstring)."""
    if x64_enabled():
        return contextlib.nullcontext()
    if _has_tracer(*inputs):
        warn(
            "eft_prob theory is being traced with jax_enable_x64 disabled, so it runs in float32. "
            "Call eft_prob.enable_x64() (or numpyro.enable_x64()) at the start of your program.",
            PrecisionWarning,
        )
        return contextlib.nullcontext()
    return jax.enable_x64(True)


def is_concrete(*trees) -> bool:
    """True when no leaf is a tracer, i.e. values may be inspected in Python."""
    return not _has_tracer(*trees)


def float64_theory(fn):
    """Decorator: run ``fn`` under :func:`precision_scope` of all its arguments."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with precision_scope(*args, *kwargs.values()):
            return fn(*args, **kwargs)

    return wrapper
