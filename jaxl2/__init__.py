"""jaxl2: L2 regularization ``λ/2·Σw²`` of fully connected layers in JAX/Flax.

The public API, re-exported from the modules that implement it.
"""

from jaxl2 import conventions, select
from jaxl2.conventions import (
    from_decoupled,
    from_keras,
    from_sklearn_alpha,
    from_torch_weight_decay,
    to_keras,
)
from jaxl2.gradcheck import GradcheckReport, gradcheck
from jaxl2.penalty import Row, Selection, l2_penalty, regularized, selected

__version__ = "0.1.0"

__all__ = [
    "select",
    "l2_penalty",
    "regularized",
    "selected",
    "Row",
    "Selection",
    "from_keras",
    "to_keras",
    "from_torch_weight_decay",
    "from_decoupled",
    "from_sklearn_alpha",
    "gradcheck",
    "GradcheckReport",
    "conventions",
]
