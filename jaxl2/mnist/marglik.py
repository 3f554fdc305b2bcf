"""``l2="evidence"``: λ chosen during the run by the Laplace evidence.

:class:`EvidenceTrainer` is the :class:`~jaxl2.mnist.train.Trainer` of such a run. The run
trains on **all** of train ∪ validation (no split is needed to choose λ, and there is no
refit); every ``evidence_every``-th epoch (``epoch % evidence_every == 0``) ends with

1. the Gauss–Newton of the summed cross-entropy over every training example, at that epoch's
   params (:func:`jaxl2.ggn`: K-FAC factors per layer, EK-FAC, or the exact diagonal; or the
   whole GGN's quadrature, :func:`jaxl2.ggn_lanczos`), and ``log p(D | w)``;
2. the λs that maximise the evidence at those params (:func:`jaxl2.evidence_l2`, ``α = n·λ``),
   within :data:`~jaxl2.mnist.config.AUTO_L2_BOUNDS`: the root of ``Σ_l γ_l = α·Σ_l ‖w_l‖²`` for
   one λ shared by the selected leaves (``evidence_lambda="shared"``, the default), of
   ``γ_l = α_l·‖w_l‖²`` for one each (``"layer"``), by ``evidence_steps`` halvings of the bounds
   in ``ln λ`` (``evidence_method="bisect"``, the default), MacKay iterations from the current
   λs (``"mackay"``) or steps of Adam on ``ln λ`` from them (``"adam"``, learning rate 0.1, as
   laplace-torch's ``marglik_training``; its moments start afresh at each update);
3. the log evidence at the new λs (:func:`jaxl2.log_evidence`), recorded with them.

The prior covers the kernels (``evidence_prior="kernels"``, the default: the biases are
neither penalised nor in the evidence, held at their values as :mod:`jaxl2.evidence` states) or
every tensor, kernels and biases (``"all"``, laplace-torch's "layerwise" with
``evidence_lambda="layer"``, its "scalar" with ``"shared"``); the training loss's penalty covers
the same tensors, so the run is the MAP of that prior.

Why shared: with the kernels only, scaling layer ``l``'s kernel and bias by ``c`` and layer
``l + 1``'s kernel by ``1/c`` leaves the MLP's function unchanged and costs no penalty on the
biases; the penalised optimum over that rescaling has ``λ_l·‖w_l‖²`` equal in every layer and
depends on the λs through their product only. The layers' ratios of λ are then not something
the trained function shows; per layer, the evidence's updates drift them apart for as long as
the run trains (``docs/guide/evidence.md`` shows it).

The epochs in between train with the current λs. The state carries ``ln λ`` and the last log
evidence, so a checkpoint holds them and a resume continues bit for bit.

The curvature is the library's (:func:`jaxl2.ggn`, its K-FAC, EK-FAC and exact diagonal found
from the MLP's Dense layers by :mod:`jaxl2.kfac`): a few gradients' cost where per-example
Jacobians take hundreds (``python experiments/evidence_cost.py``).

Example:
  >>> from jaxl2.mnist.config import Config
  >>> from jaxl2.mnist.marglik import EvidenceTrainer
  >>> cfg = Config(l2="evidence", hidden=(8,), batch_size=4, epochs=1, evidence_every=1)
  >>> trainer = EvidenceTrainer(cfg, num_train=8)
  >>> {p: f"{lam:.3g}" for p, lam in trainer.lambdas(trainer.init()).items()}  # every λ at l2_init
  {'params/Dense_0/kernel': '0.0001', 'params/Dense_1/kernel': '0.0001'}
"""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2 import select as _select
from jaxl2.evidence import Curvature, evidence_l2, ggn, ggn_lanczos, log_evidence
from jaxl2.mnist.config import AUTO_L2_BOUNDS, Config
from jaxl2.mnist.hypergrad import l2_at, lambdas_of
from jaxl2.mnist.model import abstract_params
from jaxl2.mnist.train import Trainer, TrainState

__all__ = ["EvidenceTrainState", "EvidenceTrainer", "CHUNK", "LANCZOS_PROBES", "LANCZOS_STEPS"]

# evidence_curvature "lanczos": the probes and Lanczos steps of jaxl2.ggn_lanczos at each update
LANCZOS_PROBES, LANCZOS_STEPS = 2, 40
CHUNK = 1024  # examples per chunk of jaxl2.ggn's K-FAC, EK-FAC and diagonal


class EvidenceTrainState(TrainState):
    """:class:`~jaxl2.mnist.train.TrainState`, ``log_l2`` (``ln λ`` per selected leaf, all equal
    when shared) and
    ``log_evidence`` (at the last update; NaN before the first)."""

    log_l2: jax.Array
    log_evidence: jax.Array


class EvidenceTrainer(Trainer):
    """The jitted functions of an ``l2="evidence"`` run (``num_train``: train ∪ validation).

    * ``train_epoch(state, x, y) -> (state, metrics)``: :meth:`run_epoch`, jitted: the epoch of
      :class:`~jaxl2.mnist.train.Trainer` with the state's λs, then, every ``evidence_every``-th
      epoch, the λ update; its metrics add ``l2/PATH`` (each λ at the end of the epoch) and
      ``log_evidence``;
    * ``curvature(params, x, y) -> jaxl2.Curvature`` of the selected leaves;
    * ``lambdas(state) -> {path: λ}``.

    Its validation images are training data, so the run keeps every epoch's params (the last
    epoch's are its model) and has no refit.
    """

    latest = True
    trains_on_val = True

    def __init__(self, cfg: Config, num_train: int, *, mesh: Any = None):
        super().__init__(cfg, num_train, mesh=mesh)
        self.paths = [p for p, _ in _select.resolve(abstract_params(self.cfg), self.select)]
        self.train_epoch = jax.jit(self.run_epoch)

    def state_of(self, params: Any, rng: jax.Array) -> EvidenceTrainState:
        """The state at step 0: every λ at ``l2_init``, no log evidence yet (NaN)."""
        log_l2 = jnp.full((len(self.paths),), np.log(self.cfg.l2_init), jnp.float32)
        nan = jnp.full((), jnp.nan, jnp.float32)
        s = super().state_of(params, rng)
        return EvidenceTrainState(s.step, s.params, s.opt_state, s.rng, log_l2, nan)

    def rules(self, log_l2: jax.Array) -> dict[str, jax.Array]:
        """``{path: λ}`` of ``ln λ`` per selected leaf."""
        return {p: jnp.exp(log_l2[i]) for i, p in enumerate(self.paths)}

    def lambdas(self, state: EvidenceTrainState) -> dict[str, float]:
        """``{path: λ}`` of ``state``, as Python floats."""
        return lambdas_of(self.paths, state.log_l2)

    def curvature(
        self, params: Any, x_NxD: jax.Array, y_N: jax.Array, key: jax.Array | None = None
    ) -> Curvature:
        """The selected leaves' GGN over ``x_NxD, y_N``: :func:`jaxl2.ggn` of ``evidence_curvature``
        (K-FAC, EK-FAC or the exact diagonal, from the MLP's Dense layers, :data:`CHUNK` examples at
        a time), or :func:`jaxl2.ggn_lanczos` with ``key``."""

        def logits(p: Any, x: jax.Array) -> jax.Array:
            return cast(jax.Array, self.model.apply(p, x))  # no mutable state

        if self.cfg.evidence_curvature == "lanczos":
            key = jax.random.PRNGKey(0) if key is None else key
            return ggn_lanczos(
                logits,
                params,
                x_NxD,
                y_N,
                key=key,
                probes=LANCZOS_PROBES,
                steps=LANCZOS_STEPS,
                select=self.select,
            )
        structure = self.cfg.evidence_curvature
        return ggn(logits, params, x_NxD, y_N, structure=structure, select=self.select, batch_size=CHUNK)

    def update(self, state: EvidenceTrainState, x_NxD: jax.Array, y_N: jax.Array) -> EvidenceTrainState:
        """The λ update at ``state.params`` (``evidence_method``), then the evidence at the new λs."""
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)  # the shuffle's: one fold
        curv = self.curvature(state.params, x_NxD, y_N, key)
        rules = evidence_l2(
            curv,
            state.params,
            self.rules(state.log_l2),
            select=self.select,
            shared=self.cfg.evidence_lambda == "shared",
            method=self.cfg.evidence_method,
            steps=self.cfg.evidence_steps,
            bounds=AUTO_L2_BOUNDS,
        )
        log_l2 = jnp.log(jnp.stack([rules[p] for p in self.paths])).astype(jnp.float32)
        evidence = log_evidence(curv, state.params, rules, select=self.select).astype(jnp.float32)
        return state.replace(log_l2=log_l2, log_evidence=evidence)

    def run_epoch(self, state: EvidenceTrainState, x_NxD, y_N, xv_MxD=None, yv_M=None):
        """An epoch with the state's λs, then, every ``evidence_every``-th epoch, the λ
        update (:meth:`update`) on the epoch's training data (train ∪ validation); its
        metrics add ``l2/PATH`` (each λ after it) and ``log_evidence``. The validation split
        is not used."""
        state, metrics = self.epoch_fn(state, x_NxD, y_N, self.rules(state.log_l2))
        epoch = state.step // self.steps_per_epoch
        due = epoch % self.cfg.evidence_every == 0
        state = jax.lax.cond(due, self.update, lambda st, *_: st, state, x_NxD, y_N)
        lam = jnp.exp(state.log_l2)
        for i, path in enumerate(self.paths):
            metrics[f"l2/{path}"] = lam[i]
        metrics["log_evidence"] = state.log_evidence
        return state, metrics

    def summary(self, state: EvidenceTrainState, rows: list[dict[str, Any]], best_epoch: int):
        """The penalty's λs: those the best (the last) epoch trained with, the row before's (an
        update ends an epoch); the summary gains ``l2_final`` and ``log_evidence``."""
        before = (
            l2_at(rows, best_epoch - 1) if best_epoch > 1 else dict.fromkeys(self.paths, self.cfg.l2_init)
        )
        evidence = float(state.log_evidence)
        return before, {
            "l2_final": self.lambdas(state),
            "log_evidence": evidence if np.isfinite(evidence) else None,
        }

    def refit_config(self, summary: dict[str, Any] | None) -> Config | None:
        """None: the run trained on train ∪ validation, so nothing is left to refit on."""
        return None
