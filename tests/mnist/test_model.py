"""The MLP (jaxl2.mnist.model)."""

import jax
import jax.numpy as jnp

from jaxl2.mnist.config import Config
from jaxl2.mnist.model import model_of


def test_classic_init_is_standard_normal():
    cfg = Config(init="normal", activation="identity")
    k = model_of(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))["params"]["Dense_0"]["kernel"]
    assert abs(float(jnp.std(k)) - 1.0) < 0.01 and abs(float(jnp.mean(k))) < 0.01
