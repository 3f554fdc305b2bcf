"""The reference network: a fully connected 784-256-256-10 MLP (Flax Linen).

Its params are ``params/Dense_{i}/{kernel,bias}``; the kernels are what jaxl2 penalises.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxl2.mnist.model import MLP
  >>> params = MLP().init(jax.random.key(0), jnp.zeros((1, 784)))
  >>> MLP().apply(params, jnp.zeros((2, 784))).shape
  (2, 10)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxl2
from jaxl2 import select
from jaxl2.mnist.config import ACTIVATIONS, INITS, INPUT_DIM, NUM_CLASSES, Config, ConfigError, field

__all__ = ["MLP", "model_of", "selector_of", "abstract_params", "check_selection", "reference_problem"]

ACTIVATION_FNS = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "gelu": nn.gelu,
    "identity": lambda x: x,
}
INITIALIZERS = {
    "lecun_normal": nn.initializers.lecun_normal(),  # Flax's default for Dense
    "normal": nn.initializers.normal(1.0),  # N(0, 1): the classic TF1 recipe's tf.random_normal
}
assert tuple(ACTIVATION_FNS) == ACTIVATIONS and tuple(INITIALIZERS) == INITS


class MLP(nn.Module):
    """Dense(h) → activation for each ``h`` in ``hidden``, then Dense(``num_classes``).

    ``activation="identity"`` gives the classic recipe's purely linear network.
    ``kernel_init`` defaults to Flax's LeCun normal; the classic recipe used N(0, 1).
    """

    hidden: Sequence[int] = (256, 256)
    num_classes: int = NUM_CLASSES
    activation: str = "relu"
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x_BxD: jax.Array) -> jax.Array:
        act = ACTIVATION_FNS[self.activation]
        h = x_BxD
        for width in self.hidden:
            h = act(nn.Dense(width, kernel_init=self.kernel_init)(h))
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(h)


def model_of(cfg: Config) -> MLP:
    """The MLP that ``cfg`` describes (``hidden``, ``activation``, ``init``)."""
    return MLP(hidden=tuple(cfg.hidden), activation=cfg.activation, kernel_init=INITIALIZERS[cfg.init])


def selector_of(cfg: Config) -> select.Selector:
    """``cfg.select``: ``None`` or ``"kernels"`` (the default preset), else a regex over paths;
    every leaf (``".*"``) with ``evidence_prior`` all."""
    if cfg.evidence_prior == "all":
        return ".*"
    return None if cfg.select in (None, "kernels") else cfg.select


def abstract_params(cfg: Config) -> Any:
    """The params' shapes and dtypes, without computing them."""
    return jax.eval_shape(model_of(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, INPUT_DIM)))


def check_selection(cfg: Config) -> None:
    """``cfg.select`` and ``cfg.l2`` against the model's params (an empty match is an error)."""
    params, selector = abstract_params(cfg), selector_of(cfg)
    try:
        select.resolve(params, selector)
    except jaxl2.Jaxl2Error:
        paths = ", ".join(p for p, _ in select.leaves(params))
        raise ConfigError(
            f"{field('select')} {cfg.select!r} matched no parameter (kernels, or a regex over the "
            f"paths: {paths})"
        ) from None
    try:
        jaxl2.selected(params, None if isinstance(cfg.l2, str) else cfg.l2, select=selector)
    except jaxl2.Jaxl2Error as e:
        raise ConfigError(f"{field('l2')}: {e}") from None


def reference_problem(cfg: Config, batch: int = 64, seed: int = 0):
    """``(loss_fn, params, (x, y))``: cross-entropy of the MLP of ``cfg`` on random data, with
    non-zero biases (so that "zero gradient on the biases" is a real check)."""
    model = model_of(cfg)
    kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
    params = model.init(kp, jnp.zeros((1, INPUT_DIM)))
    params = jax.tree_util.tree_map_with_path(
        lambda kp_, x: x + 0.1 if select.path_str(kp_).endswith("bias") else x, params
    )
    x_BxD = jax.random.uniform(kx, (batch, INPUT_DIM))
    y_B = jax.random.randint(ky, (batch,), 0, NUM_CLASSES)

    def loss_fn(p, x, y):
        logits = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn, params, (x_BxD, y_B)
