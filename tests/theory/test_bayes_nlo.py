"""Bayesian learning at O(1/n) (THEORY.md §5.2): the analytic posterior moments, evidence and kernel shift.

Checked against (i) the network-free oracle O10 of THEORY.md §11, (ii) a brute-force Gauss–Hermite
integration of the Edgeworth density of §3.6 (an independent numpy implementation, exact for the
polynomial integrands), (iii) the exact Bayesian update of the O(1/n) prior mixture, whose moments
must agree to O(1/n²), and (iv) the infinite-width limit at rate 1/n.
"""

import itertools
import warnings

import jax
import numpy as np
import pytest

import eft_prob as ep
from eft_prob.distributions import FiniteWidthPosterior
from eft_prob.theory import prior_statistics
from eft_prob.theory.bayes import (
    _factored_cross,
    _training,
    gp_moments,
    gp_posterior,
    log_evidence,
    nlo_kernel_shift,
    nlo_log_evidence,
    nlo_moments,
    nlo_posterior_moments,
    posterior_kernel_shift,
)

SPEC = ep.MLPSpec.at_criticality(2, (64, 64), 2, "tanh")
X = np.array([[1.0, 0.3], [-0.4, 0.9], [0.2, -1.1]])
XT = np.array([[0.5, 0.5], [-0.8, -0.2]])
Y = np.array([[0.8, -0.3], [0.1, 0.6], [-0.5, 0.2]])
S2 = 0.05


@pytest.fixture(scope="module")
def stats():
    """Prior statistics on X ∪ X_test (exact dense V); K, K^{1}, V do not depend on the width."""
    return prior_statistics(SPEC, np.concatenate([X, XT]))


def _o10():
    G = np.array([[1.0, 0.6, 0.3], [0.6, 1.2, 0.5], [0.3, 0.5, 0.9]])
    M = np.array([[1.0, 0.2, 0.7], [0.2, 0.8, -0.1], [0.7, -0.1, 1.1]])
    V = 0.4 * np.einsum("ab,cd->abcd", M, M) + 0.25 * (np.einsum("ac,bd->abcd", M, M) + np.einsum("ad,bc->abcd", M, M))
    y = np.array([[1.0, -0.5], [0.3, 0.8]]).T  # O10 lists rows = neurons
    return G, V, y


def _nlo_parts(r, nL):
    """(mean correction, covariance correction) = the explicit V/n terms of the formulas."""
    return np.asarray(r.mean - r.gp_mean), np.asarray(r.covariance) - np.kron(np.asarray(r.gp_covariance), np.eye(nL))


# --------------------------------------------------------------------------------------------
# Independent oracles.


def test_oracle_O10():
    """THEORY.md §11 O10 (network-free, noise-free, n = 10), every printed digit."""
    G, V, y = _o10()
    r = nlo_moments(G, V, 10, y)
    dm, dc = _nlo_parts(r, 2)
    np.testing.assert_allclose(r.gp_mean, [[-0.119048, 0.326190]], atol=5e-7)
    np.testing.assert_allclose(dm, [[-0.200538, 0.046712]], atol=5e-7)
    np.testing.assert_allclose(r.gp_covariance, [[0.688095]], atol=5e-7)
    np.testing.assert_allclose(dc, [[0.146238, -0.060707], [-0.060707, -0.094151]], atol=5e-7)
    e0 = nlo_log_evidence(G, np.zeros_like(V), 10, y)
    assert float(e0) == pytest.approx(-4.995448, abs=5e-7)
    assert float(nlo_log_evidence(G, V, 10, y) - e0) == pytest.approx(-0.143791, abs=5e-7)
    assert float(r.log_evidence) == pytest.approx(float(nlo_log_evidence(G, V, 10, y)), rel=1e-13)
    # degenerate V built from G itself: nothing to project, no mean correction (O10)
    Vg = 0.3 * np.einsum("ab,cd->abcd", G, G) + 0.2 * (np.einsum("ac,bd->abcd", G, G) + np.einsum("ad,bc->abcd", G, G))
    dm, _ = _nlo_parts(nlo_moments(G, Vg, 10, y), 2)
    np.testing.assert_allclose(dm, 0.0, atol=1e-13)


def _edgeworth_first_order(G, V, y, noise_var, n_test, nodes=4):
    """O(1/n) coefficients of the posterior moments and the log evidence of the Edgeworth density
    p(f) = N(f; 0, 1⊗G)[1 + κ·h/24] with κ = (1/n)(V δδ + 2 perms), h the 4th Hermite tensor of 1⊗G
    (THEORY.md §3.6), conditioned on y = f_A + N(0, σ²): with q0 the Gaussian posterior and
    H = κ·h/24, log Z = log Z0 + E_q0[H], E[g|y] = E_q0[g] + Cov_q0(g, H) to first order.  The
    integrands are polynomials of degree <= 6, so Gauss–Hermite with 4 nodes per dimension is exact.
    Index a = (i, α) -> i·N + α; results reordered to (β, i)."""
    G, V, y = (np.asarray(a, float) for a in (G, V, y))
    nA, nL = y.shape
    N = nA + n_test
    M = nL * N
    d = np.eye(nL)
    kap = (
        np.einsum("abcd,ij,kl->iajbkcld", V, d, d)
        + np.einsum("acbd,ik,jl->iajbkcld", V, d, d)
        + np.einsum("adbc,il,jk->iajbkcld", V, d, d)
    ).reshape((M,) * 4)
    Sig = np.kron(d, G)
    Si = np.linalg.inv(Sig)
    A = np.array([i * N + a for i in range(nL) for a in range(nA)])
    B = np.array([i * N + b for i in range(nL) for b in range(nA, N)])
    yv = y.T.ravel()
    SAA = Sig[np.ix_(A, A)] + noise_var * np.eye(A.size)
    free = np.arange(M) if noise_var > 0 else B  # noise-free: f_A = y exactly
    SfA = Sig[np.ix_(free, A)]
    mu = SfA @ np.linalg.solve(SAA, yv)
    C = Sig[np.ix_(free, free)] - SfA @ np.linalg.solve(SAA, SfA.T)
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    grid = np.array(list(itertools.product(range(nodes), repeat=free.size)))
    pts = mu + x[grid] @ np.linalg.cholesky(C).T
    wt = np.prod(w[grid], axis=1)
    full = np.zeros((pts.shape[0], M))
    full[:, free] = pts
    if noise_var == 0:
        full[:, A] = yv
    u = full @ Si
    t4 = np.einsum("pa,pb,pc,pd,abcd->p", u, u, u, u, kap, optimize=True)
    t2 = np.einsum("pc,pd,abcd,ab->p", u, u, kap, Si, optimize=True)
    H = (t4 - 6 * t2 + 3 * np.einsum("abcd,ab,cd->", kap, Si, Si)) / 24
    Hc = H - wt @ H
    fB = full[:, B]
    cen = fB - wt @ fB
    perm = np.array([i * n_test + b for b in range(n_test) for i in range(nL)])
    logz0 = -0.5 * yv @ np.linalg.solve(SAA, yv) - 0.5 * np.linalg.slogdet(2 * np.pi * SAA)[1]
    return {
        "mean0": (wt @ fB).reshape(nL, n_test).T,
        "mean1": (wt @ (cen * Hc[:, None])).reshape(nL, n_test).T,
        "cov0": np.einsum("p,pa,pb->ab", wt, cen, cen)[np.ix_(perm, perm)],
        "cov1": np.einsum("p,pa,pb,p->ab", wt, cen, cen, Hc)[np.ix_(perm, perm)],
        "logz0": logz0,
        "logz1": wt @ H,
    }


def _random_problem(rng, nA, nB, nL):
    N = nA + nB
    R = rng.normal(size=(N, N))
    G = R @ R.T / N + 0.5 * np.eye(N)
    # a vertex with exactly the symmetries of V (not of full permutation symmetry): a sum of
    # products of symmetric matrices and the crossed pairings of another
    S = [(lambda a: a + a.T)(rng.normal(size=(N, N))) for _ in range(3)]
    V = sum(c * np.einsum("ab,cd->abcd", s, s) for c, s in zip((0.3, 0.2, 0.1), S))
    V += 0.15 * (np.einsum("ac,bd->abcd", S[0], S[1]) + np.einsum("ad,bc->abcd", S[0], S[1]))
    V = (V + V.transpose(1, 0, 2, 3)) / 2  # V_(12)(34) = V_(21)(34) = V_(12)(43) = V_(34)(12)
    V = (V + V.transpose(0, 1, 3, 2)) / 2
    V = (V + V.transpose(2, 3, 0, 1)) / 2
    return G, V, rng.normal(size=(nA, nL))


@pytest.mark.parametrize(
    ("nA", "nB", "nL", "noise_var"),
    [(2, 1, 2, 0.0), (2, 1, 2, 0.1), (1, 2, 2, 0.3), (2, 2, 1, 0.05), (1, 1, 1, 0.2)],
)
def test_formulas_equal_the_brute_force_edgeworth_integral(nA, nB, nL, noise_var):
    """The O(1/n) coefficients of mean, covariance (incl. test-test and neuron-neuron entries) and log
    evidence equal the first-order integral of the Edgeworth density, to quadrature (= rounding) accuracy."""
    G, V, y = _random_problem(np.random.default_rng(10 * nA + nB + nL), nA, nB, nL)
    b = _edgeworth_first_order(G, V, y, noise_var, nB)
    r = nlo_moments(G, V, 1.0, y, noise_var)  # width 1: the V terms are the coefficients themselves
    dm, dc = _nlo_parts(r, nL)
    scale = max(np.abs(b["mean1"]).max(), np.abs(b["cov1"]).max(), abs(b["logz1"]))
    np.testing.assert_allclose(r.gp_mean, b["mean0"], atol=1e-11)
    np.testing.assert_allclose(np.kron(r.gp_covariance, np.eye(nL)), b["cov0"], atol=1e-11)
    np.testing.assert_allclose(dm, b["mean1"], atol=1e-10 * scale)
    np.testing.assert_allclose(dc, b["cov1"], atol=1e-10 * scale)
    assert float(r.log_evidence) - b["logz0"] == pytest.approx(b["logz1"], abs=1e-10 * scale)
    assert np.abs(b["mean1"]).max() > 1e-2 and np.abs(b["cov1"]).max() > 1e-2  # the check has teeth
    if nL == 2:  # the posterior couples the two output neurons
        assert abs(b["cov1"][0, 1]) > 1e-3


def test_finite_n_edgeworth_ratio_converges_to_the_formula_at_rate_1_over_n():
    """(exact Edgeworth posterior mean at width n − order 0)·n → the formula's coefficient, error ∝ 1/n."""
    G, V, y = _random_problem(np.random.default_rng(5), 2, 1, 2)
    b = _edgeworth_first_order(G, V, y, 0.1, 1)
    coef = np.asarray(nlo_moments(G, V, 1.0, y, 0.1).mean) - b["mean0"]
    errs = []
    for n in (1e3, 1e4, 1e5):
        # with weights (1 + H/n) the exact ratio is (E0[g] + E0[g H]/n)/(1 + E0[H]/n)
        exact = b["mean0"] + (b["mean1"] / n) / (1 + b["logz1"] / n)
        errs.append(np.abs((exact - b["mean0"]) * n - coef).max())
    assert errs[-1] > 1e-8  # a visible O(1/n²) remainder (rounding is ~1e-13) ...
    np.testing.assert_allclose(np.array(errs[:2]) / np.array(errs[1:]), 10.0, rtol=0.02)  # ... shrinking like 1/n


# --------------------------------------------------------------------------------------------
# Exact properties.


def test_noise_free_conditioning_interpolates_training_points_exactly(stats):
    """noise_var = 0: at a training input the posterior is a point mass at y, 1/n terms included (O14)."""
    idx = np.array([0, 1, 2, 3, 4, 2, 0])  # X, X_test, then X rows 2 and 0 again as test inputs
    G = np.asarray(stats.K + stats.K1 / 64)[np.ix_(idx, idx)]
    V = np.asarray(stats.V)[np.ix_(idx, idx, idx, idx)]
    r = nlo_moments(G, V, 64, Y, 0.0)
    np.testing.assert_allclose(r.mean[2:], Y[[2, 0]], atol=1e-11)
    cov = np.asarray(r.covariance).reshape(4, 2, 4, 2)
    np.testing.assert_allclose(cov[2:, :, :, :], 0.0, atol=1e-11)
    assert np.abs(_nlo_parts(r, 2)[0][:2]).max() > 1e-3  # the test points do move


def test_small_noise_limit_of_the_spec_level_posterior():
    """At a training input, mean − y and the variance vanish ∝ σ² once σ² is below the kernel's
    smallest eigenvalue (here 1.4e-3: nearby tanh inputs at criticality are strongly correlated)."""
    xt = np.concatenate([X[:1], XT[:1]])
    dev, var = [], []
    for s2 in (1e-6, 1e-8):
        r = nlo_posterior_moments(SPEC, X, Y, xt, s2)
        dev.append(np.abs(np.asarray(r.mean[0]) - Y[0]).max())
        var.append(np.abs(np.asarray(r.covariance)[:2, :2]).max())
    assert dev[0] < 1e-3 and var[0] < 2e-6
    assert dev[1] / dev[0] == pytest.approx(1e-2, rel=0.1)
    assert var[1] / var[0] < 1e-2  # σ² times a factor that the 1/n term lowers further as σ² → 0


def test_spec_level_functions_are_the_network_free_formulas(stats):
    n = SPEC.hidden[-1]
    G = stats.K + stats.K1 / n
    r = nlo_posterior_moments(SPEC, X, Y, XT, S2)
    ref = nlo_moments(G, stats.V, n, Y, S2)
    for a, b in zip(r, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    ev = log_evidence(SPEC, X, Y, S2, order=1)
    assert float(ev) == pytest.approx(float(ref.log_evidence), rel=1e-12)
    assert float(ev) == pytest.approx(float(nlo_log_evidence(G[:3, :3], stats.V[:3, :3, :3, :3], n, Y, S2)), rel=1e-12)
    shift = posterior_kernel_shift(SPEC, X, Y, S2, XT)
    np.testing.assert_allclose(shift, nlo_kernel_shift(G, stats.V, n, Y, S2), rtol=1e-12, atol=1e-15)
    assert posterior_kernel_shift(SPEC, X, Y, S2).shape == (3, 3)
    # noise enters only through G̃ = G_AA + σ²: order 0 with the NLO metric is the gp part
    gp = gp_moments(G[:3, :3], G[:3, 3:], G[3:, 3:], Y, S2)
    np.testing.assert_allclose(r.gp_mean, gp.mean, rtol=1e-12)
    # the infinite-width function is the K-only version
    g0 = gp_posterior(SPEC, X, Y, XT, S2)
    np.testing.assert_allclose(g0.mean, gp_moments(stats.K[:3, :3], stats.K[:3, 3:], stats.K[3:, 3:], Y, S2).mean)


def test_factored_vertex_path_equals_the_dense_algebra():
    """Above 24 inputs V is a FactoredVertex; every contraction agrees with the same vertex made dense
    (including the rank-one shortcut for its last source layer)."""
    rng = np.random.default_rng(2)
    spec = ep.MLPSpec.at_criticality(2, (32, 32, 32), 2, "tanh")
    D = rng.normal(size=(9, 2))
    y = rng.normal(size=(5, 2))
    st = prior_statistics(spec, D, factored=True, samples=300)
    Vd = st.V.dense()
    G = st.K + st.K1 / 32
    a, b = nlo_moments(G, st.V, 32, y, 0.05), nlo_moments(G, Vd, 32, y, 0.05)
    for u, v in zip(a[:5], b[:5]):  # (the Monte Carlo standard errors exist for the factored V only)
        np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-12 * float(np.abs(v).max()))
    np.testing.assert_allclose(nlo_kernel_shift(G, st.V, 32, y, 0.05), nlo_kernel_shift(G, Vd, 32, y, 0.05), rtol=1e-10)
    tr = _training(G[:5, :5], y, 0.05)
    Proj = G[5:, :5] @ tr.Gt
    for u, v in zip(
        _factored_cross(st.V, tr.Gt, tr.F, tr.yt, Proj, last_rank_one=True),
        _factored_cross(st.V, tr.Gt, tr.F, tr.yt, Proj, last_rank_one=False),
    ):
        np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-13)


def test_factored_monte_carlo_standard_errors_are_calibrated():
    """Monte Carlo (factored V, S = 1024) minus exact (dense V) moments, in units of the reported
    standard errors: O(1) z-scores, neither inflated nor too optimistic."""
    rng = np.random.default_rng(4)
    D = rng.normal(size=(8, 2))
    y = rng.normal(size=(4, 2)) * 0.3
    exact = prior_statistics(SPEC, D)
    G = exact.K + exact.K1 / 64
    a = nlo_moments(G, exact.V, 64, y, 0.1)
    assert float(np.max(a.mean_se)) == 0.0  # dense V: no Monte Carlo
    z = []
    for k in range(3):
        mc = prior_statistics(SPEC, D, factored=True, samples=1024, key=jax.random.PRNGKey(k))
        b = nlo_moments(G, mc.V, 64, y, 0.1)
        z += [np.ravel((b.mean - a.mean) / b.mean_se), np.ravel((b.covariance - a.covariance) / b.covariance_se)]
        z.append([float((b.log_evidence - a.log_evidence) / b.log_evidence_se)])
    z = np.concatenate(z)
    rms = float(np.sqrt(np.mean(z**2)))
    assert 0.6 < rms < 1.6 and np.max(np.abs(z)) < 6, (rms, np.max(np.abs(z)))


# --------------------------------------------------------------------------------------------
# Scaling with the width.


WIDTHS = (64, 128, 256, 512)


def test_order_one_tends_to_order_zero_at_rate_1_over_n(stats):
    """(order 1 − order 0)·n is constant up to O(1/n): its change halves when n doubles."""
    K = np.asarray(stats.K)
    g0 = gp_moments(K[:3, :3], K[:3, 3:], K[3:, 3:], Y, S2)
    e0 = float(nlo_log_evidence(K, np.zeros_like(stats.V), 1, Y, S2))
    coef = []
    for n in WIDTHS:
        r = nlo_moments(stats.K + stats.K1 / n, stats.V, n, Y, S2)
        coef.append(
            np.concatenate(
                [
                    np.ravel(r.mean - g0.mean),
                    np.ravel(np.asarray(r.covariance) - np.kron(g0.cov, np.eye(2))),
                    [float(r.log_evidence) - e0],
                ]
            )
            * n
        )
    coef = np.array(coef)
    steps = np.abs(np.diff(coef, axis=0)).max(axis=1)
    assert np.abs(coef[-1]).max() > 0.1  # a resolved O(1/n) term
    assert np.all(steps[1:] / steps[:-1] < 0.6)  # 1/n convergence of n·(difference)
    assert steps[-1] < 0.01 * np.abs(coef[-1]).max()


def test_mixture_posterior_equals_the_formulas_up_to_O_1_over_n_squared(stats):
    """FiniteWidthPosterior (exact Bayes on the O(1/n) prior mixture) vs the §5.2 formulas: the
    difference × n² stays bounded (order-2 convergence) while each O(1/n) term × n is constant."""
    diffs, terms = [], []
    for n in WIDTHS:
        G = stats.K + stats.K1 / n
        d = FiniteWidthPosterior.from_statistics(G, stats.V, n, Y, S2)
        r = nlo_moments(G, stats.V, n, Y, S2)
        shift = nlo_kernel_shift(G, stats.V, n, Y, S2)
        dm, dc = _nlo_parts(r, 2)
        diffs.append(
            [
                np.abs(d.mean - r.mean).max(),
                np.abs(d.covariance_matrix - r.covariance).max(),
                abs(float(d.log_evidence - r.log_evidence)),
                np.abs(d.kernel_shift - shift).max(),
            ]
        )
        terms.append(
            [np.abs(dm).max(), np.abs(dc).max(), abs(float(r.log_evidence) - float(_gp_ev(G, n))), np.abs(shift).max()]
        )
    diffs, terms = np.array(diffs), np.array(terms)
    n = np.array(WIDTHS, float)[:, None]
    scaled = diffs * n**2
    assert np.all(scaled <= 1.5 * scaled[-1]) and np.all(scaled >= scaled[-1] / 1.5), scaled  # bounded
    order = np.log2(diffs[-2] / diffs[-1])
    assert np.all(order > 1.8), order  # second order
    np.testing.assert_allclose(terms * n, np.broadcast_to(terms[-1] * n[-1], terms.shape), rtol=0.05)  # ∝ 1/n
    assert np.all(diffs[-1] < 0.02 * terms[-1])  # and they are resolved by the comparison


def _gp_ev(G, n):
    return nlo_log_evidence(G, np.zeros((5,) * 4), n, Y, S2)


# --------------------------------------------------------------------------------------------
# Bad input and regime.


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"y must have shape \(N_train, output_dim\) = \(3, 2\)"):
        nlo_posterior_moments(SPEC, X, Y[:2], XT, S2)
    with pytest.raises(ValueError, match="y contains NaN"):
        nlo_posterior_moments(SPEC, X, np.where(Y > 0.7, np.nan, Y), XT, S2)
    for bad in (0.0, -1.0, np.nan):
        with pytest.raises(ValueError, match="noise_var must be a finite scalar > 0"):
            nlo_posterior_moments(SPEC, X, Y, XT, bad)
    with pytest.raises(ValueError, match="X_test row 1 equals X row 2"):
        nlo_posterior_moments(SPEC, X, Y, np.concatenate([XT[:1], X[2:]]), 0.0)
    with pytest.raises(ValueError, match="noise_var"):
        log_evidence(SPEC, X, Y, -0.1, order=1)
    with pytest.raises(ValueError, match="X_test must have shape"):
        nlo_posterior_moments(SPEC, X, Y, XT[:, :1], S2)
    with pytest.raises(ValueError, match="order must be 0"):
        log_evidence(SPEC, X, Y, S2, order=2)
    with pytest.raises(ValueError, match="hidden layer"):
        nlo_posterior_moments(ep.MLPSpec(2, (), 2, "tanh"), X, Y, XT, S2)
    with pytest.raises(ValueError, match=r"V must be \(N, N, N, N\)"):
        nlo_moments(np.eye(5), np.zeros((4,) * 4), 10, Y, S2)


def test_outside_the_regime_warns():
    spec = ep.MLPSpec.at_criticality(2, (4, 4), 2, "tanh")  # ε ≈ 0.3 on these inputs
    with pytest.warns(ep.RegimeWarning, match="nlo_posterior_moments"):
        nlo_posterior_moments(spec, X, Y, XT, S2)


@pytest.mark.parametrize("factored", [False, True])
def test_marginals_are_the_diagonal_of_the_joint_moments(factored):
    """nlo_posterior_marginals = the diagonal of nlo_posterior_moments (same statistics, same draws):
    exact algebra for the dense and the factored vertex, standard errors included."""
    from eft_prob.theory import nlo_posterior_marginals

    rng = np.random.default_rng(7)
    spec = ep.MLPSpec.at_criticality(2, (128, 128), 2, "relu")
    X, XT = rng.normal(size=(5, 2)), rng.normal(size=(6, 2))
    y = rng.normal(size=(5, 2)) * 0.5
    kw = dict(samples=256, last_samples=512) if factored else {}
    # force the path (by default factored only above 24 inputs)
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        import eft_prob.theory.vertex as vx

        mp.setattr(vx, "_DENSE_MAX", 0 if factored else 24)
        warnings.simplefilter("ignore", ep.ApproximationWarning)  # 256 draws: a large, reported MC error
        full = nlo_posterior_moments(spec, X, y, XT, 0.05, **kw)
        marg = nlo_posterior_marginals(spec, X, y, XT, 0.05, **kw)
    nB, nL = 6, 2
    var = np.diagonal(np.asarray(full.covariance)).reshape(nB, nL)
    np.testing.assert_allclose(marg.mean, full.mean, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(marg.variance, var, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(marg.gp_variance, np.diagonal(np.asarray(full.gp_covariance)), rtol=1e-12)
    np.testing.assert_allclose(marg.log_evidence, full.log_evidence, rtol=1e-12)
    se = np.diagonal(np.asarray(full.covariance_se)).reshape(nB, nL)
    np.testing.assert_allclose(marg.variance_se, se, rtol=1e-8, atol=1e-14)
    assert (float(np.max(marg.mean_se)) > 0) == factored
