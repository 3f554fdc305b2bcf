"""The reference network: a fully connected 784-256-256-10 MLP (Flax Linen).

Its params are ``params/Dense_{i}/{kernel,bias}``; the kernels are what jaxl2 penalises.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxl2.model import MLP
  >>> params = MLP().init(jax.random.key(0), jnp.zeros((1, 784)))
  >>> MLP().apply(params, jnp.zeros((2, 784))).shape
  (2, 10)
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "gelu": nn.gelu,
    "identity": lambda x: x,
}

__all__ = ["MLP", "ACTIVATIONS", "flops_per_example"]


class MLP(nn.Module):
    """Dense(h) → activation for each ``h`` in ``hidden``, then Dense(``num_classes``).

    ``activation="identity"`` gives the classic recipe's purely linear network.
    ``kernel_init`` defaults to Flax's LeCun normal; the classic recipe used N(0, 1).
    """

    hidden: Sequence[int] = (256, 256)
    num_classes: int = 10
    activation: str = "relu"
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x_BxD: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        h = x_BxD
        for width in self.hidden:
            h = act(nn.Dense(width, kernel_init=self.kernel_init)(h))
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(h)


def flops_per_example(sizes: Sequence[int]) -> int:
    """Training FLOPs for one example of an MLP with layer ``sizes`` (e.g. 784, 256, 256, 10).

    Forward ``2·Σ d_in·d_out``, weight gradients the same again, and input gradients for
    every layer but the first (its input is data): 1,211,392 for 784-256-256-10.
    """
    pairs = list(zip(sizes[:-1], sizes[1:]))
    macs = sum(a * b for a, b in pairs)
    return 2 * macs + 2 * macs + 2 * sum(a * b for a, b in pairs[1:])
