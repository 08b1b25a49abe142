import jax
import numpy as np
import pytest

import eft_prob as ep


def test_prior_outputs_shape_and_chunk_invariance():
    spec = ep.MLPSpec(2, (16, 16), 3, "tanh", C_b=0.1)
    X = np.random.default_rng(0).normal(size=(4, 2))
    a = ep.ensemble.prior_outputs(spec, X, 50, jax.random.key(0))
    b = ep.ensemble.prior_outputs(spec, X, 50, jax.random.key(0), chunk_size=7)
    assert a.shape == (50, 4, 3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = ep.ensemble.prior_outputs(spec, X, 50, jax.random.key(1))
    assert not np.allclose(a, c)


def test_prior_outputs_layers():
    spec = ep.MLPSpec(2, (5, 6), 1)
    zs = ep.ensemble.prior_outputs(spec, np.ones((3, 2)), 4, jax.random.key(0), layers=True)
    assert [z.shape for z in zs] == [(4, 3, 5), (4, 3, 6), (4, 3, 1)]


def test_hundred_thousand_networks_fit_in_memory():
    spec = ep.MLPSpec(2, (64, 64), 1, "relu", C_W=2.0)
    X = np.random.default_rng(1).normal(size=(3, 2))
    chunk = ep.ensemble.auto_chunk(spec, 3, 100_000)
    assert chunk < 100_000  # chunking is active
    f = ep.ensemble.prior_outputs(spec, X, 100_000, jax.random.key(2))
    assert f.shape == (100_000, 3, 1)
    K = np.asarray(ep.theory.nngp(spec, X))
    sq = np.asarray(f[:, :, 0]) ** 2
    # the diagonal of a ReLU kernel has no 1/n correction: agreement within sampling error
    se = sq.std(0, ddof=1) / np.sqrt(sq.shape[0])
    assert np.all(np.abs(sq.mean(0) - np.diag(K)) < 4 * se)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_networks=0), "n_networks"),
        (dict(n_networks=2.5), "n_networks"),
        (dict(n_networks=3, chunk_size=-1), "chunk_size"),
    ],
)
def test_prior_outputs_bad_arguments(kwargs, match):
    spec = ep.MLPSpec(2, (4,), 1)
    with pytest.raises(ValueError, match=match):
        ep.ensemble.prior_outputs(spec, np.ones((2, 2)), key=jax.random.key(0), **kwargs)


def test_train_reduces_loss_and_bad_arguments():
    spec = ep.MLPSpec(1, (32, 32), 1, "tanh", lambda_b=0.5)
    X = np.array([[-0.8], [0.1], [0.7]])
    y = np.array([[0.3], [-0.2], [0.5]])
    r = ep.ensemble.train(spec, X, y, np.array([[0.4]]), 6, 0.3, 300, jax.random.key(0))
    assert r.train_final.shape == (6, 3, 1) and r.test_final.shape == (6, 1, 1)
    init_loss = 0.5 * np.sum((np.asarray(r.train_init) - y) ** 2, axis=(1, 2))
    assert np.all(np.asarray(r.loss) < 1e-3 * init_loss)
    with pytest.raises(ValueError, match="learning_rate"):
        ep.ensemble.train(spec, X, y, X, 2, -0.1, 10, jax.random.key(0))
    with pytest.raises(ValueError, match="steps"):
        ep.ensemble.train(spec, X, y, X, 2, 0.1, -1, jax.random.key(0))
    with pytest.raises(ValueError, match=r"y must have shape"):
        ep.ensemble.train(spec, X, y[:2], X, 2, 0.1, 10, jax.random.key(0))
