"""TrainedNetwork(order=1): the O(1/n) distribution of GD-trained outputs as a NumPyro distribution.

The moments themselves are checked against the boxed THEORY.md §9.5 mean, a Monte Carlo of the
expanded dynamics and real trained ensembles in tests/theory/test_training_nlo.py; here: that the
distribution carries them, behaves as a NumPyro distribution (jit, vmap, grad, Predictive, obs=),
and has the right limits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import Predictive
from scipy import stats

import eft_prob as ep
from eft_prob.distributions import FiniteWidthTrained, TrainedNetwork
from eft_prob.theory.training import nlo_trained_coefficients

SPEC = ep.MLPSpec(1, (32, 32), 2, "tanh", C_b=0.1, C_W=1.5, lambda_b=0.5, lambda_W=1.0)
XA = np.array([[-1.2], [0.1], [1.3]])
YA = np.array([[0.5, -0.2], [-0.4, 0.6], [0.3, 0.1]])
XB = np.array([[-0.6], [0.6], [2.0], [0.1]])  # the last test input is a training input
ETA = 0.2


def _d(spec=SPEC, xb=XB, lr=ETA, steps=None):
    return TrainedNetwork(spec, XA, YA, xb, lr, steps, order=1)


def test_dispatch_and_moments_are_the_o1n_moments():
    d = _d()
    assert isinstance(d, FiniteWidthTrained) and isinstance(TrainedNetwork(SPEC, XA, YA, XB, ETA), TrainedNetwork)
    c = nlo_trained_coefficients(SPEC, XA, YA, XB, ETA)
    n = SPEC.widths[-2]
    np.testing.assert_allclose(d.mean, c.mean0 + c.mean1 / n, rtol=1e-12, atol=1e-14)
    cov = np.asarray(d.covariance_matrix)
    # equal up to the clipping of the quadrature-level negative eigenvalue at the training input
    np.testing.assert_allclose(cov, np.asarray(c.cov0 + c.cov1 / n), atol=1e-5 * np.abs(cov).max())
    assert d.event_shape == (4, 2) and d.batch_shape == ()
    # the order-0 part is the infinite-width distribution, computed independently
    d0 = TrainedNetwork(SPEC, XA, YA, XB, ETA)
    np.testing.assert_allclose(c.mean0, d0.mean, atol=1e-12)
    np.testing.assert_allclose(c.cov0, d0.covariance_matrix, atol=1e-10)
    # at O(1/n) the output neurons are coupled: off-diagonal (i != j) covariance blocks are nonzero
    cov1 = np.asarray(c.cov1).reshape(4, 2, 4, 2)
    assert np.abs(cov1[:3, 0, :3, 1]).max() > 1e-3 * np.abs(cov1[:3, 0, :3, 0]).max()


def test_converged_network_interpolates_its_training_inputs_at_order_1():
    d = _d()
    np.testing.assert_allclose(d.mean[3], YA[1], atol=1e-8)  # test input 3 == training input 1
    # zero up to the quadrature accuracy of the NTK statistics (~1e-5 of the O(1/n) term)
    assert float(jnp.max(d.variance[3])) < 1e-5 * float(jnp.max(d.variance))
    assert np.all(np.asarray(d.variance[:3]) > 1e-4)


def test_log_prob_sample_and_entropy():
    d = _d(xb=XB[:3])
    v = d.sample(jax.random.key(0), (3,))
    assert v.shape == (3, 3, 2)
    ref = stats.multivariate_normal(np.asarray(d.mean).ravel(), np.asarray(d.covariance_matrix))
    np.testing.assert_allclose(d.log_prob(v), ref.logpdf(np.asarray(v).reshape(3, -1)), rtol=1e-10)
    assert float(d.entropy()) == pytest.approx(ref.entropy(), rel=1e-10)
    s = np.asarray(d.sample(jax.random.key(1), (20000,))).reshape(20000, -1)
    sd = np.sqrt(np.diag(np.asarray(d.covariance_matrix)))
    assert np.all(np.abs(s.mean(0) - np.asarray(d.mean).ravel()) < 4.5 * sd / np.sqrt(20000))
    assert np.all(np.abs(s.std(0) / sd - 1) < 4.5 / np.sqrt(2 * 20000))


@pytest.mark.slow
@pytest.mark.heavy
def test_grad_and_pytree():
    """grad (NUTS over hyperparameters) differentiates the quadrature rules of the NTK statistics at
    fixed node scale; finite differences also move the nodes: they agree to the quadratures'
    accuracy, amplified by the cancellations in the O(1/n) covariance (0.2% here).  With n_L = 2 the
    eigenvalues of Θ̃ ⊗ 1 are degenerate, where a naive eigh derivative was 30% off: this guards it.
    (jit and vmap over C_W: tests/test_trained_distribution.py::test_in_a_numpyro_model traces it.)"""
    v = _d(xb=XB[:3]).sample(jax.random.key(2))
    f = lambda c: _d(SPEC.replace(C_W=c), XB[:3]).log_prob(v)
    g = float(jax.grad(f)(1.5))
    fd = (float(f(1.5 + 1e-5)) - float(f(1.5 - 1e-5))) / 2e-5
    assert np.isfinite(g) and g == pytest.approx(fd, rel=1e-2)
    # the distribution itself passes through jit as a pytree
    d = _d(xb=XB[:3])
    np.testing.assert_allclose(jax.jit(lambda dd, x: dd.log_prob(x))(d, v), d.log_prob(v), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.heavy
def test_vmap_over_hyperparameters():
    v = _d(xb=XB[:3]).sample(jax.random.key(2))
    f = lambda c: _d(SPEC.replace(C_W=c), XB[:3]).log_prob(v)
    cws = jnp.array([1.3, 1.7])
    lp = jax.vmap(f)(cws)
    for c, l in zip(cws, lp):
        assert float(l) == pytest.approx(float(f(float(c))), rel=1e-9)


def test_in_a_numpyro_model():
    def model(obs=None):
        c_w = numpyro.sample("C_W", dist.Uniform(1.2, 1.8))
        return numpyro.sample("f", _d(SPEC.replace(C_W=c_w), XB[:3]), obs=obs)

    pr = Predictive(model, num_samples=4)(jax.random.key(3))
    assert pr["f"].shape == (4, 3, 2) and not np.allclose(pr["f"][0], pr["f"][1])
    lp, _ = numpyro.infer.util.log_density(model, (), {"obs": pr["f"][0]}, {"C_W": 1.5})
    assert np.isfinite(float(lp))


def test_limits_width_steps_and_learning_rate():
    # order 1 -> order 0 as n -> infinity: the same coefficients at every width (the widths enter
    # only through their ratios), so the difference falls exactly like 1/n
    c64 = nlo_trained_coefficients(SPEC.replace(hidden=(64, 64)), XA, YA, XB, ETA)
    c512 = nlo_trained_coefficients(SPEC.replace(hidden=(512, 512)), XA, YA, XB, ETA)
    np.testing.assert_allclose(c512.mean1, c64.mean1, rtol=1e-10, atol=1e-12)
    d1, d0 = _d(SPEC.replace(hidden=(512, 512))), TrainedNetwork(SPEC.replace(hidden=(512, 512)), XA, YA, XB, ETA)
    np.testing.assert_allclose(512 * (d1.mean - d0.mean), c64.mean1, rtol=1e-8, atol=1e-10)
    assert float(jnp.max(jnp.abs(c64.mean1))) > 0.1
    # many finite steps -> the converged coefficients; few steps differ from them
    conv, long_, short = c64, *(nlo_trained_coefficients(SPEC, XA, YA, XB, ETA, t) for t in (2000, 5))
    for a in ("mean0", "mean1", "cov0", "cov1"):
        np.testing.assert_allclose(getattr(long_, a), getattr(conv, a), atol=1e-9)
    assert float(jnp.max(jnp.abs(short.mean1 - conv.mean1))) > 1e-2
    # small learning rates approach gradient flow (learning_rate=None): the O(1/n) mean depends on η
    flow, slow, fast = (nlo_trained_coefficients(SPEC, XA, YA, XB, lr) for lr in (None, 1e-5, 0.5))
    np.testing.assert_allclose(slow.mean1, flow.mean1, atol=1e-4)
    np.testing.assert_allclose(flow.mean0, fast.mean0, atol=1e-10)  # order 0 does not depend on η
    assert float(jnp.max(jnp.abs(fast.mean1 - flow.mean1))) > 0.1


def test_bad_input():
    relu = SPEC.replace(activation="relu", C_b=0.0, C_W=2.0)
    with pytest.raises(ValueError, match="relu"):
        TrainedNetwork(relu, XA, YA, XB, ETA, order=1)
    with pytest.raises(ValueError, match="stability bound"):
        TrainedNetwork(SPEC, XA, YA, XB, 50.0, order=1)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainedNetwork(SPEC, XA, YA, XB, -0.1, order=1)
    with pytest.raises(ValueError, match="y must have shape"):
        TrainedNetwork(SPEC, XA, YA[:, :1], XB, ETA, order=1)
    with pytest.raises(ValueError, match="NaN"):
        TrainedNetwork(SPEC, XA, YA, np.where(XB > 1.9, np.nan, XB), ETA, order=1)
