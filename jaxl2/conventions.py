"""Conversions from other frameworks' L2 / weight-decay settings to jaxl2's λ.

jaxl2's convention is the classic recipe: the loss gains ``λ/2·Σw²``, the gradient
gains ``λ·w``.

| setting                                                | penalty       | gradient term | jaxl2 λ           |
|--------------------------------------------------------|---------------|---------------|-------------------|
| Keras ``regularizers.L2(l2)``                          | ``l2·Σw²``    | ``2·l2·w``    | ``2·l2``          |
| PyTorch ``SGD/Adam(weight_decay=wd)`` (coupled)        | —             | ``wd·w``      | ``wd``            |
| optax ``add_decayed_weights(wd)`` before the optimizer | —             | ``wd·w``      | ``wd``            |
| decoupled, plain SGD, ``lr·wd·w`` per step             | —             | ``wd·w``      | ``wd``            |
| decoupled, plain SGD, ``wd·w`` per step                | —             | ``wd/lr·w``   | ``wd/lr``         |
| scikit-learn ``Ridge(alpha)``, MSE loss, k targets     | ``alpha·Σw²`` | on a sum loss | ``2·alpha/(n·k)`` |

*Coupled* decay adds ``wd·w`` to the gradient before the optimizer sees it (PyTorch's
``weight_decay`` of ``SGD``/``Adam``; optax ``add_decayed_weights`` chained *before*
``sgd``/``adam``): that is exactly the gradient of ``wd/2·Σw²``, so it is identical to
L2 under any optimizer, momentum and Adam included.

*Decoupled* decay shrinks the weights outside the optimizer's state
(``w ← w − lr·wd·w`` next to the step). It equals L2 under **plain SGD** only. Under SGD
with momentum ``μ`` it is not L2 for any λ: the first step forces ``λ = wd``, and the
second already differs by ``lr·μ·wd·w₀`` (``w₀``: the weights before the first step),
because coupled decay enters the momentum buffer and decoupled decay does not. ``λ = (1 − μ)·wd`` matches only the slow, steady-state
shrinkage, an approximation rather than a conversion. Under Adam decoupled decay is a
different method altogether (AdamW), so no conversion exists for it either.
"""

from __future__ import annotations

import numbers

from jaxl2.errors import Jaxl2Error
from jaxl2.rules import check_bool, check_l2

__all__ = [
    "from_keras",
    "to_keras",
    "from_torch_weight_decay",
    "from_decoupled",
    "from_sklearn_alpha",
]


def from_keras(l2: float) -> float:
    """λ for Keras ``regularizers.L2(l2)``, whose penalty is ``l2·Σw²``: ``λ = 2·l2``.

    Examples:
      >>> from_keras(5e-4)
      0.001
    """
    return 2.0 * check_l2(l2, "keras l2")


def to_keras(lam: float) -> float:
    """Keras ``L2(l2)`` that equals jaxl2's ``λ/2·Σw²``: ``l2 = λ/2``.

    Examples:
      >>> to_keras(1e-3)
      0.0005
    """
    return check_l2(lam, "lam") / 2.0


def from_torch_weight_decay(wd: float) -> float:
    """λ for PyTorch's coupled ``weight_decay`` (SGD, Adam): ``grad += wd·w``, so ``λ = wd``.

    PyTorch applies it to every parameter it is given, biases included, unless the
    parameter groups leave them out; jaxl2 penalises the kernels only by default.

    Examples:
      >>> from_torch_weight_decay(1e-4)
      0.0001
    """
    return float(check_l2(wd, "weight_decay"))


def from_decoupled(wd: float, lr: float, *, scaled_by_lr: bool = True) -> float:
    """λ that equals decoupled weight decay under **plain SGD** only.

    With ``scaled_by_lr=True`` (optax ``adamw``-style and PyTorch ``AdamW``-style
    ``w ← w − lr·(g + wd·w)``) the step is the SGD step on ``λ/2·Σw²`` with ``λ = wd``.
    With ``scaled_by_lr=False`` (big_vision-style ``w ← w − lr·g − wd·w``), ``λ = wd/lr``.
    Under SGD with momentum, Adam or any adaptive method decoupled decay is *not* an L2
    penalty for any λ (see the module docstring); ``lr`` must be a finite number ``> 0`` and
    ``scaled_by_lr`` ``True`` or ``False``.

    Examples:
      >>> from_decoupled(1e-4, 0.5, scaled_by_lr=False)
      0.0002
    """
    check_l2(wd, "weight_decay")
    try:
        positive = float(check_l2(lr, "lr")) > 0
    except Jaxl2Error:
        positive = False
    if not positive:
        raise Jaxl2Error(
            f"lr must be a finite number > 0 (a float or a 0-d array), got {lr!r} ({type(lr).__name__})"
        )
    scaled_by_lr = check_bool(scaled_by_lr, "scaled_by_lr")
    return float(wd) if scaled_by_lr else float(wd) / float(lr)


def from_sklearn_alpha(alpha: float, n_samples: int) -> float:
    """λ for scikit-learn's ``Ridge(alpha)``, which minimises ``‖Xw − y‖² + alpha·‖w‖²``.

    jaxl2 adds ``λ/2·Σw²`` to a *mean* loss. Dividing Ridge's objective by ``n`` gives
    ``mean((Xw − y)²) + (alpha/n)·‖w‖²``, so with the mean squared error as the data loss
    ``λ = 2·alpha/n``; both objectives have the same minimiser.

    With ``k`` targets (``y`` of shape ``(n, k)``, ``W`` of shape ``(d, k)``) Ridge minimises
    ``‖XW − Y‖² + alpha·‖W‖²`` summed over all ``n·k`` entries, while the mean squared error
    averages over ``n·k`` entries: pass ``n_samples = n·k`` (``Y.size``), giving
    ``λ = 2·alpha/(n·k)``.

    Args:
      alpha: Ridge's ``alpha``, a finite number ``>= 0``.
      n_samples: the number of entries the mean squared error averages over: ``n`` for a
        1-d ``y``, ``n·k`` for ``k`` targets; any integer ``>= 1`` (python or NumPy, not a bool).

    Returns:
      ``λ = 2·alpha/n_samples`` as a float.

    Raises:
      Jaxl2Error: for a bad ``alpha``, or an ``n_samples`` that is not an integer ``>= 1``.

    Examples:
      >>> from_sklearn_alpha(1.0, 100)
      0.02
      >>> import numpy as np
      >>> from_sklearn_alpha(1.0, np.zeros((50, 2)).size)  # 50 samples, 2 targets
      0.02
    """
    check_l2(alpha, "alpha")
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise Jaxl2Error(
            f"n_samples must be a positive integer (the entries the mean squared error averages "
            f"over: n, or n·k for k targets), got {n_samples!r} ({type(n_samples).__name__})"
        )
    return 2.0 * float(alpha) / int(n_samples)
