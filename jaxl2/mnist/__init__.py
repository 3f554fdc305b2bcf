"""The reference application: L2-regularized MLPs on MNIST, behind ``jaxl2 train | sweep |
eval | bench | gradcheck``. Needs the ``mnist`` extra (``pip install 'jaxl2[mnist]'``: flax,
orbax, tensorflow-datasets, mlxtend, matplotlib, rich).

One concern per module, arrows pointing down to the library (:mod:`jaxl2`):

* :mod:`~jaxl2.mnist.config` — :class:`Config` and the run settings, every vocabulary,
  validation; :mod:`~jaxl2.mnist.results` — what a run and a sweep return;
* :mod:`~jaxl2.mnist.model` — the Flax MLP; :mod:`~jaxl2.mnist.data` — the datasets
  (mnist5k; :mod:`~jaxl2.mnist.sources` reads full MNIST and IDX files when asked);
* :mod:`~jaxl2.mnist.train` — the pure, jitted step, epoch and evaluation, and the one loop
  that ``train``, ``sweep`` and the refit share; its :class:`Trainer` is the fixed λ mode;
  :mod:`~jaxl2.mnist.fused` — several epochs per compiled call (what ``jaxl2 train`` runs);
* :mod:`~jaxl2.mnist.hypergrad` — the λ mode of ``l2="auto"`` (λ per layer, tuned during the
  run by validation hypergradients);
* :mod:`~jaxl2.mnist.marglik` — the λ mode of ``l2="evidence"`` (λ per layer from the Laplace
  evidence, on train ∪ validation);
* :mod:`~jaxl2.mnist.run` — a run and its directory (:mod:`~jaxl2.mnist.rundir`);
  :mod:`~jaxl2.mnist.sweep` — many λ in one compiled program, and its directory
  (:mod:`~jaxl2.mnist.sweepdir`); :mod:`~jaxl2.mnist.refit` — the refit on train ∪ validation;
  :mod:`~jaxl2.mnist.evaluate` — a run's model on one split (``jaxl2 eval``);
* :mod:`~jaxl2.mnist.parallel`, :mod:`~jaxl2.mnist.plots`, :mod:`~jaxl2.mnist.bench`,
  :mod:`~jaxl2.mnist.runtime`, :mod:`~jaxl2.mnist.tensorboard` — devices, figures,
  measurements, the machine, TensorBoard events.

Example:
  >>> from jaxl2.mnist import Config, load_data
  >>> load_data("mnist5k").train.x.shape
  (3500, 784)
"""

from typing import TYPE_CHECKING

from jaxl2 import _lazy

if TYPE_CHECKING:  # the public names, each once: type checkers and the API docs read them, _lazy too
    from jaxl2.mnist.config import Config as Config
    from jaxl2.mnist.config import ConfigError as ConfigError
    from jaxl2.mnist.config import RunSettings as RunSettings
    from jaxl2.mnist.config import SweepSettings as SweepSettings
    from jaxl2.mnist.data import load as load_data  # noqa: F401 (re-exported: __all__)
    from jaxl2.mnist.evaluate import evaluate_run as evaluate_run
    from jaxl2.mnist.hypergrad import AutoTrainer as AutoTrainer
    from jaxl2.mnist.marglik import EvidenceTrainer as EvidenceTrainer
    from jaxl2.mnist.model import MLP as MLP
    from jaxl2.mnist.parallel import make_mesh as make_mesh
    from jaxl2.mnist.results import RunSummary as RunSummary
    from jaxl2.mnist.results import SweepSummary as SweepSummary
    from jaxl2.mnist.run import train_and_evaluate as train_and_evaluate
    from jaxl2.mnist.sweep import train_sweep as train_sweep
    from jaxl2.mnist.train import Diverged as Diverged
    from jaxl2.mnist.train import Interrupted as Interrupted
    from jaxl2.mnist.train import Trainer as Trainer
    from jaxl2.mnist.train import TrainState as TrainState

_EXPORTS, __getattr__, __dir__ = _lazy(__file__, __name__)  # lazy: jaxl2.mnist.config (--help) loads no flax
__all__ = list(_EXPORTS)
