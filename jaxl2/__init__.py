"""jaxl2: L2 regularization ``λ/2·Σw²`` of fully connected layers in JAX/Flax.

The public API, re-exported from the modules that implement it:

* the penalty — :func:`l2_penalty`, :func:`regularized`, :func:`selected`, presets in :mod:`jaxl2.select`;
* conventions — :func:`from_keras`, :func:`to_keras`, :func:`from_torch_weight_decay`,
  :func:`from_decoupled`, :func:`from_sklearn_alpha`;
* checks — :func:`gradcheck`;
* training — :class:`Config`, :class:`Trainer`, :class:`TrainState`, :class:`MLP`, :func:`load_data`,
  :func:`train_and_evaluate`, :func:`train_sweep`, :func:`make_mesh`.

Example:
  >>> import jax.numpy as jnp, jaxl2
  >>> float(jaxl2.l2_penalty({"dense": {"kernel": jnp.ones((2, 2))}}, 0.5))  # 0.5/2 · 4
  1.0
"""

from jaxl2 import conventions, select
from jaxl2.conventions import (
    from_decoupled,
    from_keras,
    from_sklearn_alpha,
    from_torch_weight_decay,
    to_keras,
)
from jaxl2.data import load as load_data
from jaxl2.gradcheck import GradcheckReport, gradcheck
from jaxl2.model import MLP
from jaxl2.parallel import make_mesh
from jaxl2.penalty import Row, Selection, l2_penalty, regularized, selected
from jaxl2.run import train_and_evaluate
from jaxl2.sweep import train_sweep
from jaxl2.train import Config, Trainer, TrainState

__version__ = "0.1.0"

__all__ = [
    "select",
    "l2_penalty",
    "regularized",
    "selected",
    "Row",
    "Selection",
    "conventions",
    "from_keras",
    "to_keras",
    "from_torch_weight_decay",
    "from_decoupled",
    "from_sklearn_alpha",
    "gradcheck",
    "GradcheckReport",
    "Config",
    "Trainer",
    "TrainState",
    "MLP",
    "load_data",
    "train_and_evaluate",
    "train_sweep",
    "make_mesh",
]
