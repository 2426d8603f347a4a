"""Linen building blocks for users' own models: ``Dropout``, a drop-in for ``flax.linen.Dropout``
that draws its mask with ``lora_jax.dropout`` (one random byte per element).

    h = lora_jax.nn.Dropout(0.1)(h, deterministic=not train)   # needs the 'dropout' rng stream when training
"""

from __future__ import annotations

import flax.linen as nn
import jax

from .core.dropout import dropout


class Dropout(nn.Module):
    """Fast dropout as a linen module, same call as ``flax.linen.Dropout`` (without ``broadcast_dims``).

    Attributes:
      rate: drop probability in [0, 1) (quantised to k/256; see ``lora_jax.dropout``).
      deterministic: if True, the identity; may instead be passed at call time.
      rng_collection: the rng stream the mask is drawn from.
    """

    rate: float
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None, rng: jax.Array | None = None) -> jax.Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return inputs
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        return dropout(inputs, self.rate, rng)
