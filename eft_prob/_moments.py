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
