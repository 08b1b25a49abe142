"""Deterministic checks of the NNGP / NTK recursions: oracles, exact limits, stability, autodiff."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eft_prob as ep
from eft_prob._validate import check_psd

X_O1 = np.array([[1, 0.5, 0, 0.2], [0, 1, -0.5, 0.2], [-1, 0.3, 1.2, 0.2]])


def test_relu_kernel_oracle_O1():
    spec = ep.MLPSpec(4, (8, 8, 8), 1, "relu", C_b=0.1, C_W=2.0)
    K = ep.theory.nngp(spec, X_O1)
    expected = [[1.04500, 0.84159, 0.84469], [0.84159, 1.04500, 0.89471], [0.84469, 0.89471, 1.68500]]
    np.testing.assert_allclose(K, expected, atol=6e-6)
    assert K.dtype == jnp.float64


def test_relu_ntk_oracle_O9():
    spec = ep.MLPSpec(2, (8, 8), 1, "relu", C_b=0.0, C_W=2.0, lambda_b=0.0, lambda_W=1.0)
    X = np.array([[1, 0], [0.6, 0.8], [0.8, -0.6]])
    k = ep.theory.kernels(spec, X)
    np.testing.assert_allclose(
        k.nngp[-1], [[1, 0.733434, 0.848884], [0.733434, 1, 0.493731], [0.848884, 0.493731, 1]], atol=1e-6
    )
    np.testing.assert_allclose(
        k.ntk[-1], [[1.5, 0.772208, 1.017076], [0.772208, 1.5, 0.342854], [1.017076, 0.342854, 1.5]], atol=1e-6
    )


def test_relu_criticality_closed_forms():
    # C_b = 0, C_W = 2: K^(ℓ) = K^(1) on the diagonal, Θ^(ℓ) = ℓ (λ_b + λ_W K/2) (THEORY.md §7.1, O14)
    X = np.array([[1.0, 2.0, -1.0], [0.3, -0.2, 0.5]])
    spec = ep.MLPSpec(3, (16,) * 6, 1, "relu", C_b=0.0, C_W=2.0, lambda_b=0.5, lambda_W=1.0)
    k = ep.theory.kernels(spec, X)
    K1 = np.sum(X**2, 1) * 2 / 3
    for ell in range(7):
        np.testing.assert_allclose(np.diag(k.nngp[ell]), K1, rtol=1e-13)
        np.testing.assert_allclose(np.diag(k.ntk[ell]), (ell + 1) * (0.5 + K1 / 2), rtol=1e-13)
    # O7: x = (1, 2, -1) → K = 4, θ = 2.5, Θ^(4) = 10
    spec4 = ep.MLPSpec(3, (32,) * 3, 1, "relu", C_b=0.0, C_W=2.0, lambda_b=0.5, lambda_W=1.0)
    assert float(ep.theory.ntk(spec4, X[:1])[0, 0]) == pytest.approx(10.0, rel=1e-13)


def test_deep_linear_network_exact():
    # σ = z: K^(ℓ) = C_W^ℓ G0 (C_b = 0), and Θ^(ℓ) = Σ_k λ_W C_W^(ℓ-1) G0 + λ_b Σ_k C_W^(ℓ-k)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4, 3))
    G0 = X @ X.T / 3
    C_W, lb, lW, L = 1.3, 0.2, 0.7, 5
    spec = ep.MLPSpec(3, (10,) * (L - 1), 1, "linear", C_b=0.0, C_W=C_W, lambda_b=lb, lambda_W=lW)
    k = ep.theory.kernels(spec, X)
    np.testing.assert_allclose(k.nngp[-1], C_W**L * G0, rtol=1e-12)
    theta = sum(lb * C_W ** (L - ell) + lW * C_W ** (L - 1) * G0 for ell in range(1, L + 1))
    np.testing.assert_allclose(k.ntk[-1], theta, rtol=1e-12)


@pytest.mark.parametrize("name", ["relu", "erf", "sin", "leaky_relu"])
def test_quadrature_path_equals_closed_form_kernels(name):
    X = np.random.default_rng(1).normal(size=(4, 2))
    spec = ep.MLPSpec(2, (8,) * 4, 1, name, C_b=0.1, C_W=1.4, lambda_b=0.3)
    a = ep.theory.kernels(spec, X)
    b = ep.theory.kernels(spec, X, quadrature=True, orders={"smooth2": 96})
    np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-10, atol=1e-12)


def test_shapes_all_layers_and_jit():
    X = np.random.default_rng(2).normal(size=(5, 3))
    spec = ep.MLPSpec(3, (8, 8), 2, "tanh")
    assert ep.theory.nngp(spec, X).shape == (5, 5)
    assert ep.theory.ntk(spec, X, all_layers=True).shape == (3, 5, 5)
    f = jax.jit(lambda s, x: ep.theory.kernels(s, x))
    k = f(spec, X)
    np.testing.assert_allclose(k.nngp[-1], ep.theory.nngp(spec, X), rtol=1e-14)
    assert ep.theory.kernels(ep.MLPSpec(3, (), 1), X).nngp.shape == (1, 5, 5)


@pytest.mark.parametrize("name", ["tanh", "relu", "erf", "gelu"])
def test_gradients_wrt_hyperparameters_match_finite_differences(name):
    X = np.random.default_rng(3).normal(size=(3, 2))
    spec = ep.MLPSpec(2, (8, 8, 8), 1, name, C_b=0.1, C_W=1.2)

    def loss(cb, cw):
        k = ep.theory.kernels(spec.replace(C_b=cb, C_W=cw), X)
        return jnp.sum(k.nngp[-1] ** 2) + jnp.sum(k.ntk[-1])

    g = jax.grad(loss, argnums=(0, 1))(0.1, 1.2)
    h = 1e-6
    fd_b = (loss(0.1 + h, 1.2) - loss(0.1 - h, 1.2)) / (2 * h)
    fd_w = (loss(0.1, 1.2 + h) - loss(0.1, 1.2 - h)) / (2 * h)
    assert float(g[0]) == pytest.approx(float(fd_b), rel=1e-5)
    assert float(g[1]) == pytest.approx(float(fd_w), rel=1e-5)


@pytest.mark.parametrize("name", sorted(ep.activations.ACTIVATIONS))
@pytest.mark.parametrize("C_W", [0.1, 1.0, 10.0])
def test_depth_100_is_finite_and_psd(name, C_W):
    X = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, -0.6], [-0.2, 0.1]])
    spec = ep.MLPSpec(2, (64,) * 99, 1, name, C_b=0.1, C_W=C_W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ep.RegularizationWarning)  # clipping is allowed, NaN is not
        k = ep.theory.kernels(spec, X, orders={"smooth2": 32})
    for M in (k.nngp[-1], k.ntk[-1]):
        M = np.asarray(M)
        assert np.all(np.isfinite(M))
        w = np.linalg.eigvalsh(M)
        assert w[0] >= -1e-12 * max(abs(w[-1]), 1e-300)
    assert np.all(np.isfinite(np.asarray(k.nngp)))


def test_regularization_warns_with_amount_and_nan_raises():
    rng = np.random.default_rng(4)
    U = np.linalg.qr(rng.normal(size=(4, 4)))[0]
    K = (U * np.array([-1e-9, 0.5, 1.0, 2.0])) @ U.T
    with pytest.warns(ep.RegularizationWarning, match=r"-1e-09"):
        K_fixed = check_psd(jnp.asarray(K), "test kernel")
    assert np.linalg.eigvalsh(np.asarray(K_fixed))[0] >= -1e-15
    with pytest.raises(FloatingPointError, match="overflowed"):
        check_psd(jnp.full((2, 2), jnp.nan), "test kernel")


def test_bad_inputs_raise_clear_errors():
    spec = ep.MLPSpec(3, (8,), 1, "relu")
    with pytest.raises(ValueError, match=r"X must have shape \(N, input_dim\)"):
        ep.theory.nngp(spec, np.ones((4, 2)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        ep.theory.nngp(spec, np.array([[1.0, np.nan, 0.0]]))
    # a 1-D X is accepted only when input_dim == 1
    assert ep.theory.nngp(ep.MLPSpec(1, (8,), 1), np.array([0.5, 1.0])).shape == (2, 2)


def test_float64_without_global_x64(monkeypatch):
    """Eager theory calls return float64 even when the user's global x64 flag is off."""
    X = np.array([[1.0, 0.2], [0.3, -0.4]])
    spec = ep.MLPSpec(2, (8,), 1, "tanh")
    with jax.enable_x64(False):
        K = ep.theory.nngp(spec, X)
        assert K.dtype == np.float64
        assert not jax.config.jax_enable_x64
