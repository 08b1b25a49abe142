"""The kernels of real finite networks converge to nngp / ntk, with an error falling like 1/n.

At width n, E[z z] = K + K^{1}/n + O(1/n²) and E[Ĥ] = Θ + H^{1}/n + O(1/n²) (THEORY.md §3.3,
§6.2).  For each width we estimate the ensemble averages with their Monte Carlo standard errors,
fit  estimate(n) = a/n + b  by weighted least squares, and require b = theory within 4 standard
errors — with a standard error small enough that a wrong factor anywhere would fail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eft_prob as ep
from tests.conftest import fit_inverse_width

X3 = 1.2 * np.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.7], [0.6, 0.1, -0.9]])
IU = np.triu_indices(3)


def _rb_kernel(spec, X, n_networks, key):
    """Rao–Blackwellized E[z^(L) z^(L)]: E[zz | layer L-1] = C_b + C_W mean_j σ(z_j)σ(z_j)."""
    zs = ep.ensemble.prior_outputs(spec, X, n_networks, key, layers=True)
    s = spec.activation.fn(zs[-2])  # (M, N, n_{L-1})
    C_b, C_W = spec.layer_values("C_b")[-1], spec.layer_values("C_W")[-1]
    G = C_b + C_W * jnp.einsum("man,mbn->mab", s, s) / s.shape[-1]
    G = np.asarray(G)
    return G.mean(0), G.std(0, ddof=1) / np.sqrt(G.shape[0])


def _sweep(widths, estimate):
    """Stack (estimate, s.e.) of the upper-triangle entries over widths; estimate(i, n) -> (m, se)."""
    pairs = [estimate(i, n) for i, n in enumerate(widths)]
    return np.array([m[IU] for m, _ in pairs]), np.array([se[IU] for _, se in pairs])


def _assert_limit(widths, est, ses, theory, what, rel_se):
    """Fit a/n + b entry by entry; b must equal the theory within 4 s.e., with a small s.e."""
    fits = []
    for e in range(est.shape[1]):
        _, b, _, se_b, chi2 = fit_inverse_width(widths, est[:, e], ses[:, e])
        assert abs(b - theory[IU][e]) <= 4 * se_b, (what, e, b, theory[IU][e], se_b)
        assert se_b < rel_se * abs(theory[IU][e]) + 1e-3  # the test has teeth
        fits.append(chi2)
    return fits


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, C_b, C_W",
    [("tanh", 0.2, 1.5), ("relu", 0.1, 2.0), ("erf", 0.0, np.pi / 4)],
)
def test_nngp_of_finite_networks_converges_like_one_over_width(name, C_b, C_W):
    widths = (16, 32, 64, 128)
    K = np.asarray(ep.theory.nngp(ep.MLPSpec(3, (8, 8), 1, name, C_b=C_b, C_W=C_W), X3))
    est, ses = _sweep(
        widths,
        lambda i, n: _rb_kernel(ep.MLPSpec(3, (n, n), 1, name, C_b=C_b, C_W=C_W), X3, 16000, jax.random.key(100 + i)),
    )
    chi2s = _assert_limit(widths, est, ses, K, name, rel_se=0.01)
    assert max(chi2s) < 20  # four widths, two parameters: the 1/n form describes the data
    # the Gaussian-limit error at the largest width is small but, off-diagonal, resolvable
    assert np.all(np.abs(est[-1] - K[IU]) < 0.05 * np.abs(K[IU]) + 5 * ses[-1])


def _ntk_mean(spec, X, n_networks, key, chunk=250):
    def one(k):
        H = ep.nn.empirical_ntk(spec, ep.nn.init(spec, k), X)  # (n_L, n_L, N, N)
        return jnp.mean(jnp.diagonal(H, axis1=0, axis2=1), axis=-1)  # mean over i of Ĥ_ii

    f = jax.jit(jax.vmap(one))
    keys = jax.random.split(key, n_networks)
    out = np.concatenate([np.asarray(f(keys[c : c + chunk])) for c in range(0, n_networks, chunk)])
    return out.mean(0), out.std(0, ddof=1) / np.sqrt(n_networks)


@pytest.mark.slow
@pytest.mark.parametrize("name, C_b, C_W", [("tanh", 0.2, 1.5), ("relu", 0.0, 2.0)])
def test_ntk_of_finite_networks_converges_like_one_over_width(name, C_b, C_W):
    widths = (16, 32, 64)
    kw = dict(C_b=C_b, C_W=C_W, lambda_b=0.3, lambda_W=1.0)
    Theta = np.asarray(ep.theory.ntk(ep.MLPSpec(3, (8, 8), 2, name, **kw), X3))
    est, ses = _sweep(
        widths,
        lambda i, n: _ntk_mean(ep.MLPSpec(3, (n, n), 2, name, **kw), X3, 3000, jax.random.key(200 + i)),
    )
    _assert_limit(widths, est, ses, Theta, name, rel_se=0.03)
