"""``l2="auto"``: the MLP trained with one λ per selected kernel, tuned during the run.

:class:`AutoTrainer` is the :class:`~jaxl2.mnist.train.Trainer` of such a run, on the library's
:func:`jaxl2.auto_l2` (Luketina et al., ICML 2016: the hypergradient of the validation loss
through one optimizer step, on ``ln λ``). Its state carries the λs (``ln λ`` and the Adam
state of the hyper-optimizer), so a checkpoint holds them and a resume continues exactly.

Every ``l2_every``-th training step (``step % l2_every == 0``) also draws a validation batch
of ``batch_size`` examples (keyed on the state's rng and step, with replacement) and updates
the λs; the steps in between are plain training steps with the current λs. The validation
split is the one the run reports (and keeps its best epoch by): like a grid search, the run
chooses λ with it, so only the test accuracy is untouched by the choice.

The defaults (``l2_init`` 1e-4, ``l2_every`` 4, ``l2_lr`` 0.02 for :func:`jaxl2.auto.shared_adam`)
were chosen from runs on ``mnist5k`` with momentum SGD and Adam, three seeds each: other learning
rates (0.01, 0.05), a λ update every step (≈ 1.5× the time) and a start at 1e-3 were no better on
validation; per-coordinate Adam on ``ln λ`` drove the output layer's λ to its bound under Adam.
The README's "λ chosen for you" section has the numbers and ``experiments/auto_l2.py``'s table.

Example:
  >>> from jaxl2.mnist.config import Config
  >>> from jaxl2.mnist.hypergrad import AutoTrainer
  >>> trainer = AutoTrainer(Config(l2="auto", hidden=(8,), batch_size=4, epochs=1), num_train=8)
  >>> {p: f"{lam:.3g}" for p, lam in trainer.lambdas(trainer.init()).items()}  # every λ at l2_init
  {'params/Dense_0/kernel': '0.0001', 'params/Dense_1/kernel': '0.0001'}
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2.auto import AutoL2State, auto_l2, shared_adam
from jaxl2.mnist.config import AUTO_DEFAULTS, AUTO_L2_BOUNDS, Config
from jaxl2.mnist.model import abstract_params
from jaxl2.mnist.train import Trainer, TrainState
from jaxl2.penalty import l2_penalty

__all__ = ["AutoTrainState", "AutoTrainer", "lambdas_of", "l2_at"]


def lambdas_of(paths: list[str], log_l2: jax.Array) -> dict[str, float]:
    """``{path: λ}`` of ``ln λ`` per path, as Python floats (the state's λs, on the host)."""
    lam_L = np.exp(np.asarray(jax.device_get(log_l2), np.float64))
    return {p: float(lam) for p, lam in zip(paths, lam_L)}


def l2_at(rows: list[dict[str, Any]], epoch: int) -> dict[str, float]:
    """``{path: λ}`` at the end of ``epoch``, from the ``l2/PATH`` columns of ``metrics.jsonl`` rows."""
    row = next(r for r in rows if r["epoch"] == epoch)
    return {k[len("l2/") :]: v for k, v in row.items() if k.startswith("l2/")}


class AutoTrainState(TrainState):
    """:class:`~jaxl2.mnist.train.TrainState` and ``l2``, the λs' state (:class:`jaxl2.AutoL2State`)."""

    l2: AutoL2State


class AutoTrainer(Trainer):
    """The jitted functions of an ``l2="auto"`` run; the epoch also takes the validation split.

    * ``train_step(state, (x, y), val_batch=None) -> (state, metrics)``: :meth:`hyper_step`, jitted;
    * ``train_epoch(state, x, y, x_val, y_val) -> (state, metrics)``: :meth:`run_epoch`, the epoch of
      :class:`~jaxl2.mnist.train.Trainer`, with a λ update every ``l2_every`` steps; its
      metrics add ``l2/PATH`` (each λ at the end of the epoch) and ``hypergrad/PATH`` (the
      mean of ``∂ val loss/∂ ln λ`` over the epoch's λ updates);
    * ``lambdas(state) -> {path: λ}``.
    """

    def __init__(self, cfg: Config, num_train: int, *, mesh: Any = None):
        super().__init__(cfg, num_train, mesh=mesh)
        self.auto = auto_l2(
            self.data_loss,
            self.tx,
            l2=self.cfg.l2_init,
            select=self.select,
            hyper_tx=shared_adam(self.cfg.l2_lr),
            bounds=AUTO_L2_BOUNDS,
            has_aux=True,
            norms=False,  # the norms are taken once per epoch, from the state (as Trainer does)
        )
        self.paths = self.auto.paths(abstract_params(self.cfg))
        self.train_step = jax.jit(self.hyper_step, donate_argnums=0)
        self.train_epoch = jax.jit(self.run_epoch)

    def state_of(self, params: Any, rng: jax.Array) -> AutoTrainState:
        """The state at step 0, every λ at ``l2_init``."""
        s = super().state_of(params, rng)
        return AutoTrainState(s.step, s.params, s.opt_state, s.rng, self.auto.init(params))

    def lambdas(self, state: AutoTrainState) -> dict[str, float]:
        """``{path: λ}`` of ``state``, as Python floats."""
        return lambdas_of(self.paths, state.l2.log_l2)

    def hyper_step(self, state: AutoTrainState, batch, val_batch=None) -> tuple[AutoTrainState, dict]:
        """One step of :func:`jaxl2.auto_l2`; with ``val_batch`` also the λ update."""
        params, opt_state, l2, metrics = self.auto.step(
            state.params,
            state.opt_state,
            state.l2,
            tuple(batch),
            None if val_batch is None else tuple(val_batch),
        )
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, l2=l2), metrics

    def run_epoch(self, state: AutoTrainState, x_NxD, y_N, xv_MxD, yv_M) -> tuple[AutoTrainState, dict]:
        idx_SxB = self.batches(state, x_NxD.shape[0])
        every, n_val, bs = self.cfg.l2_every, yv_M.shape[0], self.cfg.batch_size
        n_paths = state.l2.log_l2.shape[0]

        def plain(st, batch):
            st, m = self.hyper_step(st, batch)
            return st, {**m, "val_loss": jnp.float32(0), "hypergrad": jnp.zeros((n_paths,), jnp.float32)}

        def hyper(st, batch):
            key = jax.random.fold_in(jax.random.fold_in(st.rng, st.step), 1)
            idx_B = jax.random.randint(key, (bs,), 0, n_val)
            return self.hyper_step(st, batch, self.shard(xv_MxD[idx_B], yv_M[idx_B]))

        def body(st, idx_B):
            batch = self.shard(x_NxD[idx_B], y_N[idx_B])
            updating = st.step % every == 0
            st, m = jax.lax.cond(updating, hyper, plain, st, batch)
            return st, {**m, "updating": updating}

        start = state.params
        state, metrics_S = jax.lax.scan(body, state, idx_SxB)
        updating_S = metrics_S.pop("updating").astype(jnp.float32)
        hypergrad_SxL = metrics_S.pop("hypergrad")
        metrics_S.pop("val_loss")
        metrics = jax.tree_util.tree_map(jnp.mean, metrics_S)
        bad_S = ~jnp.isfinite(metrics_S["loss"])
        metrics["nonfinite_step"] = jnp.where(bad_S.any(), jnp.argmax(bad_S), -1)
        # as Trainer's rows: the penalty (with the epoch's last λs) and norms of the final params
        penalty = l2_penalty(state.params, self.auto.rules(state.params, state.l2), select=self.select)
        metrics = self.with_final_params(metrics, start, state.params, penalty)
        hypergrad_L = (updating_S @ hypergrad_SxL) / jnp.maximum(updating_S.sum(), 1.0)
        lam_L = jnp.exp(state.l2.log_l2)
        for i, path in enumerate(self.paths):
            metrics[f"l2/{path}"] = lam_L[i]
            metrics[f"hypergrad/{path}"] = hypergrad_L[i]
        return state, metrics

    def summary(self, state: AutoTrainState, rows: list[dict[str, Any]], best_epoch: int):
        """The penalty's λs: those of the best epoch (its ``metrics.jsonl`` row); the summary
        gains ``l2_final``, the λs at the end."""
        return l2_at(rows, best_epoch), {"l2_final": self.lambdas(state)}

    def refit_config(self, summary: dict[str, Any] | None) -> Config | None:
        """The run's final λ per layer (``summary["l2_final"]``), fixed: the refit has no
        validation split to tune them on (the refit's trainer validates it); ``None`` before the
        run has a summary."""
        if summary is None:
            return None
        lambdas = {re.escape(path): lam for path, lam in summary["l2_final"].items()}
        return dataclasses.replace(self.cfg, l2=lambdas, **AUTO_DEFAULTS)
