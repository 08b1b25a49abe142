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


def test_prior_kernels_are_the_metrics_of_the_prior_outputs_networks():
    """Ĝ^(ℓ) = C_b + C_W/n_{ℓ-1} Σ_j σ(z^(ℓ-1)_j)σ(z^(ℓ-1)_j) of network m of prior_outputs (same key)."""
    spec = ep.MLPSpec(2, (16, 8), 3, "tanh", C_b=(0.1, 0.2, 0.3), C_W=(1.1, 1.3, 1.7))
    X = np.random.default_rng(0).normal(size=(4, 2))
    key = jax.random.key(3)
    G = np.asarray(ep.ensemble.prior_kernels(spec, X, 20, key))
    assert G.shape == (20, 4, 4) and G.dtype == np.float64
    np.testing.assert_array_equal(G, np.asarray(ep.ensemble.prior_kernels(spec, X, 20, key, chunk_size=7)))
    zs = ep.ensemble.prior_outputs(spec, X, 20, key, layers=True)
    s = np.tanh(np.asarray(zs[-2]))
    np.testing.assert_allclose(G, 0.3 + 1.7 * np.einsum("man,mbn->mab", s, s) / 8, rtol=1e-12)
    Gs = ep.ensemble.prior_kernels(spec, X, 20, key, layers=True)
    assert len(Gs) == 3 and all(g.shape == (20, 4, 4) for g in Gs)
    np.testing.assert_allclose(np.asarray(Gs[0]), np.broadcast_to(0.1 + 1.1 * X @ X.T / 2, (20, 4, 4)), rtol=1e-12)
    s = np.tanh(np.asarray(zs[0]))
    np.testing.assert_allclose(np.asarray(Gs[1]), 0.2 + 1.3 * np.einsum("man,mbn->mab", s, s) / 16, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(Gs[-1]), G)
    # depth 1: Ĝ^(1) is not random
    lin = ep.MLPSpec(2, (), 2, "relu", C_b=0.5, C_W=2.0)
    np.testing.assert_allclose(
        np.asarray(ep.ensemble.prior_kernels(lin, X, 3, key)), np.broadcast_to(0.5 + X @ X.T, (3, 4, 4)), rtol=1e-12
    )
    with pytest.raises(ValueError, match="n_networks"):
        ep.ensemble.prior_kernels(spec, X, 0, key)


def test_prior_kernels_moments_match_the_output_moments():
    """Mean and covariance of Ĝ agree with the moments of the outputs themselves, within s.e.

    Same networks (same key), so each comparison is paired: per network, the output statistic
    minus its conditional mean given Ĝ (z | Ĝ ~ N(0, Ĝ) iid over the n_L neurons):
    * (1/n_L) Σ_i z_iα z_iβ - Ĝ_αβ;
    * the i ≠ k pair average of z_iα1 z_iα2 z_kα3 z_kα4 - Ĝ_α1α2 Ĝ_α3α4, and then the difference of
      the two connected four-point estimates (delta method: influence functions of both);
    * (1/n_L) Σ_i z_iα⁴ - 3 Ĝ_αα² (the single-neuron fourth cumulant is 3 Var Ĝ_αα).
    """
    nL, M = 4, 20_000
    spec = ep.MLPSpec(3, (8, 8), nL, "tanh", C_b=0.1, C_W=1.5)
    X = 1.2 * np.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.7], [0.6, 0.1, -0.9]])
    key = jax.random.key(7)
    G = np.asarray(ep.ensemble.prior_kernels(spec, X, M, key))
    z = np.asarray(ep.ensemble.prior_outputs(spec, X, M, key))  # (M, N, n_L)

    def check(D, what):
        D = D.reshape(M, -1)
        assert np.all(np.abs(D.mean(0)) <= 4.5 * D.std(0, ddof=1) / np.sqrt(M)), what

    S = np.einsum("mai,mbi->mab", z, z)
    check(S / nL - G, "E zz = E Ĝ")
    pairs = [(0, 0), (0, 1), (1, 2), (2, 2)]
    for p in pairs:
        for q in pairs:
            cross = (S[(slice(None), *p)] * S[(slice(None), *q)]
                     - np.einsum("mi,mi,mi,mi->m", *(z[:, a] for a in p + q))) / (nL * (nL - 1))  # fmt: skip
            gp, gq = G[(slice(None), *p)], G[(slice(None), *q)]
            check(cross - gp * gq, f"E z_i z_i z_k z_k = E ĜĜ {p}{q}")
            # connected: mean(cross) - mean(zz_p)mean(zz_q)  vs  Cov(Ĝ_p, Ĝ_q)
            zp, zq = S[(slice(None), *p)] / nL, S[(slice(None), *q)] / nL
            # influence function of the difference (E zz = E Ĝ, so either mean may multiply)
            infl = (cross - gp * gq) - gq.mean() * (zp - gp) - gp.mean() * (zq - gq)
            diff = (cross.mean() - zp.mean() * zq.mean()) - np.cov(gp, gq)[0, 1]
            assert abs(diff) <= 4.5 * infl.std() / np.sqrt(M), (p, q, diff)
    for a in range(3):
        check(np.mean(z[:, a] ** 4, axis=-1) - 3 * G[:, a, a] ** 2, f"E z⁴ = 3 E Ĝ² ({a})")
