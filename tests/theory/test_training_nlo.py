"""Trained networks at O(1/n): mean and covariance after GD (THEORY.md §9.5 and its extension).

Independent checks of ``nlo_trained_coefficients``:
* the mean equals THEORY.md §9.5 (boxed), implemented here separately from the sheet's formula with
  brute-force time sums of M^t (n_L = 1 and 2, two learning rates);
* one GD step: the exact expectation of the Taylor-expanded step;
* the covariance and finite-step results equal a Monte Carlo of the expanded GD dynamics driven by
  surrogate random variables with exactly the O(1/n) cumulants (slow);
* structural limits: steps → ∞, η → 0, steps = 0, training inputs fit exactly;
* real GD-trained ensembles at three widths (slow; benchmarks/validate_trained_nlo.py is the large run).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eft_prob as ep
from eft_prob.theory.ntk_stats import ntk_statistics
from eft_prob.theory.training import (
    _composite_statistics,
    gd_moments,
    nlo_trained_coefficients,
    nlo_trained_marginals,
)
from tests.conftest import fit_inverse_powers
from tests.theory.ntk_mc import h1_mean_part, trained_ensemble, trained_moment_estimates

XA = np.array([[1.0, 0.2], [-0.5, 0.9], [0.3, -1.0]])
XB = np.array([[0.6, 0.5], [-1.2, -0.3]])
YA = np.array([[0.5, -0.2], [-0.4, 0.3], [0.2, 0.7]])
KW = dict(C_b=0.1, C_W=1.2, lambda_b=0.4, lambda_W=1.0)


def _spec(nL, n=16):
    return ep.MLPSpec(2, (n, n), nL, "tanh", **KW)


def _composite_setup(spec, y):
    """Composite (sample-major, index δ·n_L + i) kernels and 1/n tensors on A ∪ B."""
    X = np.concatenate([XA, XB])
    nL = y.shape[1]
    st = ntk_statistics(spec, X)
    e = np.eye(nL)
    kron = lambda M: np.kron(np.asarray(M), e)
    tensors = [np.asarray(t) for t in _composite_statistics(st, nL)]
    return st, kron(st.Theta), kron(st.K), kron(st.K1), kron(st.H1), tensors


def _gamma3(y, K):
    """Γ⁰_{abc} = y_a y_b y_c + y_a K_bc + y_b K_ac + y_c K_ab = −E[ε_a ε_b ε_c] at initialization."""
    return (
        np.einsum("a,b,c->abc", y, y, y)
        + np.einsum("a,bc->abc", y, K)
        + np.einsum("b,ac->abc", y, K)
        + np.einsum("c,ab->abc", y, K)
    )


def _boxed_mean1(spec, y, eta, T=800):
    """THEORY.md §9.5 (boxed) for mean1, composite indices, algorithm projectors as explicit time sums."""
    nA, nL = y.shape
    _, Th, K, _, H1, (A, _, P, I, J) = _composite_setup(spec, y)
    a = slice(0, nA * nL)
    yv = y.reshape(-1)
    Hi = np.linalg.inv(Th[a, a])
    M = np.eye(nA * nL) - eta * Th[a, a]
    ZA, Sttt, Stss, Sttr, Stsr = 0.0, 0.0, 0.0, 0.0, 0.0
    Mt, cum1, cum2, cum3 = np.eye(nA * nL), 0.0 * M, 0.0, 0.0  # Σ_{s<t} M^s, Σ M^s⊗M^s, Σ_{s<t} M^s⊗(Σ_{r<s} M^r)
    for _ in range(T):
        ZA = ZA + eta**2 * np.einsum("ac,bd->abcd", Mt, cum1)
        Sttt = Sttt + eta**3 * np.einsum("ad,be,cf->abcdef", Mt, Mt, Mt)
        Sttr = Sttr + eta**3 * np.einsum("ad,be,cf->abcdef", Mt, Mt, cum1)
        if np.ndim(cum2):
            Stss = Stss + eta**3 * np.einsum("ad,bcef->abcdef", Mt, cum2)
            Stsr = Stsr + eta**3 * np.einsum("ad,bcef->abcdef", Mt, cum3)
        cum3 = cum3 + np.einsum("be,cf->bcef", Mt, cum1)
        cum2 = cum2 + np.einsum("be,cf->bcef", Mt, Mt)
        cum1 = cum1 + Mt
        Mt = Mt @ M
    G0 = _gamma3(yv, K[a, a])
    sums = {"ttt": Sttt, "tss": Stss, "ttr": Sttr, "tsr": Stsr}
    E = {k: -np.einsum("abcdef,def->abc", S, G0) for k, S in sums.items()}  # E[η³Σ εεε]
    Jp = I + J + np.transpose(J, (0, 2, 1, 3))
    m = np.empty(Th.shape[0])
    for b in range(Th.shape[0]):
        m[b] = (
            H1[b, a] @ Hi @ yv
            - np.einsum("xyz,xy,zv,v->", A[b, a, a, a], Hi, Hi, yv)
            - np.einsum("xyz,xz,yv,v->", P[b, a, a, a], Hi, Hi, yv)
            - np.einsum("xyz,xyzv,v->", P[a, b, a, a], ZA, yv)
            - np.einsum("xyz,xyvz,v->", P[a, b, a, a], ZA, yv)
            - np.einsum("abc,abc->", I[b, a, a, a], E["ttt"]) / 6
            - 0.5 * np.einsum("abc,abc->", I[b, a, a, a] + I[a, b, a, a] + 2 * J[b, a, a, a], E["tss"])
            - np.einsum("acd,acd->", Jp[b, a, a, a] + Jp[a, b, a, a], E["tsr"])
            - 0.5 * np.einsum("abc,abc->", Jp[b, a, a, a], E["ttr"])
        )
    return (m - Th[:, a] @ Hi @ m[a])[nA * nL :].reshape(-1, nL)


@pytest.mark.parametrize("nL, eta", [(1, 0.3), (2, 0.3), (1, 0.08)])
def test_mean_equals_the_boxed_formula_with_explicit_time_sums(nL, eta):
    spec = _spec(nL)
    c = nlo_trained_coefficients(spec, XA, YA[:, :nL], XB, eta)
    np.testing.assert_allclose(np.asarray(c.mean1), _boxed_mean1(spec, YA[:, :nL], eta), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("nL", [1, 2])
def test_one_gd_step_is_the_expectation_of_the_taylor_expanded_step(nL):
    """z(1) = z − ηĤ_{·A}ε + (η²/2)dĤ εε − (η³/6)ddĤ_I εεε (ε = z_A − y) is exact to O(1/n); its mean and
    covariance from E[ΔĤΔĤ] = 𝒜/n, E[ΔĤ zz] = 𝒟/n, E[dĤ z] = 𝒫/n, E[ddĤ_I] = ℐ/n, E[zz] = K + K1/n."""
    y = YA[:, :nL]
    spec, eta = _spec(nL), 0.3
    st, Th, K, K1, H1, (A, D, P, I, _) = _composite_setup(spec, y)
    nA = y.shape[0]
    a = slice(0, nA * nL)
    yv = y.reshape(-1)
    Lz = np.eye(Th.shape[0]) - eta * np.concatenate([Th[:, a], 0 * Th[:, nA * nL :]], 1)
    G3 = _gamma3(yv, K[a, a])  # −E[εεε]
    S2 = K[a, a] + np.outer(yv, yv)  # E[εε]
    mean1 = eta * H1[:, a] @ yv - eta**2 * np.einsum("bxyx,y->b", P[:, a, a, a], yv)
    mean1 = mean1 + eta**3 / 6 * np.einsum("bxyz,xyz->b", I[:, a, a, a], G3)
    Kc = K[:, a]
    Ez3 = np.einsum("cx,yz->cxyz", Kc, S2) + np.einsum("cy,xz->cxyz", Kc, S2) + np.einsum("cz,xy->cxyz", Kc, S2)
    Lh = -eta * np.concatenate([H1[:, a], 0 * H1[:, nA * nL :]], 1)  # 1/n part of the linear map
    dP = np.einsum("bxyc,xy->cb", P[:, a, a, :], S2) + 2 * np.einsum("bxyx,cy->cb", P[:, a, a, a], Kc)
    cross = (
        -eta * np.einsum("bxcx->cb", D[:, a, :, a])  # E[z_c ΔĤ_{bx} ε_x]; E[z ΔĤ] y = 0 by parity
        + eta**2 / 2 * dP  # E[z_c dĤ_{bxy} ε_x ε_y]
        - eta**3 / 6 * np.einsum("bxyz,cxyz->cb", I[:, a, a, a], Ez3)
    )  # [c, b] = n E[z_c x_b]
    cov1 = Lz @ K1 @ Lz.T + Lz @ K @ Lh.T + Lh @ K @ Lz.T + eta**2 * np.einsum("bxcy,xy->bc", A[:, a, :, a], S2)
    cov1 = cov1 + Lz @ cross + (Lz @ cross).T
    c = nlo_trained_coefficients(spec, XA, y, XB, eta, steps=1)
    B = slice(nA * nL, None)
    np.testing.assert_allclose(np.asarray(c.mean1).ravel(), mean1[B], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(c.cov1), cov1[B, B], rtol=1e-9, atol=1e-12)


def test_limits_steps_learning_rate_and_training_inputs():
    spec = _spec(1)
    y = YA[:, :1]
    Xt = np.concatenate([XB, XA[1:2]])  # the last test input is a training input
    inf = nlo_trained_coefficients(spec, XA, y, Xt, 0.3)
    late = nlo_trained_coefficients(spec, XA, y, Xt, 0.3, steps=3000)
    for f in ("mean0", "cov0", "mean1", "cov1"):
        np.testing.assert_allclose(np.asarray(getattr(late, f)), np.asarray(getattr(inf, f)), rtol=1e-9, atol=1e-12)
    # training inputs are fit exactly at O(1/n) too
    assert abs(float(inf.mean1[-1, 0])) < 1e-10 and np.max(np.abs(np.asarray(inf.cov1)[-1])) < 1e-10
    assert float(inf.mean0[-1, 0]) == pytest.approx(float(y[1, 0]), abs=1e-10)
    # gradient flow is the η → 0 limit (the closed forms are continuous in η)
    gf = nlo_trained_coefficients(spec, XA, y, XB)
    small = nlo_trained_coefficients(spec, XA, y, XB, 1e-6)
    np.testing.assert_allclose(np.asarray(small.mean1), np.asarray(gf.mean1), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(np.asarray(small.cov1), np.asarray(gf.cov1), rtol=1e-4, atol=1e-8)
    assert np.max(np.abs(np.asarray(gf.mean1) - np.asarray(inf.mean1)[:2])) > 1e-3  # η matters at O(1/n)
    # steps = 0: the prior, E[zz] = K + K1/n
    st = ntk_statistics(spec, np.concatenate([XA, XB]), derivatives=False)
    zero = nlo_trained_coefficients(spec, XA, y, XB, 0.3, steps=0)
    assert np.max(np.abs(np.asarray(zero.mean0))) == 0 and np.max(np.abs(np.asarray(zero.mean1))) < 1e-14
    np.testing.assert_allclose(np.asarray(zero.cov1), np.asarray(st.K1)[3:, 3:], rtol=1e-10, atol=1e-14)
    # order 0 equals gd_moments; order 1 -> order 0 as n -> ∞
    K, T = np.asarray(st.K), np.asarray(st.Theta)
    g = gd_moments(K[:3, :3], K[:3, 3:], K[3:, 3:], T[:3, :3], T[3:, :3], y, 0.3, None)
    np.testing.assert_allclose(np.asarray(inf.mean0)[:2], np.asarray(g.mean), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(inf.cov0)[:2, :2], np.asarray(g.cov), rtol=1e-12, atol=1e-15)
    far = inf.at(1e12)
    np.testing.assert_allclose(np.asarray(far.mean)[:2], np.asarray(g.mean), atol=1e-10)
    here = ep.theory.training.nlo_trained_moments(spec, XA, y, Xt, 0.3)
    np.testing.assert_allclose(np.asarray(here.mean), np.asarray(inf.mean0 + inf.mean1 / 16), rtol=1e-12)


def test_errors():
    y = YA[:, :1]
    with pytest.raises(ValueError, match="kinked"):
        nlo_trained_coefficients(ep.MLPSpec(2, (8, 8), 1, "relu", C_W=2.0), XA, y, XB, 0.1)
    with pytest.raises(ValueError, match="stability bound"):
        nlo_trained_coefficients(_spec(1), XA, y, XB, 50.0)
    with pytest.raises(ValueError, match="learning_rate is required"):
        nlo_trained_coefficients(_spec(1), XA, y, XB, steps=10)
    with pytest.raises(ValueError, match="non-negative integer"):
        nlo_trained_coefficients(_spec(1), XA, y, XB, 0.1, steps=-1)
    with pytest.raises(ValueError, match="hidden layer"):
        nlo_trained_coefficients(ep.MLPSpec(2, (), 1, "tanh"), XA, y, XB, 0.1)


def test_test_batches_give_the_blocks_of_the_joint_moments():
    # The recursions are closed on index subsets, so splitting X_test into batches (what the cost
    # warning advises for many test inputs) gives exactly the joint result's diagonal blocks.
    spec = _spec(1)
    y = YA[:, :1]
    Xt = np.array([[0.6, 0.5], [-1.2, -0.3], [0.1, 1.1], [0.9, -0.7]])
    joint = nlo_trained_coefficients(spec, XA, y, Xt, 0.3)
    for s in (slice(0, 2), slice(2, 4)):
        part = nlo_trained_coefficients(spec, XA, y, Xt[s], 0.3)
        np.testing.assert_allclose(np.asarray(part.mean1), np.asarray(joint.mean1)[s], rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(np.asarray(part.cov1), np.asarray(joint.cov1)[s, s], rtol=1e-9, atol=1e-13)


def test_many_inputs_warn_about_the_dense_cost():
    from eft_prob.theory.training import _DENSE_TRAINED_MAX, _warn_cost

    with pytest.warns(ep.CostWarning, match=r"10 \+ 23 = 33 inputs"):
        _warn_cost(10, _DENSE_TRAINED_MAX + 1 - 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_cost(10, _DENSE_TRAINED_MAX - 10)


# --------------------------------------------------------------------------------------------
# Monte Carlo of the expanded dynamics with surrogate random variables (covariance, finite steps).


def _surrogate_moments(spec, y, eta, steps, n_samples, key, g=1e-3):
    """g² coefficients of E[z_B(T)] and Cov[z_B(T)] for the Taylor-expanded GD dynamics driven by
    z ~ N(0, K + g²K1), Ĥ(0) = Θ + g²H1 + gX + g²C(zz − K) (X ~ N(0, 𝒜)), dĤ = g²(𝒫K⁻¹)z, ddĤ = g²(ℐ, 𝒥),
    whose cumulants are exactly those of the theory with g² = 1/n.  Per sample the g and g²
    coefficients come from symmetric differences at ±g (the path is polynomial in g)."""
    nA, nL = y.shape
    _, Th, K, K1, H1, tensors = _composite_setup(spec, y)
    Th, K, K1, H1 = (jnp.asarray(t) for t in (Th, K, K1, H1))
    A, D, P, I, J = (jnp.asarray(t) for t in tensors)
    nD, a = Th.shape[0], slice(0, nA * nL)
    yv = jnp.asarray(y.reshape(-1))
    Ki = jnp.linalg.inv(K)
    C = 0.5 * jnp.einsum("xycd,ce,df->xyef", D, Ki, Ki)
    Pz = jnp.einsum("xyzc,cd->xyzd", P, Ki)
    Jp = I + J + jnp.transpose(J, (0, 2, 1, 3))
    Sm = I + jnp.transpose(I, (1, 0, 2, 3)) + 2 * J
    w, V = jnp.linalg.eigh(A.reshape(nD * nD, -1))
    Aroot = V * jnp.sqrt(jnp.clip(w, 0.0))

    def path(g, xi, zeta):
        z = jnp.linalg.cholesky(K + g**2 * K1) @ xi
        X = (Aroot @ zeta).reshape(nD, nD)
        H = Th + g**2 * H1 + g * (X + X.T) / 2 + g**2 * jnp.einsum("xyef,ef->xy", C, jnp.outer(z, z) - K)
        d = g**2 * jnp.einsum("xyzc,c->xyz", Pz, z)

        def step(c, _):
            z, H, d = c
            e = z[a] - yv
            zn = z - eta * H[:, a] @ e + eta**2 / 2 * jnp.einsum("bxy,x,y->b", d[:, a, a], e, e)
            zn = zn - eta**3 / 6 * g**2 * jnp.einsum("bxyz,x,y,z->b", I[:, a, a, a], e, e, e)
            Hn = H - eta * (jnp.einsum("pqx,x->pq", d[:, :, a], e) + jnp.einsum("qpx,x->pq", d[:, :, a], e))
            Hn = Hn + eta**2 / 2 * g**2 * jnp.einsum("pqxy,x,y->pq", Sm[:, :, a, a], e, e)
            return (zn, Hn, d - eta * g**2 * jnp.einsum("pqrx,x->pqr", Jp[:, :, :, a], e)), None

        return jax.lax.scan(step, (z, H, d), None, length=steps)[0][0][nA * nL :]

    def coeffs(xi, zeta):
        zp, z0, zm = path(g, xi, zeta), path(0.0, xi, zeta), path(-g, xi, zeta)
        return z0, (zp - zm) / (2 * g), (zp + zm - 2 * z0) / (2 * g**2)

    k1, k2 = jax.random.split(key)
    xi = jax.random.normal(k1, (n_samples, nD))
    zeta = jax.random.normal(k2, (n_samples, nD * nD))
    z0, z1, z2 = (np.asarray(v) for v in jax.jit(jax.vmap(coeffs))(xi, zeta))
    m0, m2 = z0.mean(0), z2.mean(0)
    cs = z0[:, :, None] * z2[:, None] + z2[:, :, None] * z0[:, None] + z1[:, :, None] * z1[:, None]
    cs = cs - np.outer(m0, m2) - np.outer(m2, m0)
    S = n_samples
    return m2, z2.std(0) / np.sqrt(S), cs.mean(0), cs.std(0) / np.sqrt(S)


@pytest.mark.slow
@pytest.mark.parametrize("nL, steps", [(1, 2), (2, 5), (1, 60)])
def test_covariance_and_finite_steps_equal_monte_carlo_of_the_expanded_dynamics(nL, steps):
    y = YA[:, :nL]
    spec = _spec(nL)
    T = np.asarray(ep.theory.ntk(spec, np.concatenate([XA, XB])))
    eta = 0.8 / np.linalg.eigvalsh(T[:3, :3])[-1]
    m, sm, c, sc = _surrogate_moments(spec, y, eta, steps, 40000, jax.random.key(steps))
    th = nlo_trained_coefficients(spec, XA, y, XB, eta, steps)
    z_mean = (np.asarray(th.mean1).ravel() - m) / sm
    z_cov = (np.asarray(th.cov1) - c) / sc
    assert np.max(np.abs(z_mean)) < 4.5 and np.max(np.abs(z_cov)) < 4.5, (z_mean, z_cov)
    assert np.max(sc) < 0.15 * np.max(np.abs(np.asarray(th.cov1)))  # resolved


# --------------------------------------------------------------------------------------------
# Real networks trained by gradient descent (small CI version of benchmarks/validate_trained_nlo.py).


@pytest.mark.slow
def test_trained_mean_and_covariance_match_gd_trained_ensembles():
    """tanh, depth 3, 1-D data with a well-conditioned Θ̃ (κ ≈ 10), η = 1/λ_max, trained to convergence:
    n·(ensemble − order 0) at three widths, fitted by c + b/n, equals the 1/n coefficient at every test
    input (two interpolation points and one extrapolation point) for the mean and for every entry of
    the covariance, and the order-0 prediction is rejected.  The mean's control variate removes the
    H^{1} part of the coefficient (tests/theory/ntk_mc.py; H^{1} is tested in test_ntk_stats_mc.py)."""
    XA1 = np.array([[-1.2], [0.1], [1.3]])
    YA1 = np.array([[0.5], [-0.4], [0.3]])
    XB1 = np.array([[-0.6], [0.6], [2.0]])
    mk = lambda n: ep.MLPSpec(1, (n, n), 1, "tanh", C_b=0.1, C_W=1.5, lambda_b=0.5, lambda_W=1.0)
    X1 = np.concatenate([XA1, XB1])
    st = ntk_statistics(mk(8), X1, derivatives=False)
    K, Th = np.asarray(st.K), np.asarray(st.Theta)
    eta = 1.0 / np.linalg.eigvalsh(Th[:3, :3])[-1]
    th = nlo_trained_coefficients(mk(8), XA1, YA1, XB1, eta)
    iu = np.triu_indices(3)
    pred = np.concatenate([(np.asarray(th.mean1) - h1_mean_part(np.asarray(st.H1), Th, 3, YA1)).ravel(),
                           np.asarray(th.cov1)[iu]])  # fmt: skip
    widths, sizes = (16, 32, 64), (4000, 2500, 1500)
    vals, ses = [], []
    for i, (n, M) in enumerate(zip(widths, sizes)):
        ens = trained_ensemble(mk(n), XA1, YA1, XB1, eta, 300, M, jax.random.key(500 + i))
        assert ens["loss"].max() < 1e-5  # converged (outputs within ~√loss of the minimum)
        m, sm, c, sc = trained_moment_estimates(ens, K, Th, 3, YA1)
        base = np.concatenate([np.asarray(th.mean0).ravel(), np.asarray(th.cov0)[iu]])
        vals.append(n * (np.concatenate([m.ravel(), c[iu]]) - base))
        ses.append(n * np.concatenate([sm.ravel(), sc[iu]]))
    vals, ses = np.array(vals), np.array(ses)
    resolved = 0
    for j in range(pred.size):
        (c, _), (sc, _), _ = fit_inverse_powers(widths, vals[:, j], ses[:, j], (0, 1))
        assert abs(c - pred[j]) <= 4 * sc, (j, c, sc, pred[j])
        resolved += abs(pred[j]) > 4 * sc
    assert resolved >= 4  # the 1/n terms are resolved (order 0 alone is rejected) for most quantities


# --------------------------------------------------------------------------------------------
# Per-test-input marginals for many test inputs (nlo_trained_marginals).


def _blocks(C, nB, nL):
    return np.einsum("bibj->bij", np.asarray(C).reshape(nB, nL, nB, nL))


XT5 = np.array([[0.6, 0.5], [-1.2, -0.3], [0.1, 1.1], [0.9, -0.7], [-0.4, -1.3]])


@pytest.mark.parametrize("eta, steps", [(None, None), (0.3, 7)])
def test_marginals_are_the_diagonal_blocks_of_the_joint_moments(eta, steps):
    # Restricting the tables to entries whose test indices are all one input (batches padded by
    # repeating the last test input) must not change those entries: exact up to rounding.
    spec = _spec(2)
    joint = nlo_trained_coefficients(spec, XA, YA, XT5, eta, steps)
    for batch_size in (1, 2, None):
        m = nlo_trained_marginals(spec, XA, YA, XT5, eta, steps, batch_size=batch_size)
        assert m.mean1.shape == (5, 2) and m.cov1.shape == (5, 2, 2) and m.width == 16
        for got, want in [
            (m.mean0, joint.mean0),
            (m.mean1, joint.mean1),
            (m.cov0, _blocks(joint.cov0, 5, 2)),
            (m.cov1, _blocks(joint.cov1, 5, 2)),
        ]:
            scale = np.abs(np.asarray(want)).max()
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-11 * scale)
        at, ref = m.at(40.0), joint.at(40.0)
        np.testing.assert_allclose(np.asarray(at.variance), np.diag(np.asarray(ref.cov)).reshape(5, 2), rtol=1e-10)
    # the 1/n covariance couples the two outputs of one test input
    assert np.abs(np.asarray(m.cov1)[:, 0, 1]).max() > 1e-3 * np.abs(np.asarray(m.cov1)).max()


def test_marginals_compute_the_training_tables_once(monkeypatch):
    """The Gaussian tables of the training inputs alone are computed once and shared by every batch:
    the statistics equal those of a pass that computes them itself, and the shared ones are used."""
    from eft_prob.theory import training
    from eft_prob.theory.ntk_stats import _STATS

    spec = _spec(1)
    X = np.concatenate([XA, XT5[3:]])  # 5 training inputs: five four-input training-only tables
    X_all = jnp.concatenate([jnp.asarray(X), jnp.asarray(XT5[:1])])
    shared = training._training_tables(spec, jnp.asarray(X))
    assert sorted(shared) == [1, 2, 3, 4] and all(v.shape[0] == spec.depth - 1 for v in shared.values())
    own = training._trained_statistics(spec, X_all, 5, orders=(3, 3, -1))
    used = training._trained_statistics(spec, X_all, 5, orders=(3, 3, -1), shared=shared)
    doubled = {m: 2 * v for m, v in shared.items()}
    wrong = training._trained_statistics(spec, X_all, 5, orders=(3, 3, -1), shared=doubled)
    for k in _STATS:
        a, b = np.asarray(getattr(own, k)), np.asarray(getattr(used, k))
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-13 * np.abs(a).max(), err_msg=k)
    assert not np.allclose(np.asarray(wrong.A), np.asarray(own.A))
    calls = []
    monkeypatch.setattr(training, "_training_tables", lambda *a: calls.append(1) or shared)
    y = np.sin(X[:, :1])
    m = nlo_trained_marginals(spec, X, y, XT5[:3], 0.3, batch_size=1)
    assert len(calls) == 1 and np.all(np.isfinite(m.cov1))


def test_marginals_under_jit():
    spec = _spec(1)
    y = YA[:, :1]
    eager = nlo_trained_marginals(spec, XA, y, XT5[:3], 0.3, batch_size=2)
    f = jax.jit(lambda Xt: nlo_trained_marginals(spec, XA, y, Xt, 0.3, batch_size=2))
    traced = f(XT5[:3])
    for a, b in zip(traced[:4], eager[:4]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="outside jit"):
        jax.jit(lambda Xt: nlo_trained_marginals(spec, XA, y, Xt, 0.3, progress=True).mean1)(XT5[:3])


def test_marginals_checkpoint_resumes_after_a_crash(tmp_path, monkeypatch, capsys):
    from eft_prob.theory import training

    spec = _spec(1)
    y = YA[:, :1]
    full = nlo_trained_marginals(spec, XA, y, XT5, 0.3, batch_size=2)
    path = tmp_path / "marginals.npz"
    calls = []

    def crash(i):
        calls.append(i)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_after_batch_hook", crash)
    with pytest.raises(KeyboardInterrupt):
        nlo_trained_marginals(spec, XA, y, XT5, 0.3, batch_size=2, checkpoint=path)
    assert calls == [0, 1] and path.exists()
    with np.load(path) as z:
        assert int(z["done"]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name != path.name]  # no temporary files left
    calls.clear()
    monkeypatch.setattr(training, "_after_batch_hook", calls.append)
    again = nlo_trained_marginals(spec, XA, y, XT5, 0.3, batch_size=2, checkpoint=path, progress=True)
    assert calls == [2]  # only the last batch was computed
    err = capsys.readouterr().err
    assert "resumed from" in err and "2/3 batches done" in err and "batch 3/3, 5/5 test inputs" in err
    for a, b in zip(again[:4], full[:4]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a finished checkpoint computes nothing; other arguments are refused, naming them
    calls.clear()
    nlo_trained_marginals(spec, XA, y, XT5, 0.3, batch_size=2, checkpoint=path)
    assert calls == []
    with pytest.raises(ValueError, match=r"different arguments.*X_test"):
        nlo_trained_marginals(spec, XA, y, XT5 + 1.0, 0.3, batch_size=2, checkpoint=path)
    with pytest.raises(ValueError, match=r"different arguments.*batch_size"):
        nlo_trained_marginals(spec, XA, y, XT5, 0.3, batch_size=1, checkpoint=path)
    with pytest.raises(ValueError, match="file path"):
        nlo_trained_marginals(spec, XA, y, XT5, 0.3, checkpoint=tmp_path)
    path.write_bytes(b"not an npz file")
    with pytest.raises(ValueError, match="unreadable"):
        nlo_trained_marginals(spec, XA, y, XT5, 0.3, batch_size=2, checkpoint=path)


def test_marginals_errors_and_cost_warning():
    from eft_prob.theory.training import _warn_marginal_cost

    y = YA[:, :1]
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            nlo_trained_marginals(_spec(1), XA, y, XB, batch_size=bad)
    with pytest.raises(ValueError, match="kinked"):
        nlo_trained_marginals(ep.MLPSpec(2, (8, 8), 1, "relu", C_W=2.0), XA, y, XB)
    with pytest.raises(ValueError, match="stability bound"):
        nlo_trained_marginals(_spec(1), XA, y, XB, 50.0)
    with pytest.raises(ValueError, match="X_test"):
        nlo_trained_marginals(_spec(1), XA, y, XB[:, :1])
    with pytest.raises(ValueError, match="checkpoint must be a file path"):
        nlo_trained_marginals(_spec(1), XA, y, XB, checkpoint=3)
    with pytest.warns(ep.CostWarning, match=r"C\(N_A, 3\) = 4960"):
        _warn_marginal_cost(32, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_marginal_cost(16, 16)


def test_sizes_beyond_the_memory_limit_fail_before_any_work(monkeypatch):
    """100 training + 900 test inputs at depth 10 (issue 7's size): the marginals' training-only
    tables alone are ~97 GiB, so both paths refuse at once with the sizes and the alternatives,
    instead of exhausting memory; the table count is the layout's, without enumerating subsets."""
    from eft_prob.theory import ntk_stats
    from eft_prob.theory.training import _table_doubles

    for nA, nB, orders in ((5, 3, (3, 3, 2)), (8, 24, (3, 3, -1)), (6, 0, (3,))):
        layout = ntk_stats._table_layout(nA + nB, 3, (nA, orders) if nB else None)
        count = sum(len(s) * len(ntk_stats._basis(q, 5 - m)) ** m for m, g in layout.items() for q, s in g)
        assert _table_doubles(nA, nB, orders) == count

    def no_work(*args, **kwargs):
        raise AssertionError("started computing")

    monkeypatch.setattr("eft_prob.theory.training._trained_statistics", no_work)
    monkeypatch.setattr("eft_prob.theory.training._training_tables", no_work)
    rng = np.random.default_rng(0)
    spec = ep.MLPSpec.at_criticality(3, (64,) * 9, 1, "tanh")
    X, Xt, y = rng.normal(size=(100, 3)), rng.normal(size=(900, 3)), rng.normal(size=(100, 1))
    with pytest.raises(
        ValueError, match=r"N_A = 100 .* at least 10\d GiB .*training-only tables of 9 layers: 97.4 GiB"
    ):
        nlo_trained_marginals(spec, X, y, Xt)
    with pytest.raises(ValueError, match=r"N_A \+ N_B = 40 \+ 60 inputs .* dense state, 11 arrays of N⁴ = 100⁴"):
        nlo_trained_coefficients(spec, X[:40], y[:40], Xt[:60])
    with pytest.raises(ValueError, match=r"above the limit of 1e-06 GiB \(memory_limit_gib\).*memory_limit_gib="):
        nlo_trained_marginals(_spec(1), XA, YA[:, :1], XB, memory_limit_gib=1e-6)
    with pytest.raises(ValueError, match="memory_limit_gib must be a number > 0"):
        nlo_trained_coefficients(_spec(1), XA, YA[:, :1], XB, memory_limit_gib=0)
    monkeypatch.setenv("EFT_PROB_MEMORY_LIMIT_GIB", "2e-6")
    with pytest.raises(ValueError, match=r"above the limit of 2e-06 GiB \(EFT_PROB_MEMORY_LIMIT_GIB\)"):
        nlo_trained_coefficients(_spec(1), XA, YA[:, :1], XB)
    monkeypatch.setenv("EFT_PROB_MEMORY_LIMIT_GIB", "lots")
    with pytest.raises(ValueError, match="EFT_PROB_MEMORY_LIMIT_GIB must be a number > 0 \\(GiB\\), got 'lots'"):
        nlo_trained_marginals(_spec(1), XA, YA[:, :1], XB)


_TWO_DEVICES = """
import sys, warnings
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
warnings.simplefilter("error")
import eft_prob as ep
from eft_prob.theory import training

inputs, out, ck = sys.argv[1:4]
z = np.load(inputs)
spec = ep.MLPSpec(2, (16,), 2, "tanh", C_b=0.1, C_W=1.2, lambda_b=0.4, lambda_W=1.0)  # one hidden layer
devices = jax.devices()
assert len(devices) == 2 and jax.local_devices()[0].platform == "cpu"
args = (spec, z["X"], z["y"], z["X_test"], 0.3, 7)
hooked = []
def crash(i):
    hooked.append(i)
    raise KeyboardInterrupt
training._after_batch_hook = crash
try:  # the first group (batches 0 and 1, one per device) is stored, then the run stops
    training.nlo_trained_marginals(*args, batch_size=2, checkpoint=ck, devices=devices)
except KeyboardInterrupt:
    pass
assert hooked == [1], hooked
assert int(np.load(ck)["done"]) == 2
training._after_batch_hook = hooked.append
m = training.nlo_trained_marginals(*args, batch_size=2, checkpoint=ck, devices=devices, progress=True)
assert hooked == [1, 2], hooked  # the resumed run computed the last group (batch 2 and a padded copy)
np.savez(out, **{k: np.asarray(getattr(m, k)) for k in training._MARGINAL_FIELDS})
# the memory pre-check counts one pass per simulated CPU device (they share the host's memory)
shared = training._table_doubles(3, 0, (3,))  # the training-only tables of the one layer step
one_pass = 8 * training._N4_STATS * 5**4 + 8 * (training._table_doubles(3, 2, (3, 3, -1)) - shared)
limit = (8 * shared + 1.5 * one_pass) / 2**30  # one pass fits, two do not
try:
    training.nlo_trained_marginals(*args, batch_size=2, devices=devices, memory_limit_gib=limit)
    raise AssertionError("no MemoryLimitError")
except ep.MemoryLimitError as e:
    assert "2 concurrent passes" in str(e), str(e)
"""


@pytest.mark.slow
def test_marginals_run_one_batch_per_device(tmp_path):
    """Two simulated CPU devices (a subprocess: XLA_FLAGS before JAX starts): the batches run one per
    device (shard_map), checkpointed and resumed by groups, and give this process's one-device
    moments to rounding; the default on a CPU host is one device."""
    import os
    import subprocess
    import sys

    from eft_prob.theory import training

    spec = ep.MLPSpec(2, (16,), 2, "tanh", **KW)  # as in the subprocess
    np.savez(tmp_path / "in.npz", X=XA, y=YA, X_test=XT5)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env.pop("JAX_ENABLE_X64", None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    files = [str(tmp_path / name) for name in ("in.npz", "out.npz", "ck.npz")]
    r = subprocess.run([sys.executable, "-c", _TWO_DEVICES, *files], env=env, cwd=root, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "2/3 batches done" in r.stderr and "batch 3/3, 5/5 test inputs" in r.stderr
    got = dict(np.load(tmp_path / "out.npz"))
    ref = nlo_trained_marginals(spec, XA, YA, XT5, 0.3, 7, batch_size=2)
    for k in training._MARGINAL_FIELDS:
        w = np.asarray(getattr(ref, k))
        np.testing.assert_allclose(got[k], w, rtol=0, atol=1e-12 * np.abs(w).max(), err_msg=k)
    with pytest.raises(ValueError, match="devices must"):
        nlo_trained_marginals(spec, XA, YA, XT5, 0.3, devices=[])
    with pytest.raises(ValueError, match="devices must not repeat"):
        nlo_trained_marginals(spec, XA, YA, XT5, 0.3, devices=jax.devices() * 2)
