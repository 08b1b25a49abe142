"""Moments of an (N, n_L) output event whose output neurons are independent with one shared
covariance S across inputs: Cov(f_{αi}, f_{βj}) = δ_ij S_αβ."""

from __future__ import annotations

import jax.numpy as jnp
from numpyro.distributions.util import lazy_property


def flat_covariance(S, nL: int):
    """S ⊗ 1_{n_L} over the flattened event, (…, N, N) -> (…, N·n_L, N·n_L), index α·n_L + i."""
    N = S.shape[-1]
    eye = jnp.eye(nL, dtype=S.dtype)
    return (S[..., :, None, :, None] * eye[:, None, :]).reshape(S.shape[:-2] + (N * nL, N * nL))


class SharedInputCovariance:
    """Mixin for numpyro Distributions with event (N, n_L) and an ``input_covariance`` S (…, N, N)
    shared by the output neurons: their ``variance`` and ``covariance_matrix``."""

    @property
    def variance(self):
        d = jnp.diagonal(self.input_covariance, axis1=-2, axis2=-1)[..., None]
        return jnp.broadcast_to(d, self.batch_shape + self.event_shape)

    @lazy_property
    def covariance_matrix(self):
        """Covariance of the flattened event (…, N·n_L, N·n_L), index α·n_L + i."""
        S = jnp.broadcast_to(self.input_covariance, self.batch_shape + self.input_covariance.shape[-2:])
        return flat_covariance(S, self.event_shape[1])


def neuron_fourth_cumulant(C, event_shape, batch_shape):
    """κ4 of the flattened event (…, M, M, M, M), M = N·n_L, index α·n_L + i, of outputs that are
    Gaussian given a random kernel Ĝ with Cov(Ĝ_ab, Ĝ_cd) = C (…, N, N, N, N), i.i.d. over neurons:
    κ[(α1 i1)(α2 i2)(α3 i3)(α4 i4)] = δ_{i1i2}δ_{i3i4} C_{α1α2α3α4} + δ_{i1i3}δ_{i2i4} C_{α1α3α2α4}
    + δ_{i1i4}δ_{i2i3} C_{α1α4α2α3}.  M⁴ numbers: small events only."""
    N, nL = event_shape
    if (N * nL) ** 4 > 2**27:
        raise ValueError(
            f"fourth_cumulant would have (N·n_L)^4 = {(N * nL) ** 4} entries; use kernel_covariance (N^4) instead."
        )
    e = jnp.eye(nL, dtype=C.dtype)
    t1 = jnp.einsum("...abcd,ij,kl->...aibjckdl", C, e, e)
    t2 = jnp.einsum("...acbd,ik,jl->...aibjckdl", C, e, e)
    t3 = jnp.einsum("...adbc,il,jk->...aibjckdl", C, e, e)
    return (t1 + t2 + t3).reshape(tuple(batch_shape) + (N * nL,) * 4)
