"""eft_prob.mc_kernels: structural empirical kernels and their streamed Monte Carlo moments."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import eft_prob as ep
from eft_prob import mc_kernels as mk
from eft_prob.theory.ntk_stats import ntk_statistics

from .conftest import assert_consistent

X3 = np.array([[1.0, 0.3], [-0.4, 0.9], [0.2, -1.1]])


@jax.jit
def _jacfwd_ntk(spec, params, X):
    """(1/n_L) Σ_i Ĥ_ii from the explicit (N·n_L, P) Jacobian (forward mode) and the λ-vector."""
    flat, unravel = ravel_pytree(params)
    lam, _ = ravel_pytree(
        tuple({"W": jnp.full(p["W"].shape, r["W"]), "b": jnp.full(p["b"].shape, r["b"])}
              for p, r in zip(params, ep.nn.learning_rates(spec)))
    )  # fmt: skip
    J = jax.jacfwd(lambda th: ep.nn.apply(spec, unravel(th), X))(flat)  # (N, n_L, P)
    return jnp.einsum("aip,p,bip->ab", J, lam, J) / spec.output_dim


@pytest.mark.parametrize(
    "spec",
    [
        ep.MLPSpec(2, (5, 4, 6), 3, "tanh", C_b=0.3, C_W=1.7, lambda_b=(0.5, 1.2, 0.7, 2.0),
                   lambda_W=(1.1, 0.9, 2.0, 0.4)),
        ep.MLPSpec(2, (7,), 2, "relu", C_b=0.1, C_W=2.0, lambda_b=0.3, lambda_W=1.6),
        ep.MLPSpec(2, (), 2, "erf", C_b=0.2, C_W=1.1, lambda_b=0.5, lambda_W=1.5),
    ],
    ids=["tanh-L4-nL3", "relu-L2", "L1"],
)  # fmt: skip
def test_empirical_kernels_equal_jacobian_contraction(spec):
    X = np.array([[1.0, 0.3], [-0.4, 0.9], [0.2, -1.1], [0.5, 0.5], [-1.2, -0.1]])
    params = ep.nn.init(spec, jax.random.key(4))
    G, H = mk.empirical_kernels(spec, params, X)
    ref = _jacfwd_ntk(spec, params, jnp.asarray(X))
    np.testing.assert_allclose(H, ref, rtol=1e-12, atol=1e-12)
    jacrev = jax.jit(ep.nn.empirical_ntk)(spec, params, jnp.asarray(X))
    np.testing.assert_allclose(H, jnp.trace(jacrev) / spec.output_dim, rtol=1e-12, atol=1e-12)
    h = ep.nn.preactivations(spec, params, jnp.asarray(X))
    last = spec.activation.fn(h[-2]) if spec.depth > 1 else jnp.asarray(X)
    np.testing.assert_allclose(G, spec.C_b + spec.C_W * last @ last.T / last.shape[1], rtol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_streamed_moments_equal_stacked_kernels(batch_size):
    """Welford/Chan accumulation = np.mean/np.var(ddof=1) over the explicit stack (M = 7 pads)."""
    spec = ep.MLPSpec(2, (6, 5), 2, "tanh", C_b=0.2, C_W=1.4)
    key = jax.random.key(11)
    m = mk.kernel_moments(spec, X3, 7, key, batch_size=batch_size)
    Gs, Hs = zip(*(mk.empirical_kernels(spec, ep.nn.init(spec, k), X3) for k in jax.random.split(key, 7)))
    for got, stack in ((m.nngp_mean, Gs), (m.ntk_mean, Hs)):
        np.testing.assert_allclose(got, np.mean(stack, axis=0), rtol=1e-13)
    for got, stack in ((m.nngp_var, Gs), (m.ntk_var, Hs)):
        np.testing.assert_allclose(got, np.var(stack, axis=0, ddof=1), rtol=1e-11)
    # the same networks as ensemble.prior_kernels
    np.testing.assert_allclose(m.nngp_mean, np.mean(ep.ensemble.prior_kernels(spec, X3, 7, key), axis=0), rtol=1e-13)
    assert m.n_networks == 7 and m.ntk_var.dtype == np.float64
    np.testing.assert_allclose(m.ntk_sem, np.sqrt(np.var(Hs, axis=0, ddof=1) / 7), rtol=1e-11)


def test_float32_networks_float64_moments():
    spec = ep.MLPSpec(2, (32, 32), 1, "tanh", C_b=0.2, C_W=1.4)
    m = mk.kernel_moments(spec, X3, 64, jax.random.key(0), dtype="float32")
    assert m.ntk_mean.dtype == np.float64
    z = (m.ntk_mean - ep.theory.ntk(spec, X3)) / m.ntk_sem  # width 32: 1/n bias ~ 0.1 s.e. here
    assert np.all(np.abs(z) < 5), z


@pytest.mark.slow
def test_moments_match_order_one_theory():
    """Means vs K + K^{1}/n and Θ + H^{1}/n within 4 standard errors; variances vs V/n and
    (A + B + B)/n (THEORY.md §6.3, one output) within 4 standard errors of a variance plus the
    O(1/n²) remainder (allowed as (L/n)·prediction).  tanh, L = 3, n = 128, 1000 networks."""
    n, M = 128, 1000
    spec = ep.MLPSpec(2, (n, n), 1, "tanh", C_b=0.2, C_W=1.5, lambda_b=0.7, lambda_W=1.3)
    m = mk.kernel_moments(spec, X3, M, jax.random.key(3))
    st = ntk_statistics(spec, X3, derivatives=False)
    assert_consistent(m.nngp_mean, m.nngp_sem, st.K + st.K1 / n, what="E Ĝ")
    assert_consistent(m.ntk_mean, m.ntk_sem, st.Theta + st.H1 / n, what="E Θ̂")
    var_G = np.einsum("abab->ab", st.V) / n
    B = np.asarray(st.B)
    var_T = (np.einsum("abab->ab", st.A) + np.einsum("aabb->ab", B) + np.einsum("abba->ab", B)) / n
    for est, pred, what in ((m.nngp_var, var_G, "Var Ĝ"), (m.ntk_var, var_T, "Var Θ̂")):
        tol = 4 * pred * np.sqrt(2 / (M - 1)) + spec.depth / n * pred
        assert np.all(np.abs(est - pred) <= tol), (what, est / pred)
    # and the infinite-width limit is off by the 1/n terms only
    np.testing.assert_allclose(m.ntk_mean, ep.theory.ntk(spec, X3), rtol=0.05)


_SHARDED = r"""
import sys, numpy as np, jax
import eft_prob as ep
from eft_prob import mc_kernels as mk
assert jax.device_count() == 8 and not jax.config.jax_enable_x64
spec = ep.MLPSpec(2, (6, 5), 2, "tanh", C_b=0.2, C_W=1.4)
X = np.array([[1.0, 0.3], [-0.4, 0.9], [0.2, -1.1]])
m8 = mk.kernel_moments(spec, X, 21, jax.random.key(5))
m1 = mk.kernel_moments(spec, X, 21, jax.random.key(5), devices=jax.devices()[:1])
assert not jax.config.jax_enable_x64
np.savez(sys.argv[1], **{f"{t}_{f}": getattr(m, f) for t, m in (("m8", m8), ("m1", m1))
                        for f in ("nngp_mean", "nngp_var", "ntk_mean", "ntk_var")})
"""


def test_sharded_over_eight_devices(tmp_path):
    """21 networks over 8 simulated devices (3 padded) = one device = this process, x64 off there."""
    out = tmp_path / "m.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env.pop("JAX_ENABLE_X64", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", _SHARDED, str(out)], env=env, cwd=root, check=True, timeout=300)
    z = np.load(out)
    ref = mk.kernel_moments(ep.MLPSpec(2, (6, 5), 2, "tanh", C_b=0.2, C_W=1.4), X3, 21, jax.random.key(5))
    for f in ("nngp_mean", "nngp_var", "ntk_mean", "ntk_var"):
        assert z[f"m8_{f}"].dtype == np.float64
        np.testing.assert_allclose(z[f"m8_{f}"], getattr(ref, f), rtol=1e-12, err_msg=f)
        np.testing.assert_allclose(z[f"m1_{f}"], getattr(ref, f), rtol=1e-12, err_msg=f)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_networks": 1}, "n_networks must be at least 2"),
        ({"n_networks": 2.5}, "n_networks must be a positive integer"),
        ({"dtype": "float16"}, "dtype must be float64"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"devices": []}, "devices must be a non-empty sequence"),
        ({"key": 3}, "key must be a single JAX PRNG key"),
        ({"X": np.ones((3, 4))}, r"X must have shape \(N, input_dim\)"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"spec": ep.MLPSpec(2, (4,), 1, "tanh"), "X": X3, "n_networks": 4, "key": jax.random.key(0)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mk.kernel_moments(**args)
