"""What a run, a sweep and a refit return: typed dicts whose keys are those of ``summary.json``,
``sweep.json`` and ``jaxl2 train --json`` / ``jaxl2 sweep --json``, each key with its meaning.

They are plain dicts at run time (``json.dumps`` writes them as they are); type checkers and
IDEs see every key and its type. Accuracies are fractions in [0, 1], losses are per example.

Example:
  >>> from jaxl2.mnist.results import RunSummary
  >>> sorted(RunSummary.__required_keys__)[:3]
  ['best_epoch', 'compile_seconds', 'device']
"""

# (no `from __future__ import annotations`: TypedDict reads NotRequired from evaluated annotations)
from typing import NotRequired, TypedDict

__all__ = ["Metrics", "RunSummary", "Refit", "MemberResult", "MeanStd", "PerL2", "SweepRefit", "SweepSummary"]


class Metrics(TypedDict):
    """One set of params on every split, with its penalty."""

    train_accuracy: float
    train_data_loss: float  # cross-entropy alone
    val_accuracy: float
    val_data_loss: float
    test_accuracy: float
    test_data_loss: float
    penalty: float  # λ/2·Σw² over the selected kernels
    train_loss: float  # train_data_loss + penalty
    kernel_sq_norm: dict[str, float]  # Σw² of each selected kernel, by path


class Refit(TypedDict, total=False):
    """The refit on train ∪ validation (:func:`jaxl2.mnist.refit.refit`); in a run's summary only
    when it was refit."""

    refit_epochs: int  # epochs it trained
    refit_examples: int  # its training examples: train ∪ validation
    refit_train_accuracy: float  # on train ∪ validation
    refit_test_accuracy: float
    refit_test_data_loss: float
    refit_seconds: float  # training, without compiling
    refit_compile_seconds: float


class RunSummary(Metrics, Refit):
    """:func:`~jaxl2.mnist.train_and_evaluate`'s summary: the metrics of the best params by
    validation accuracy (what ``jaxl2 eval`` loads without a refit), then the run's facts."""

    best_epoch: int  # the epoch of the best validation accuracy
    final_val_accuracy: float | None  # the last epoch's
    epochs: int  # the config's
    epochs_trained: int  # by this call (a resume trains the rest)
    lr: float  # the peak learning rate used
    seconds: float  # training, without compiling
    compile_seconds: float
    examples_per_second: float | None  # training examples per second of training
    device: str  # what trained it: platform, device kind, count
    out: str  # the run directory
    l2_final: NotRequired[dict[str, float]]  # l2 "auto" or "evidence": each layer's last λ, by path
    # l2 "evidence": the Laplace log evidence (nats) at the last λ update (None if there was none)
    log_evidence: NotRequired[float | None]
    refit_epoch_rule: NotRequired[str]  # with a refit (Refit's keys): the rule its epochs followed


class MemberResult(Metrics):
    """One (λ, seed) of a sweep: its best params' metrics, its final epoch's accuracies."""

    l2: float
    seed: int
    final_train_accuracy: float
    final_val_accuracy: float
    final_test_accuracy: float
    gap: float  # train_accuracy − test_accuracy
    best_epoch: int


class MeanStd(TypedDict):
    mean: float
    std: float  # over seeds, ddof=0


class PerL2(TypedDict):
    """One λ of a sweep, over its seeds."""

    l2: float
    seeds: int  # how many
    train_accuracy: MeanStd
    val_accuracy: MeanStd
    test_accuracy: MeanStd
    kernel_sq_norm: MeanStd  # Σ over the selected kernels of Σw²


class SweepRefit(TypedDict):
    """The selected λ refit on train ∪ validation, once per seed."""

    l2: float  # the selected λ
    epoch_rule: str  # all or best
    members: list[dict]  # per seed: seed, the sweep member's test_accuracy and Refit's keys
    test_accuracy: MeanStd  # of the sweep's members of that λ
    refit_test_accuracy: MeanStd


class SweepSummary(TypedDict):
    """:func:`~jaxl2.mnist.train_sweep`'s summary."""

    selected_l2: float  # best mean validation accuracy
    selected_l2_1se: float  # lambda.1se: the largest λ within one standard error of it
    per_l2: list[PerL2]
    results: list[MemberResult]
    lr: float
    execution: str  # vmap or sequential
    chunks: int  # programs the members were split into, to fit in memory
    chunk_size: int  # members per chunk
    seconds: float
    device: str
    out: str  # the sweep directory
    refit: NotRequired[SweepRefit]
