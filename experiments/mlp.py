"""A plain MLP (Dense layers named fc1, fc2, ...) used by the MNIST experiment and tests."""

from __future__ import annotations

from typing import Sequence

import jax
import flax.linen as nn


class MLP(nn.Module):
    """x (batch, features) -> logits (batch, features[-1]); ReLU between layers."""

    features: Sequence[int] = (128, 256, 10)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.features):
            x = nn.Dense(width, name=f"fc{i + 1}")(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x
