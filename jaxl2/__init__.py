"""jaxl2: L2 regularization ``λ/2·Σw²`` of the weights of fully connected layers in JAX.

The library: jax, numpy and optax only. The public API, re-exported from the modules that
implement it:

* the penalty — :func:`l2_penalty`, :func:`regularized`, :func:`selected`, :func:`coefficients`
  (all with ``center=`` for L2 toward reference weights, L2-SP, and ``stacked=`` for layers
  stacked along an axis, one λ per layer); selection rules and presets in :mod:`jaxl2.select`,
  λ rules, schedules and stacked layers in :mod:`jaxl2.rules`, and :func:`mask`, the same
  selection as an optax ``mask=``;
* decay in the optimizer — :func:`add_decayed_weights` (per-layer λ, optax schedules, coupled
  or decoupled by placement) and :func:`audit`, what an optax optimizer really decays;
* what to log — :func:`group_norms`: per rule group, ``‖w‖``, ``‖g‖``, ``‖update‖`` and the
  decay's share (in :mod:`jaxl2.norms`);
* conventions — :func:`from_keras`, :func:`to_keras`, :func:`from_torch_weight_decay`,
  :func:`from_decoupled`, :func:`from_sklearn_alpha`;
* training — :func:`make_train_step`, a pure, jittable step for any params pytree, and
  :func:`auto_l2`, the same step with one λ per layer tuned during training by hypergradients;
* λ from the evidence — :func:`ggn` (the Gauss–Newton: exact, or K-FAC found from the model's
  dense layers, :mod:`jaxl2.kfac`), :func:`log_evidence`, :func:`evidence_l2`, and
  :func:`evidence_tuner`, the same tuned during training (Immer et al.);
* checks — :func:`gradcheck` (in :mod:`jaxl2.check`);
* errors — :class:`Jaxl2Error` (a ``ValueError``) for bad input.

The MNIST reference application lives in :mod:`jaxl2.mnist` (the ``mnist`` extra).

Example:
  >>> import jax.numpy as jnp, jaxl2
  >>> float(jaxl2.l2_penalty({"dense": {"kernel": jnp.ones((2, 2))}}, 0.5))  # 0.5/2 · 4
  1.0
"""

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the public names, each once: type checkers and the API docs read them, _exports too
    from jaxl2 import auto as auto
    from jaxl2 import conventions as conventions
    from jaxl2 import decay as decay
    from jaxl2 import evidence as evidence
    from jaxl2 import kfac as kfac
    from jaxl2 import norms as norms
    from jaxl2 import rules as rules
    from jaxl2 import select as select
    from jaxl2 import tuner as tuner
    from jaxl2.auto import AutoL2 as AutoL2
    from jaxl2.auto import AutoL2State as AutoL2State
    from jaxl2.auto import auto_l2 as auto_l2
    from jaxl2.check import GradcheckReport as GradcheckReport
    from jaxl2.check import gradcheck as gradcheck
    from jaxl2.conventions import from_decoupled as from_decoupled
    from jaxl2.conventions import from_keras as from_keras
    from jaxl2.conventions import from_sklearn_alpha as from_sklearn_alpha
    from jaxl2.conventions import from_torch_weight_decay as from_torch_weight_decay
    from jaxl2.conventions import to_keras as to_keras
    from jaxl2.decay import Audit as Audit
    from jaxl2.decay import AuditRow as AuditRow
    from jaxl2.decay import ScheduleState as ScheduleState
    from jaxl2.decay import add_decayed_weights as add_decayed_weights
    from jaxl2.decay import audit as audit
    from jaxl2.errors import Jaxl2Error as Jaxl2Error
    from jaxl2.evidence import Curvature as Curvature
    from jaxl2.evidence import evidence_l2 as evidence_l2
    from jaxl2.evidence import ggn as ggn
    from jaxl2.evidence import ggn_lanczos as ggn_lanczos
    from jaxl2.evidence import log_evidence as log_evidence
    from jaxl2.norms import group_norms as group_norms
    from jaxl2.penalty import Row as Row
    from jaxl2.penalty import Selection as Selection
    from jaxl2.penalty import coefficients as coefficients
    from jaxl2.penalty import l2_penalty as l2_penalty
    from jaxl2.penalty import regularized as regularized
    from jaxl2.penalty import selected as selected
    from jaxl2.select import Preset as Preset
    from jaxl2.select import mask as mask
    from jaxl2.step import ScheduledState as ScheduledState
    from jaxl2.step import make_train_step as make_train_step
    from jaxl2.tuner import EvidenceTuner as EvidenceTuner
    from jaxl2.tuner import EvidenceTunerState as EvidenceTunerState
    from jaxl2.tuner import evidence_tuner as evidence_tuner


__version__ = "0.3.0"


def _lazy(init_file: str, package: str) -> tuple[dict[str, tuple[str, str]], Any, Any]:
    """A package's public names, ``{name: (module, attribute)}`` read from the ``if
    TYPE_CHECKING:`` imports of its ``__init__.py`` (one ``from module import attribute as
    name`` a line: the one list of its public names, which type checkers and the API docs read
    too), with the module ``__getattr__`` and ``__dir__`` that load each on first use. Plain
    text, no ``ast``: the file is read once, so that importing the package stays light (the
    command's start-up, and Ctrl-C during it, stay in jaxl2's hands)."""
    exports = {}
    with open(init_file, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if line.startswith("    from ") and words[2] == "import" and words[4] == "as":
                exports[words[5]] = (words[1], words[3])
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = exports[name]
        if module == package:  # a submodule: ``from jaxl2 import rules as rules``
            value = importlib.import_module(f"{module}.{attr}")
        else:
            value = getattr(importlib.import_module(module), attr)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *exports])

    return exports, __getattr__, __dir__


_EXPORTS, __getattr__, __dir__ = _lazy(__file__, __name__)
__all__ = list(_EXPORTS)
