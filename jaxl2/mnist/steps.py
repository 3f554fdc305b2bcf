"""Pure training: the state pytree, a jitted ``train_step``, a whole epoch in one ``lax.scan``.

The step is :func:`jaxl2.make_train_step` (the library's, the only step in the project): the
loss is ``CE + λ/2·Σw²`` over the selected kernels and ``jax.grad`` adds ``λ·w`` to their gradients. Decoupled weight decay
(``adamw``) lives in the optimizer instead.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxl2.mnist.config import Config
  >>> from jaxl2.mnist.steps import Trainer
  >>> trainer = Trainer(Config(hidden=(32,), epochs=1, batch_size=4), num_train=8)
  >>> state = trainer.init()
  >>> x, y = jnp.zeros((4, 784)), jnp.zeros((4,), jnp.int32)
  >>> state, metrics = trainer.train_step(state, (x, y))
  >>> sorted(metrics)
  ['accuracy', 'data_loss', 'loss', 'penalty']
  >>> state, metrics = trainer.train_epoch(state, x, y)
  >>> sorted(metrics)
  ['accuracy', 'data_loss', 'loss', 'nonfinite_step', 'param_norm', 'penalty', 'update_norm']
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxl2.decay import add_decayed_weights
from jaxl2.mnist.config import INPUT_DIM, OPTIMIZERS, Config, validate
from jaxl2.mnist.model import model_of, selector_of
from jaxl2.penalty import l2_penalty
from jaxl2.select import mask
from jaxl2.step import make_train_step

__all__ = [
    "TrainState",
    "Trainer",
    "make_optimizer",
    "per_example",
    "cross_entropy",
    "evaluate_fn",
    "lambdas_of",
    "lambda_columns",
    "l2_at",
    "penalty_rules",
]


class TrainState(struct.PyTreeNode):
    """All that changes during training: ``step``, ``params``, ``opt_state``, ``rng`` (raw key)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def make_optimizer(cfg: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax optimizer of ``cfg``; ``adamw`` and ``sgdw`` decay the selected leaves only."""
    peak = OPTIMIZERS[cfg.optimizer].lr if cfg.lr is None else cfg.lr
    total = max(1, cfg.epochs * steps_per_epoch)
    lr = peak if cfg.schedule == "constant" else optax.cosine_decay_schedule(peak, total)
    if cfg.optimizer == "sgd":
        return optax.sgd(lr)
    if cfg.optimizer == "momentum":
        return optax.sgd(lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return optax.adam(lr)
    select = selector_of(cfg)
    if cfg.optimizer == "adamw":  # decoupled decay of the selected leaves only, like the penalty
        return optax.adamw(lr, weight_decay=cfg.weight_decay, mask=functools.partial(mask, select=select))
    if cfg.optimizer == "sgdw":  # decay added to the gradient before momentum: coupled, = L2 for SGD
        return optax.chain(
            add_decayed_weights(cfg.weight_decay, select=select), optax.sgd(lr, momentum=cfg.momentum)
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (allowed: {', '.join(OPTIMIZERS)})")


def per_example(logits_BxC: jax.Array, y_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's softmax cross-entropy and hit (1.0 or 0.0).

    A row is a hit when its label's logit is the largest (a tie for the largest counts as a
    hit; ``argmax`` would pick the first): the comparison reuses the row maximum that the
    cross-entropy's log-sum-exp computes, one reduction instead of two.
    """
    max_B = jax.lax.stop_gradient(logits_BxC.max(-1))
    lse_B = max_B + jnp.log(jnp.exp(logits_BxC - max_B[:, None]).sum(-1))
    is_label_BxC = y_B[:, None] == jnp.arange(logits_BxC.shape[-1])
    label_B = jnp.where(is_label_BxC, logits_BxC, 0.0).sum(-1)
    return lse_B - label_B, (label_B >= max_B).astype(jnp.float32)


def cross_entropy(logits_BxC: jax.Array, y_B: jax.Array, mask_B: jax.Array | None = None):
    """Mean softmax cross-entropy and accuracy (over the rows where ``mask_B`` is true), of
    :func:`per_example`."""
    ce_B, hit_B = per_example(logits_BxC, y_B)
    if mask_B is None:
        return ce_B.mean(), hit_B.mean()
    m = mask_B.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    return (ce_B * m).sum() / n, (hit_B * m).sum() / n


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model: Any, key: jax.Array) -> tuple[Any, jax.Array]:
    """``model``'s params from the first half of ``key``, and the second half (the data key)."""
    k_init, k_data = jax.random.split(key)
    return model.init(k_init, jnp.zeros((1, INPUT_DIM), jnp.float32)), k_data


@functools.partial(jax.jit, static_argnums=0)
def _evaluate(model: Any, params: Any, x_NxD: jax.Array, y_N: jax.Array) -> dict[str, jax.Array]:
    return evaluate_fn(model, params, x_NxD, y_N)


def evaluate_fn(model: Any, params: Any, x_NxD: jax.Array, y_N: jax.Array, chunk: int = 2048):
    """``{"data_loss", "accuracy"}`` of ``model`` with ``params`` over ``x_NxD, y_N``, in chunks
    of ``chunk`` rows (``lax.map``; the last one padded and masked)."""
    n = x_NxD.shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    x = jnp.pad(x_NxD, ((0, pad), (0, 0))).reshape(-1, chunk, x_NxD.shape[1])
    y = jnp.pad(y_N, (0, pad)).reshape(-1, chunk)
    m = (jnp.arange(n + pad) < n).reshape(-1, chunk)

    def one(args):
        xc, yc, mc = args
        ce, acc = cross_entropy(model.apply(params, xc), yc, mc)
        k = mc.sum()
        return ce * k, acc * k

    ce, acc = jax.lax.map(one, (x, y, m))
    return {"data_loss": ce.sum() / n, "accuracy": acc.sum() / n}


class Trainer:
    """The jitted functions of one configuration (``num_train`` sets the lr schedule's length).

    * ``train_step(state, (x, y)) -> (state, metrics)``: one SGD step, state donated;
    * ``train_epoch(state, x_train, y_train) -> (state, metrics)``: a whole shuffled epoch in
      one compiled call (``lax.scan`` over batches; the last partial batch is **dropped**,
      and a different one each epoch since the data is reshuffled; the state is not donated).
      Each step adds its rows' cross-entropies and hits to per-row sums carried through the
      epoch (``data_loss`` and ``accuracy`` are their means over the epoch's examples, with no
      reduction or record per step); the penalty ``λ/2·Σw²`` and ``param_norm`` are
      those of the epoch's final params, ``loss = data_loss + penalty``, ``update_norm`` is
      ``‖θ_end − θ_start‖`` over the epoch, and ``nonfinite_step`` the first step whose data
      loss was NaN/Inf, or -1;
    * ``evaluate(params, x, y) -> {"data_loss", "accuracy"}``: one compiled call over a split
      (``data_loss`` is the mean cross-entropy; the penalty is not part of it).

    ``l2`` may be overridden per call of the ``*_fn`` functions (``step_fn``/``epoch_fn``),
    which is what the vmapped sweep does with a traced λ.

    A trainer is also the run's **λ mode**: the run loop (:mod:`jaxl2.mnist.run`) asks it,
    and nothing else, what differs between a fixed λ (this class), λ by hypergradients
    (:class:`~jaxl2.mnist.auto.AutoTrainer`) and λ from the evidence
    (:class:`~jaxl2.mnist.evidence.EvidenceTrainer`): its state (:meth:`state_of`), its epoch
    over the training and validation splits (:meth:`run_epoch`), which params it keeps
    (:attr:`latest`), what its data is (:attr:`trains_on_val`), its summary's λ and keys
    (:meth:`summary`) and the config of its refit (:meth:`refit_config`).
    """

    latest = False  # keep the best params by validation accuracy (True: every epoch's)
    trains_on_val = False  # True: it trains on train ∪ validation, and has no refit

    def __init__(self, cfg: Config, num_train: int, *, mesh: Any = None):
        self.cfg = cfg = validate(cfg)
        self.mesh = mesh  # a jax.sharding.Mesh with a "data" axis: batches are split along it
        self.model = model_of(cfg)
        self.select = selector_of(cfg)
        self.steps_per_epoch = num_train // cfg.batch_size
        self.tx = make_optimizer(cfg, self.steps_per_epoch)
        self.train_step = jax.jit(self.step_fn, donate_argnums=0)
        # not donated: the run loop dispatches epoch k + 1 while it still reads epoch k's state
        self.train_epoch = jax.jit(self.epoch_fn)
        self.evaluate = functools.partial(_evaluate, self.model)  # one executable per model and shape

    # -- state -------------------------------------------------------------------------
    def init(self, seed: int | None = None) -> TrainState:
        """A fresh state from ``seed`` (default ``cfg.seed``), built under ``jit``: the model's
        params (one executable per model, shared by every trainer of it: a refit's init compiles
        nothing new), then :meth:`state_of` them."""
        seed = self.cfg.seed if seed is None else seed
        params, k_data = _init_params(self.model, jax.random.PRNGKey(seed))
        return self._state_of(params, k_data)

    @functools.partial(jax.jit, static_argnums=0)
    def _state_of(self, params: Any, rng: jax.Array) -> TrainState:
        return self.state_of(params, rng)

    def state_of(self, params: Any, rng: jax.Array) -> TrainState:
        """The state at step 0 of ``params``: the optimizer's initial state, ``rng`` the data key."""
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params), rng)

    # -- pure functions ----------------------------------------------------------------
    def data_loss(self, params, x_BxD, y_B):
        ce, acc = cross_entropy(self.model.apply(params, x_BxD), y_B)
        return ce, {"accuracy": acc}

    def rows_loss(self, params, x_BxD, y_B):
        """The mean cross-entropy, with each row's ``{"ce_B", "hit_B"}`` (:func:`per_example`)."""
        ce_B, hit_B = per_example(self.model.apply(params, x_BxD), y_B)
        return ce_B.mean(), {"ce_B": ce_B, "hit_B": hit_B}

    def step_fn(self, state: TrainState, batch, l2=None, loss_fn=None):
        """One step of :func:`jaxl2.make_train_step` on the MLP's cross-entropy (``loss_fn``,
        default :meth:`data_loss`); ``l2`` overrides ``cfg.l2`` (a traced λ in the sweep)."""
        l2 = self.cfg.l2 if l2 is None else l2
        loss_fn = self.data_loss if loss_fn is None else loss_fn
        step = make_train_step(loss_fn, self.tx, l2=l2, select=self.select, has_aux=True, norms=False)
        params, opt_state, metrics = step(state.params, state.opt_state, *batch)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def penalty_fn(self, params, l2=None):
        """``λ/2·Σw²`` over the selected leaves of ``params``."""
        l2 = self.cfg.l2 if l2 is None else l2
        return l2_penalty(params, l2, select=self.select)

    def batches(self, state: TrainState, num_examples: int) -> jax.Array:
        """This epoch's batch indices ``[steps, batch]``: a permutation keyed on the step."""
        key = jax.random.fold_in(state.rng, state.step)
        steps = num_examples // self.cfg.batch_size
        perm = jax.random.permutation(key, num_examples)
        return perm[: steps * self.cfg.batch_size].reshape(steps, self.cfg.batch_size)

    def epoch_fn(self, state: TrainState, x_NxD, y_N, l2=None):
        idx_SxB = self.batches(state, x_NxD.shape[0])
        steps, batch = idx_SxB.shape

        def body(carry, i_idx):
            st, ce_B, hit_B, bad_B = carry
            i, idx_B = i_idx
            x_BxD, y_B = x_NxD[idx_B], y_N[idx_B]
            if self.mesh is not None:  # declare the batch split along "data"; jit does the rest
                spec = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
                x_BxD, y_B = jax.lax.with_sharding_constraint((x_BxD, y_B), spec)
            st, m = self.step_fn(st, (x_BxD, y_B), l2, self.rows_loss)
            # per row: sums over the steps, and the first step whose loss was not finite
            bad_B = jnp.where((bad_B == steps) & ~jnp.isfinite(m["ce_B"]), i, bad_B)
            return (st, ce_B + m["ce_B"], hit_B + m["hit_B"], bad_B), None

        start = state.params
        zeros_B = jnp.zeros((batch,), jnp.float32)
        carry = (state, zeros_B, zeros_B, jnp.full((batch,), steps, jnp.int32))
        (state, ce_B, hit_B, bad_B), _ = jax.lax.scan(body, carry, (jnp.arange(steps), idx_SxB))
        metrics = {"data_loss": ce_B.sum() / idx_SxB.size, "accuracy": hit_B.sum() / idx_SxB.size}
        metrics = self.with_final_params(metrics, start, state.params, self.penalty_fn(state.params, l2))
        bad = bad_B.min()
        metrics["nonfinite_step"] = jnp.where(bad < steps, bad, -1)
        return state, metrics

    # -- the λ mode --------------------------------------------------------------------
    def run_epoch(self, state: Any, x_NxD, y_N, xv_MxD, yv_M) -> tuple[Any, dict]:
        """The epoch the run loop compiles, over the training split ``x_NxD, y_N`` and the
        validation split ``xv_MxD, yv_M``: here :meth:`epoch_fn` (a fixed λ needs no
        validation data)."""
        return self.epoch_fn(state, x_NxD, y_N)

    def summary(self, state: Any, rows: list[dict[str, Any]], best_epoch: int) -> tuple[Any, dict[str, Any]]:
        """The λ of the best params' penalty (those of ``best_epoch``, from the run's
        ``metrics.jsonl`` ``rows``) and the mode's own summary keys, at the final ``state``:
        here ``cfg.l2`` and none."""
        return self.cfg.l2, {}

    def refit_config(self, summary: dict[str, Any] | None) -> Config | None:
        """The config a refit of the run trains, given the run's ``summary``; ``None`` while
        that cannot be known (``summary=None``: before training). Here ``cfg`` itself."""
        return self.cfg

    @staticmethod
    def with_final_params(metrics: dict, start: Any, params: Any, penalty: jax.Array) -> dict:
        """An epoch's ``metrics`` (its steps' means) with what its final ``params`` give:
        ``penalty`` (``λ/2·Σw²``), ``loss = data_loss + penalty``, ``param_norm`` and
        ``update_norm = ‖params − start‖``, one pass over the weights per epoch."""
        return {
            **metrics,
            "penalty": penalty,
            "loss": metrics["data_loss"] + penalty,
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(jax.tree_util.tree_map(jnp.subtract, params, start)),
        }

    def eval_fn(self, params, x_NxD, y_N):
        """:func:`evaluate_fn` of the model (traced into the run's programs)."""
        return evaluate_fn(self.model, params, x_NxD, y_N)


def lambdas_of(paths: list[str], log_l2: jax.Array) -> dict[str, float]:
    """``{path: λ}`` of ``ln λ`` per path, as Python floats (the state's λs, on the host)."""
    lam_L = np.exp(np.asarray(jax.device_get(log_l2), np.float64))
    return {p: float(lam) for p, lam in zip(paths, lam_L)}


def lambda_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The ``l2/PATH`` keys of ``metrics.jsonl`` rows (λ per layer), in the order of the first row."""
    return [k for k in rows[0] if k.startswith("l2/")] if rows else []


def l2_at(rows: list[dict[str, Any]], epoch: int) -> dict[str, float]:
    """``{path: λ}`` at the end of ``epoch``, from ``metrics.jsonl`` rows."""
    row = next(r for r in rows if r["epoch"] == epoch)
    return {k[len("l2/") :]: row[k] for k in lambda_columns(rows)}


def penalty_rules(lambdas: dict[str, Any]) -> dict[str, Any]:
    """``{path: λ}`` as jaxl2's ``{regex: λ}`` mapping (each path escaped: it matches itself only)."""
    return {re.escape(p): lam for p, lam in lambdas.items()}
