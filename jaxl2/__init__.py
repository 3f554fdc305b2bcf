"""jaxl2: L2 regularization ``λ/2·Σw²`` of the weights of fully connected layers in JAX.

The library: jax, numpy and optax only. The public API, re-exported from the modules that
implement it:

* the penalty — :func:`l2_penalty`, :func:`regularized`, :func:`selected`; selection rules and
  presets in :mod:`jaxl2.select`;
* conventions — :func:`from_keras`, :func:`to_keras`, :func:`from_torch_weight_decay`,
  :func:`from_decoupled`, :func:`from_sklearn_alpha`;
* checks — :func:`gradcheck`;
* errors — :class:`Jaxl2Error` (a ``ValueError``) for bad input.

The MNIST reference application lives in :mod:`jaxl2.mnist` (the ``mnist`` extra).

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
from jaxl2.errors import Jaxl2Error
from jaxl2.gradcheck import GradcheckReport, gradcheck
from jaxl2.penalty import Row, Selection, l2_penalty, regularized, selected

__version__ = "0.2.0"

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
    "Jaxl2Error",
]
