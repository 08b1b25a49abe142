"""The network's parameterization is exactly the theory's (THEORY.md §1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eft_prob as ep


def test_parameter_shapes_and_variances():
    spec = ep.MLPSpec(5, (200, 100), 3, "tanh", C_b=0.3, C_W=(1.0, 2.0, 1.5))
    p = ep.nn.init(spec, jax.random.key(0))
    assert [q["W"].shape for q in p] == [(200, 5), (100, 200), (3, 100)]
    assert [q["b"].shape for q in p] == [(200,), (100,), (3,)]
    # W^(2) has 20000 entries of variance C_W/n_1 = 2/200: sample variance within 4 s.e.
    w = np.asarray(p[1]["W"]).ravel()
    se = 0.01 * np.sqrt(2 / w.size)
    assert abs(w.var() - 0.01) < 4 * se
    assert ep.nn.param_count(spec) == sum(q["W"].size + q["b"].size for q in p)


def test_zero_bias_variance_gives_zero_biases():
    p = ep.nn.init(ep.MLPSpec(2, (4,), 1, C_b=0.0), jax.random.key(1))
    assert all(float(jnp.abs(q["b"]).max()) == 0.0 for q in p)


def test_apply_matches_manual_forward():
    spec = ep.MLPSpec(2, (7, 5), 2, "erf", C_b=0.2)
    p = ep.nn.init(spec, jax.random.key(2))
    X = np.random.default_rng(0).normal(size=(4, 2))
    h = jax.scipy.special.erf(X @ np.asarray(p[0]["W"]).T + np.asarray(p[0]["b"]))
    h = jax.scipy.special.erf(h @ np.asarray(p[1]["W"]).T + np.asarray(p[1]["b"]))
    out = h @ np.asarray(p[2]["W"]).T + np.asarray(p[2]["b"])
    np.testing.assert_allclose(ep.nn.apply(spec, p, X), out, rtol=1e-13)
    assert ep.nn.apply(spec, p, X).shape == (4, 2)


def test_first_layer_ntk_is_deterministic_and_exact():
    # Ĥ^(1) = δ_ij (λ_b + λ_W x·x/n_0) at any width (THEORY.md §6.1)
    spec = ep.MLPSpec(3, (), 2, "relu", lambda_b=0.4, lambda_W=1.7)
    X = np.random.default_rng(1).normal(size=(3, 3))
    H = ep.nn.empirical_ntk(spec, ep.nn.init(spec, jax.random.key(3)), X)
    expected = 0.4 + 1.7 * X @ X.T / 3
    np.testing.assert_allclose(H[0, 0], expected, rtol=1e-13)
    np.testing.assert_allclose(H[1, 1], expected, rtol=1e-13)
    np.testing.assert_allclose(H[0, 1], 0.0, atol=1e-14)


def test_empirical_ntk_equals_gradient_descent_step():
    """One tiny GD step with the per-layer rates moves f by -η Ĥ ε (THEORY.md §1.4)."""
    spec = ep.MLPSpec(2, (16, 16), 2, "tanh", C_b=0.1, lambda_b=0.3, lambda_W=0.8)
    p = ep.nn.init(spec, jax.random.key(4))
    X = np.random.default_rng(2).normal(size=(3, 2))
    y = np.random.default_rng(3).normal(size=(3, 2))
    eta = 1e-7
    lr = ep.nn.learning_rates(spec)
    loss = lambda q: 0.5 * jnp.sum((ep.nn.apply(spec, q, X) - y) ** 2)
    g = jax.grad(loss)(p)
    p1 = jax.tree_util.tree_map(lambda a, ga, la: a - eta * la * ga, p, g, lr)
    df = (ep.nn.apply(spec, p1, X) - ep.nn.apply(spec, p, X)) / eta
    H = ep.nn.empirical_ntk(spec, p, X)  # (i, j, α, β)
    eps = ep.nn.apply(spec, p, X) - y
    pred = -jnp.einsum("ijab,bj->ai", H, eps)
    np.testing.assert_allclose(df, pred, rtol=1e-5, atol=1e-8)


def test_deep_linear_second_moment_exact_at_any_width():
    # E[z²] = C_W^L G0 exactly for a deep linear network (THEORY.md §2), here at width 3
    spec = ep.MLPSpec(3, (3, 3), 1, "linear", C_b=0.0, C_W=1.3)
    x = np.array([[1.0, -2.0, 0.5]])
    f = np.asarray(ep.ensemble.prior_outputs(spec, x, 200_000, jax.random.key(5)))[:, 0, 0]
    expected = 1.3**3 * 1.75
    se = np.sqrt(np.var(f**2) / f.size)
    assert abs(np.mean(f**2) - expected) < 4 * se
    # the fourth moment is not Gaussian at width 3: E z⁴ = 3 (E z²)² (1 + 2/3)² (eq. 3.25)
    m4 = np.mean(f**4)
    se4 = np.sqrt(np.var(f**4) / f.size)
    assert abs(m4 - 3 * expected**2 * (5 / 3) ** 2) < 4 * se4
    assert m4 - 3 * expected**2 > 8 * se4


def test_learning_rates_follow_ntk_scaling():
    spec = ep.MLPSpec(4, (10,), 1, lambda_b=0.5, lambda_W=(2.0, 3.0))
    lr = ep.nn.learning_rates(spec)
    assert float(lr[0]["W"]) == pytest.approx(2.0 / 4)
    assert float(lr[1]["W"]) == pytest.approx(3.0 / 10)
    assert float(lr[1]["b"]) == pytest.approx(0.5)
