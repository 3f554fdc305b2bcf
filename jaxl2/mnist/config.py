"""The application's configuration: :class:`Config` (each field's comment is its flag's ``--help``),
every vocabulary, and :func:`validate`. No jax here, so ``jaxl2 --help`` stays fast. Errors name
fields (``split_seed``), which the ``jaxl2`` command shows as flags (``--split-seed``): :func:`field`.

Example:
  >>> cfg = validate(Config(optimizer="adam"))
  >>> cfg.lr  # the optimizer's own default learning rate
  0.003
  >>> try:
  ...     validate(Config(split_seed=-1))
  ... except ConfigError as e:
  ...     print(e)
  split_seed -1 is invalid (an integer from 0 to 4294967295)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from jaxl2.errors import Jaxl2Error

INPUT_DIM = 784  # 28×28 pixels
NUM_CLASSES = 10
DATASETS = ("mnist5k", "mnist", "idx:DIR")
SPLITS = ("train", "val", "test")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "identity")
INITS = ("lecun_normal", "normal")
FLOAT32_MAX = 3.4028234663852886e38
SEED_LIMIT = 2**32  # seeds are 0 ≤ seed < 2³² (JAX's and NumPy's keys take 32-bit seeds)
# The λ values a sweep trains when none are given (jaxl2 sweep --l2).
DEFAULT_SWEEP_L2 = (0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
AUTO = "auto"  # l2 = "auto": one λ per selected layer, tuned during the run (jaxl2.auto_l2)
AUTO_L2_BOUNDS = (1e-8, 1.0)  # the λs stay within them (jaxl2.auto_l2's bounds)
# l2 = "evidence": λ chosen during the run by the Laplace evidence on all of train ∪ validation
# (jaxl2.mnist.marglik), one for all selected leaves or one each; it starts at l2_init, as auto does
EVIDENCE = "evidence"


class Optimizer(NamedTuple):
    """One optimizer's default peak learning rate, the float32 copies of the params its state
    holds (for the sweep's memory estimate) and whether it takes ``weight_decay``."""

    lr: float
    state_copies: int
    decays: bool


OPTIMIZERS: dict[str, Optimizer] = {
    "sgd": Optimizer(0.5, 0, False),
    "momentum": Optimizer(0.3, 1, False),
    "adam": Optimizer(3e-3, 2, False),
    "adamw": Optimizer(3e-3, 2, True),  # decoupled weight decay
    "sgdw": Optimizer(0.3, 1, True),  # momentum SGD with weight decay added before momentum
}


def field(name: str) -> str:
    """A config field's name inside an error message, which :func:`render` shows as the caller's
    name for it (``split_seed`` in Python, ``--split-seed`` on the command line)."""
    return f"\x1f{name}\x1f"


def render(text: str, name_of: Callable[[str], str] = lambda f: f) -> str:
    """``text`` with each :func:`field` shown as ``name_of(name)`` (a flag, on the command line)."""
    return re.sub(r"\x1f(\w+)\x1f", lambda m: name_of(m.group(1)), text)


class Named:
    """Mixin of the application's errors: a message that names fields through :func:`field`."""

    args: tuple[Any, ...]  # the exception's, which every user of the mixin is

    def render(self, name_of: Callable[[str], str] = lambda f: f) -> str:
        return render(str(self.args[0] if self.args else ""), name_of)

    def __str__(self) -> str:
        return self.render()


class ConfigError(Named, Jaxl2Error):
    """Bad input to a run, found before anything is compiled or written."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run computes; the defaults are the tuned ``mnist5k`` recipe. ``lr=None`` means
    the optimizer's own default (:data:`OPTIMIZERS`), which :func:`validate` fills in."""

    # -- data
    # mnist5k (shipped, offline: 5,000 real images), mnist (full MNIST through TensorFlow
    # Datasets) or idx:DIR (raw IDX files)
    dataset: str = "mnist5k"
    data_dir: str | None = None  # TensorFlow Datasets' data_dir for `dataset` mnist
    # validation examples carved from the training data (default: 500 for mnist5k, 5000 otherwise)
    val_size: int | None = None
    split_seed: int = 0  # seed of the train/validation(/test) split
    # -- regularization
    # λ of the penalty λ/2·Σw² on the selected kernels; per layer, REGEX=λ entries matched in
    # order against paths like params/Dense_0/kernel (first full match wins); or auto: one λ per
    # selected kernel, tuned during the run by the hypergradient of the validation loss through
    # one optimizer step (Luketina et al., ICML 2016) on a validation batch every `l2_every`
    # steps; or evidence: one λ or one per layer (`evidence_lambda`), set every `evidence_every`
    # epochs by the Laplace evidence of all the training data, training on train ∪ validation
    # with no refit; the λs go to metrics.jsonl (l2/PATH), lambda.png and the summary
    l2: float | Mapping[str, float] | str = 1e-3
    l2_init: float = 1e-4  # with `l2` auto or evidence: every layer's starting λ
    # with `l2` auto: training steps per λ update, each on one validation batch of `batch_size` examples
    l2_every: int = 4
    l2_lr: float = 0.02  # with `l2` auto: Adam's learning rate on ln λ
    # with `l2` evidence: epochs between λ updates (the first after epoch `evidence_every`), each
    # from the Gauss-Newton (`evidence_curvature`) over all training examples
    evidence_every: int = 5
    # with `l2` evidence: how each update seeks the evidence's maximum at that epoch's params:
    # bisect (halvings in ln λ of the bounds 1e-8..1 around it), mackay (MacKay's fixed-point
    # iteration from the current λ, which can oscillate) or adam (steps of Adam, learning rate
    # 0.1, on ln λ from the current λ, as laplace-torch's marglik_training)
    evidence_method: str = "bisect"
    # with `l2` evidence: iterations of `evidence_method` per λ update (25 halvings reach
    # float32's resolution of ln λ, about 1e-6 relative)
    evidence_steps: int = 30
    # with `l2` evidence: the Gauss-Newton's structure, kron (K-FAC factors per layer), ekfac
    # (K-FAC's eigenbasis with the exact diagonal in it), diag (its exact diagonal) or lanczos
    # (the whole of it, by stochastic Lanczos quadrature; one λ shared)
    evidence_curvature: str = "kron"
    # with `l2` evidence: shared (one λ for all the prior's tensors: with unpenalised biases the
    # MLP's layers trade scale through ReLU, so only their λs' product is identified) or layer
    # (one λ per tensor)
    evidence_lambda: str = "shared"
    # with `l2` evidence: the tensors the prior and the penalty cover: kernels (every Dense
    # kernel, the biases held fixed) or all (kernels and biases, each its own λ with
    # `evidence_lambda` layer, as laplace-torch's "layerwise")
    evidence_prior: str = "kernels"
    # the leaves the penalty covers: kernels (default: every Dense kernel, no biases) or a regex
    # over paths like params/Dense_0/kernel
    select: str | None = None
    # weight decay in the optimizer, for `optimizer` adamw (decoupled) and sgdw (added before momentum)
    weight_decay: float = 0.0
    allow_both: bool = False  # allow `l2` > 0 together with `weight_decay` (both regularize)
    # -- optimization
    # sgd (plain), momentum, adam, adamw (decoupled weight decay) or sgdw (momentum SGD with weight
    # decay added before momentum)
    optimizer: str = "momentum"
    lr: float | None = None  # peak learning rate (default: the optimizer's own)
    schedule: str = "cosine"  # constant, or cosine decay from `lr` to 0 over the run's steps
    momentum: float = 0.9  # for `optimizer` momentum and sgdw
    batch_size: int = 128  # examples per step; the last partial batch of each epoch is dropped
    epochs: int = 120  # passes over the training split
    # -- model
    hidden: tuple[int, ...] = (256, 256)  # hidden widths of the MLP 784-…-10
    activation: str = "relu"  # relu, tanh, sigmoid, gelu or identity
    # kernel init: lecun_normal (Flax's default) or normal (N(0, 1), as in the classic recipe)
    init: str = "lecun_normal"
    seed: int = 0  # init and shuffling seed

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["l2"] = dict(self.l2) if isinstance(self.l2, Mapping) else self.l2
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Config:
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)

    @property
    def l2_on(self) -> bool:
        """Whether the loss has a penalty at all (a per-layer mapping and "auto" count as on)."""
        return isinstance(self.l2, Mapping) or self.l2 != 0

    @property
    def l2_auto(self) -> bool:
        """Whether λ is tuned during the run (``l2="auto"``)."""
        return isinstance(self.l2, str) and self.l2 == AUTO

    @property
    def l2_evidence(self) -> bool:
        """Whether λ is chosen by the evidence during the run (``l2="evidence"``)."""
        return isinstance(self.l2, str) and self.l2 == EVIDENCE


FIELDS = tuple(f.name for f in dataclasses.fields(Config))
# The fields that only some λ modes read, with those modes (a run of another mode refuses them).
MODE_FIELDS: dict[str, tuple[str, ...]] = {
    "l2_every": (AUTO,),
    "l2_lr": (AUTO,),
    "evidence_every": (EVIDENCE,),
    "evidence_method": (EVIDENCE,),
    "evidence_steps": (EVIDENCE,),
    "evidence_curvature": (EVIDENCE,),
    "evidence_lambda": (EVIDENCE,),
    "evidence_prior": (EVIDENCE,),
    "l2_init": (AUTO, EVIDENCE),
}
# The fields that l2 = "auto" reads, with their defaults (jaxl2.mnist.hypergrad says why).
AUTO_DEFAULTS = {name: getattr(Config, name) for name, modes in MODE_FIELDS.items() if AUTO in modes}


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How :func:`~jaxl2.mnist.train_and_evaluate` carries out a run (the :class:`Config`
    says what it computes); ``config.json`` records ``refit`` and ``refit_epochs``. The default recipe
    refits for all its epochs: on mnist5k's test split (4 split seeds × 3 seeds) 95.45% against 95.06%
    unrefit, and 95.31% refit for the best epoch's count (experiments/refit.py, README)."""

    # then train again from the same init on train ∪ validation for `refit_epochs` epochs, report
    # its test accuracy and let eval use it
    refit: bool = True
    # the refit's epochs: all (the run's `epochs`, its full lr schedule) or best (the best epoch
    # by validation accuracy); all scored higher on held-out data
    refit_epochs: str = "all"
    # also checkpoint every N epochs (default: every 30 s of training; always at the end and on
    # SIGINT or SIGTERM)
    checkpoint_every: int | None = None
    # data-parallel over the first N devices (default: all); the batch must divide by N
    devices: int | None = None


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """What :func:`~jaxl2.mnist.train_sweep` trains beside the :class:`Config` (one member per
    (λ, seed)) and how; ``config.json`` records all but ``budget_bytes``."""

    l2s: tuple[float, ...] = DEFAULT_SWEEP_L2  # the λ values, each given once
    # init seeds per λ (default: the config's `seed` alone); data order follows the seed
    seeds: tuple[int, ...] | None = None
    # vmap, sequential (lax.map in one program) or auto: on CPU the faster of the two on one timed epoch
    execution: str = "auto"
    # then refit the selected λ on train ∪ validation, once per seed, and report its test accuracy
    refit: bool = False
    # the refit's epochs: all (the sweep's `epochs`) or best (each member's best epoch's count)
    refit_epochs: str = "all"
    # also checkpoint every N epochs (default: every 30 s of training; always at the end of each
    # chunk and on SIGINT or SIGTERM)
    checkpoint_every: int | None = None
    # bytes the members trained at once may take (default: the machine's available memory)
    budget_bytes: int | None = None


def settings_of(value: Any, cls: type) -> Any:
    """``value`` if it is a ``cls`` (:class:`RunSettings` or :class:`SweepSettings`), the defaults
    for ``None``; anything else is a :class:`ConfigError` that names the fields to pass."""
    if value is None:
        return cls()
    if not isinstance(value, cls):
        names = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ConfigError(
            f"settings must be a {cls.__name__} (its fields: {names}), got {type(value).__name__} {value!r:.60}"
        )
    return value


def _int(v: Any, lo: int = 1, hi: float = math.inf) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and lo <= int(v) < hi


def _number(v: Any, lo: float = 0.0, hi: float = math.inf) -> bool:
    return (
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and lo <= float(v) <= hi
    )


_LO, _HI = AUTO_L2_BOUNDS
_SEEDS = f"an integer from 0 to {SEED_LIMIT - 1}"
# Each field's range: (whether a value is in it, how an error states it), in checking order.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "val_size": (lambda v: v is None or _int(v), "an integer >= 1"),
    "split_seed": (lambda v: _int(v, 0, SEED_LIMIT), _SEEDS),
    "l2_init": (
        lambda v: _number(v, _LO, _HI),
        f"the starting λ of {AUTO} and {EVIDENCE}, a number from {_LO:g} to {_HI:g}",
    ),
    "l2_every": (_int, "training steps per λ update, an integer >= 1"),
    "l2_lr": (lambda v: _number(v) and v > 0, "Adam's learning rate on ln λ, a finite number > 0"),
    "evidence_every": (_int, "epochs per λ update, an integer >= 1"),
    "evidence_steps": (_int, "iterations per λ update, an integer >= 1"),
    "weight_decay": (_number, "a finite number >= 0"),
    "lr": (lambda v: v is None or _number(v) and v > 0, "a finite number > 0"),
    "momentum": (lambda v: _number(v, 0, 1) and v < 1, "0 <= momentum < 1"),
    "batch_size": (_int, "an integer >= 1"),
    "epochs": (_int, "an integer >= 1"),
    "hidden": (
        lambda v: isinstance(v, tuple) and bool(v) and all(map(_int, v)),
        "comma-separated positive widths, e.g. 256,256",
    ),
    "seed": (lambda v: _int(v, 0, SEED_LIMIT), _SEEDS),
    "select": (
        lambda v: v is None or isinstance(v, str),
        "'kernels' or a regular expression over parameter paths",
    ),
}
# Each named field's vocabulary, in checking order.
CHOICES: dict[str, Any] = {
    "evidence_curvature": ("kron", "ekfac", "diag", "lanczos"),
    "evidence_method": ("bisect", "mackay", "adam"),
    "evidence_lambda": ("shared", "layer"),
    "evidence_prior": ("kernels", "all"),
    "optimizer": OPTIMIZERS,
    "schedule": ("constant", "cosine"),
    "activation": ACTIVATIONS,
    "init": INITS,
}


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{name} {pattern!r} is not a valid regular expression ({e})") from None


def _check_l2(l2: Any) -> None:
    if isinstance(l2, str):
        if l2 not in (AUTO, EVIDENCE):
            raise ConfigError(
                f"{field('l2')} {l2!r} is invalid (a number >= 0, REGEX=λ entries, {AUTO} or {EVIDENCE})"
            )
        return
    if isinstance(l2, Mapping) and not l2:
        raise ConfigError(f"{field('l2')} is an empty mapping (give REGEX=λ entries)")
    for pattern, lam in l2.items() if isinstance(l2, Mapping) else [(None, l2)]:
        name = field("l2")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise ConfigError(f"{name} pattern {pattern!r} is not a string")
            _check_regex(f"{name} pattern", pattern)
            name += f" {pattern}=λ: λ"
        if not _number(lam):
            raise ConfigError(f"{name} must be a finite number >= 0, got {lam!r}")
        if lam > FLOAT32_MAX:
            raise ConfigError(
                f"{name} {lam!r} is too large (at most {FLOAT32_MAX:.3g}: training is in float32)"
            )


def _check_together(cfg: Config) -> None:
    """The fields that depend on others: the settings of ``l2`` auto and evidence only with it,
    ``weight_decay`` only for an optimizer that takes it and not with ``l2`` by accident."""
    if cfg.l2_evidence and cfg.evidence_every > cfg.epochs:
        raise ConfigError(
            f"{field('evidence_every')} {cfg.evidence_every} is more than {field('epochs')} {cfg.epochs}: "
            f"λ would never be updated (at most {cfg.epochs})"
        )
    if cfg.evidence_curvature == "lanczos" and cfg.evidence_lambda != "shared":
        raise ConfigError(
            f"{field('evidence_curvature')} lanczos estimates the evidence of one λ for all the selected "
            f"leaves: it needs {field('evidence_lambda')} shared, not {cfg.evidence_lambda}"
        )
    mode = cfg.l2 if cfg.l2_auto or cfg.l2_evidence else None
    for name, modes in MODE_FIELDS.items():
        if getattr(cfg, name) != getattr(Config, name) and mode not in modes:
            raise ConfigError(
                f"{field(name)} is a setting of {field('l2')} {' or '.join(modes)}, which this run does not use "
                f"({field('l2')} {cfg.l2}); add {field('l2')} {modes[0]} or drop {field(name)}"
            )
    if cfg.evidence_prior == "all" and cfg.select is not None:
        raise ConfigError(
            f"{field('evidence_prior')} all covers every tensor, so it leaves nothing for {field('select')} "
            f"{cfg.select!r} to choose (drop one of them)"
        )
    if cfg.weight_decay and not OPTIMIZERS[cfg.optimizer].decays:
        takers = ", ".join(k for k, v in OPTIMIZERS.items() if v.decays)
        raise ConfigError(
            f"{field('weight_decay')} is decay in the optimizer, for {field('optimizer')} {takers} only "
            f"(use {field('l2')} with {cfg.optimizer})"
        )
    if cfg.weight_decay and (cfg.l2_auto or cfg.l2_evidence):
        raise ConfigError(
            f"{field('weight_decay')} with {field('l2')} {cfg.l2}: {cfg.l2} tunes the penalty's λ per layer, "
            f"and decay in the optimizer would regularize too, untuned (set {field('weight_decay')} 0, "
            f"or give a fixed {field('l2')})"
        )
    if cfg.weight_decay and cfg.l2_on and not cfg.allow_both:
        raise ConfigError(
            f"{field('weight_decay')} and {field('l2')} together regularize twice "
            f"(set {field('l2')} 0, or {field('allow_both')} to mean it)"
        )


def validate(cfg: Config, num_train: int | None = None) -> Config:
    """Checks every field of ``cfg`` and returns it with ``lr`` filled in; ``num_train`` (the
    training split's size, once the data is loaded) bounds the batch size. Whether ``select`` and
    ``l2`` match the model's kernels needs jax: :func:`jaxl2.mnist.model.check_selection`.

    Raises:
      ConfigError: naming the field, the value and what is allowed.
    """
    idx = isinstance(cfg.dataset, str) and cfg.dataset.startswith("idx:") and len(cfg.dataset) > 4
    if not (idx or cfg.dataset in ("mnist5k", "mnist")):
        raise ConfigError(f"{field('dataset')} {cfg.dataset!r} is unknown (allowed: {', '.join(DATASETS)})")
    _check_l2(cfg.l2)
    for name, (ok, allowed) in RANGES.items():
        value = getattr(cfg, name)
        if not ok(value):
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            raise ConfigError(f"{field(name)} {shown} is invalid ({allowed})")
    for name, names in CHOICES.items():
        if getattr(cfg, name) not in names:
            raise ConfigError(
                f"{field(name)} {getattr(cfg, name)!r} is unknown (allowed: {', '.join(names)})"
            )
    if cfg.select is not None:
        _check_regex(field("select"), cfg.select)
    _check_together(cfg)
    if num_train is not None and cfg.batch_size > num_train:
        raise ConfigError(
            f"{field('batch_size')} {cfg.batch_size} is larger than the training set "
            f"(at most {num_train} for {cfg.dataset})"
        )
    if cfg.lr is None:
        cfg = dataclasses.replace(cfg, lr=OPTIMIZERS[cfg.optimizer].lr)
    return cfg
