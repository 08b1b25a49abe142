"""Infinite-width GD training: exact linear dynamics, convergence, and real trained ensembles."""

import jax
import numpy as np
import pytest

import eft_prob as ep
from eft_prob.distributions import TrainedNetwork
from tests.conftest import fit_inverse_width

SPEC = ep.MLPSpec(1, (64, 64), 1, "tanh", C_b=0.0, C_W=1.0, lambda_b=0.5, lambda_W=1.0)
XA = np.array([[-0.9], [-0.3], [0.4], [1.0]])
YA = np.array([[0.4], [-0.3], [0.2], [0.6]])
XB = np.array([[-0.6], [0.0], [0.7], [1.6]])  # three interpolation points and one extrapolation


def _explicit_linear_dynamics(K, T, nA, y, eta, steps):
    """Iterate z ← z − ηΘ_{DA}(z_A − y) on the affine map z(t) = A z(0) + c (independent check)."""
    N = K.shape[0]
    A = np.eye(N)
    c = np.zeros((N, y.shape[1]))
    for _ in range(steps):
        A, c = A - eta * T[:, :nA] @ A[:nA], c - eta * T[:, :nA] @ (c[:nA] - y)
    return c[nA:], (A @ K @ A.T)[nA:, nA:]


@pytest.mark.parametrize("steps", [0, 1, 7, 60])
def test_finite_steps_equal_explicit_linear_dynamics(steps):
    X = np.concatenate([XA, XB])
    k = ep.theory.kernels(SPEC, X)
    K, T = np.asarray(k.nngp[-1]), np.asarray(k.ntk[-1])
    eta = 0.7 * float(ep.theory.training.stability_bound(T[:4, :4]))
    mean, cov = _explicit_linear_dynamics(K, T, 4, YA, eta, steps)
    pred = ep.theory.gd_prediction(SPEC, XA, YA, XB, learning_rate=eta, steps=steps)
    np.testing.assert_allclose(pred.mean, mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pred.cov, cov, rtol=1e-9, atol=1e-12)
    if steps == 0:
        np.testing.assert_allclose(pred.cov, K[4:, 4:], rtol=1e-12)


def test_many_steps_converge_to_steps_none_and_oracle_O9():
    spec = ep.MLPSpec(2, (8, 8), 1, "relu", C_b=0.0, C_W=2.0, lambda_b=0.0, lambda_W=1.0)
    Xa, ya, Xt = np.array([[1.0, 0.0], [0.6, 0.8]]), np.array([[1.0], [-1.0]]), np.array([[0.8, -0.6]])
    inf = ep.theory.gd_prediction(spec, Xa, ya, Xt)
    assert float(inf.mean[0, 0]) == pytest.approx(0.926393, abs=1e-6)
    assert float(inf.cov[0, 0]) == pytest.approx(0.292276, abs=1e-6)
    five = ep.theory.gd_prediction(spec, Xa, ya, Xt, learning_rate=0.3, steps=5)
    assert float(five.mean[0, 0]) == pytest.approx(0.656065, abs=1e-6)
    assert float(five.cov[0, 0]) == pytest.approx(0.331868, abs=1e-6)
    late = ep.theory.gd_prediction(spec, Xa, ya, Xt, learning_rate=0.3, steps=5000)
    np.testing.assert_allclose(late.mean, inf.mean, rtol=1e-10)
    np.testing.assert_allclose(late.cov, inf.cov, rtol=1e-9)


def test_learning_rate_between_one_and_two_over_lambda_is_handled():
    X = np.concatenate([XA, XB])
    T = np.asarray(ep.theory.ntk(SPEC, X))
    eta = 0.95 * float(ep.theory.training.stability_bound(T[:4, :4]))  # η λ_max ≈ 1.9: oscillating
    mean, cov = _explicit_linear_dynamics(np.asarray(ep.theory.nngp(SPEC, X)), T, 4, YA, eta, 25)
    pred = ep.theory.gd_prediction(SPEC, XA, YA, XB, learning_rate=eta, steps=25)
    np.testing.assert_allclose(pred.mean, mean, rtol=1e-8, atol=1e-12)


def test_trained_network_is_not_the_bayesian_posterior_unless_theta_proportional_to_k():
    post = ep.theory.gp_posterior(SPEC, XA, YA, XB, noise_var=1e-10)
    trained = ep.theory.gd_prediction(SPEC, XA, YA, XB)
    assert np.max(np.abs(np.asarray(post.mean - trained.mean))) > 1e-3
    # only the last layer trained, λ_b/λ_W = C_b/C_W: Θ ∝ K and the two coincide (THEORY.md §8.3)
    last = SPEC.replace(C_b=0.2, lambda_b=(0.0, 0.0, 0.2), lambda_W=(0.0, 0.0, 1.0))
    post = ep.theory.gp_posterior(last, XA, YA, XB, noise_var=1e-12)
    trained = ep.theory.gd_prediction(last, XA, YA, XB)
    np.testing.assert_allclose(post.mean, trained.mean, atol=1e-6)
    np.testing.assert_allclose(post.cov, trained.cov, atol=1e-6)


@pytest.mark.slow
@pytest.mark.heavy
def test_trained_network_matches_gd_trained_ensembles_with_error_shrinking_with_width():
    """Real networks trained by full-batch GD approach TrainedNetwork(order=0) like a/n + b.

    The mean uses a control variate built from each network's own initial outputs: at infinite
    width f_B(t) = g + P_t y with g = z_B(0) − P_t z_A(0) (E[g] = 0), so f − g isolates the
    finite-width part and its mean is resolved far below the spread of f itself.
    """
    XA3 = np.array([[-0.9], [0.1], [0.8]])
    YA3 = np.array([[0.4], [-0.3], [0.5]])
    spec0 = SPEC.replace(C_b=0.1)
    widths = (64, 128, 256, 512)
    steps, M = 300, 600
    X = np.concatenate([XA3, XB])
    T = np.asarray(ep.theory.ntk(spec0, X))
    eta = 0.5 * float(ep.theory.training.stability_bound(T[:3, :3]))
    d = TrainedNetwork(spec0, XA3, YA3, XB, learning_rate=eta, steps=steps)
    th_mean, th_var = np.asarray(d.mean[:, 0]), np.asarray(d.variance[:, 0])
    # P_t from the same theory (mean = P_t y): recover it column by column
    P = np.stack(
        [
            np.asarray(ep.theory.gd_prediction(spec0, XA3, np.eye(3)[:, [k]], XB, eta, steps).mean[:, 0])
            for k in range(3)
        ],
        axis=1,
    )
    means, mses, vars_, vses = [], [], [], []
    for i, n in enumerate(widths):
        r = ep.ensemble.train(
            spec0.replace(hidden=(n, n)), XA3, YA3, XB, M, eta, steps, jax.random.key(300 + i), chunk_size=1
        )
        f = np.asarray(r.test_final[:, :, 0])
        g = np.asarray(r.test_init[:, :, 0]) - np.asarray(r.train_init[:, :, 0]) @ P.T
        h = f - g
        means.append(h.mean(0))
        mses.append(h.std(0, ddof=1) / np.sqrt(M))
        c = f - f.mean(0)
        vars_.append((c**2).mean(0))
        vses.append(np.sqrt(((c**2 - (c**2).mean(0)) ** 2).mean(0) / M))
    means, mses, vars_, vses = map(np.array, (means, mses, vars_, vses))
    assert np.all(mses[-1] < 0.1 * np.sqrt(th_var))  # the control variate works
    for j in range(len(XB)):
        _, b, _, se_b, _ = fit_inverse_width(widths, means[:, j], mses[:, j])
        assert abs(b - th_mean[j]) <= 4 * se_b, ("mean", j, b, th_mean[j], se_b)
        _, b, _, se_b, _ = fit_inverse_width(widths, vars_[:, j], vses[:, j])
        assert abs(b - th_var[j]) <= 4 * se_b, ("var", j, b, th_var[j], se_b)
    # the error of the Gaussian limit shrinks with width (up to noise)
    err = np.abs(means - th_mean)
    assert np.all(err[-1] <= err[0] + 3 * np.sqrt(mses[0] ** 2 + mses[-1] ** 2))
