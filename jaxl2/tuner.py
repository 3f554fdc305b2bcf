"""λ tuned during training by the evidence: Immer et al.'s loop, a pure piece of the user's own.

The loop of Immer et al. (*Scalable Marginal Likelihood Estimation for Model Selection in Deep
Learning*, ICML 2021; laplace-torch's ``marglik_training``): train an epoch with the current
λs; on a due epoch, measure the curvature at the params reached (:func:`jaxl2.ggn`), take a few
steps on ``ln λ`` up the Laplace evidence (MacKay's fixed point or bisection, as
:func:`jaxl2.evidence_l2` takes them, or Adam, whose moments carry over from update to update), record the log evidence at the new λs (:func:`jaxl2.log_evidence`) and, if
asked, keep the params of the best evidence so far. The training loss is the **mean** negative
log-likelihood over the ``n`` examples given to ``update`` plus ``λ/2·‖w‖²``, so the prior
precision is ``α = n·λ``.

Epochs are counted by ``update``, once per epoch: epoch ``e`` (1, 2, …) is due when
``e > burn_in`` and ``e % every == 0``. ``update`` is pure and jittable (``lax.cond`` on
"due"), and the λs it returns are traced values that ``l2=`` of :func:`jaxl2.make_train_step`
takes, so a step built inside the jitted function from ``tuner.rules(state)`` compiles once.

Example:
  >>> import jax, jax.numpy as jnp, optax, jaxl2
  >>> x = jax.random.normal(jax.random.key(0), (32, 3))
  >>> y = x @ jnp.array([[1.0], [-2.0], [0.5]]) + 0.3 * jax.random.normal(jax.random.key(1), (32, 1))
  >>> def apply_fn(params, x):
  ...     return x @ params["dense"]["kernel"]
  >>> def loss_fn(params, x, y):  # the mean negative log-likelihood (σ = 1) up to a constant
  ...     return jnp.mean((apply_fn(params, x) - y) ** 2) / 2
  >>> tx = optax.sgd(0.3)
  >>> tuner = jaxl2.evidence_tuner(
  ...     apply_fn, l2=1e-2, likelihood="gaussian", structure="full", method="mackay", steps=1
  ... )
  >>> @jax.jit
  ... def epoch(params, opt_state, tuner_state):
  ...     step = jaxl2.make_train_step(loss_fn, tx, l2=tuner.rules(tuner_state))  # traced λs
  ...     for _ in range(20):
  ...         params, opt_state, _ = step(params, opt_state, x, y)
  ...     return params, opt_state, tuner.update(tuner_state, params, x, y)
  >>> params = {"dense": {"kernel": jnp.zeros((3, 1))}}
  >>> opt_state, state = tx.init(params), tuner.init(params)
  >>> for _ in range(3):
  ...     params, opt_state, state = epoch(params, opt_state, state)
  >>> int(state.epoch), {p: f"{lam:.2f}" for p, lam in tuner.l2(state).items()}  # MacKay: α = γ/‖w‖²
  (3, {'dense/kernel': '0.02'})
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxl2 import select as _select
from jaxl2.errors import Jaxl2Error, check_number, shown
from jaxl2.evidence import LIKELIHOODS, METHODS, adam_ascent, evidence_l2, ggn, log_evidence
from jaxl2.rules import Stacked, check_bool, check_stacked, plan

__all__ = ["evidence_tuner", "EvidenceTuner", "EvidenceTunerState"]

STRUCTURES = ("full", "diag", "kron", "ekfac")


class EvidenceTunerState(NamedTuple):
    """What the tuner carries between epochs, a pytree (checkpoint it with the params):
    ``log_l2`` (``{unit: ln λ}``: a selected leaf's path, or ``path[i]`` for a slice of a stacked
    leaf), ``epoch`` (the epochs ``update`` has seen), ``log_evidence`` (at the last update's λs;
    NaN before the first), ``hyper_state`` (with ``method="adam"``, Adam's state on ``log_l2``;
    else ``None``) and, with ``keep_best`` (else ``None``), ``best_params``, ``best_log_l2`` and
    ``best_evidence``: the params of the highest log evidence so far, the λs it was measured at,
    and it (the params given to ``init`` and ``-inf`` before an update)."""

    log_l2: dict[str, jax.Array]
    epoch: jax.Array
    log_evidence: jax.Array
    hyper_state: Any = None
    best_params: Any = None
    best_log_l2: dict[str, jax.Array] | None = None
    best_evidence: jax.Array | None = None


class EvidenceTuner(NamedTuple):
    """The pure functions of :func:`evidence_tuner`.

    * ``init(params) -> EvidenceTunerState``: every unit at the initial λ;
    * ``update(state, params, x, y) -> EvidenceTunerState``: one call at the end of each epoch,
      with the params it reached and all the training data (``n = len(x)``); on a due epoch the
      λ update and the evidence, otherwise the count only;
    * ``rules(state) -> {regex: λ}``: the λs as traced values, for ``l2=`` of
      :func:`jaxl2.make_train_step` or :func:`jaxl2.l2_penalty` (each pattern an escaped unit
      name that matches its own unit only; pass the tuner's ``select`` and ``stacked`` there too);
    * ``l2(state) -> {unit: λ}``: the λs as Python floats, for logging.
    """

    init: Callable[[Any], EvidenceTunerState]
    update: Callable[[EvidenceTunerState, Any, jax.Array, jax.Array], EvidenceTunerState]
    rules: Callable[[EvidenceTunerState], dict[str, jax.Array]]
    l2: Callable[[EvidenceTunerState], dict[str, float]]


def evidence_tuner(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    *,
    l2: float = 1e-4,
    likelihood: str = "classification",
    sigma: float = 1.0,
    structure: str = "kron",
    select: _select.Selector = None,
    stacked: Stacked = None,
    shared: bool = False,
    method: str = "adam",
    steps: int = 10,
    lr: float = 0.1,
    every: int = 1,
    burn_in: int = 0,
    keep_best: bool = False,
    batch_size: int | None = 32,
    bounds: tuple[float, float] = (1e-8, 1e4),
) -> EvidenceTuner:
    """λ per selected unit (or one shared) tuned during training by the Laplace evidence.

    On a due epoch (``e > burn_in`` and ``e % every == 0``, ``e`` counting ``update`` calls from
    1), at the params reached: ``H`` = :func:`jaxl2.ggn` of ``structure``; ``steps`` of ``method``
    on ``ln λ`` from the current λs, clipped to ``bounds``, so that ``α = n·λ`` climbs
    ``log p(D|w) − ½·Σ α_l‖w_l‖² + ½·log det A − ½·log det(H + A)`` (``"mackay"`` and ``"bisect"``:
    :func:`jaxl2.evidence_l2`'s; ``"adam"``: Adam whose moments go on from one update to the next,
    as in Immer et al.'s loop, where :func:`jaxl2.evidence_l2` starts them afresh); the log evidence at the new λs is recorded, and with ``keep_best`` the
    params whose evidence is the highest so far are kept (they double the params' memory). The
    defaults are laplace-torch's ``marglik_training``'s: K-FAC, Adam on ``ln λ`` with learning
    rate 0.1, 10 steps every epoch, no burn-in.

    Args:
      apply_fn: ``apply_fn(params, x)`` → the outputs, as :func:`jaxl2.ggn` takes it.
      l2: the initial λ of every unit, a finite number ``> 0`` within ``bounds``.
      likelihood: ``"classification"`` or ``"gaussian"`` (noise scale ``sigma``), as in
        :func:`jaxl2.ggn`; the training loss must be its mean negative log-likelihood.
      structure: the curvature: ``"kron"`` (K-FAC), ``"ekfac"``, ``"diag"`` or ``"full"``.
      select: the leaves with a prior (default: the kernels); pass it to the step's penalty too.
      stacked: ``{regex: axis}``: a λ per slice of a stacked leaf, as in :func:`jaxl2.l2_penalty`.
      shared: one λ for every unit.
      method: ``"adam"``, ``"mackay"`` or ``"bisect"``, as in :func:`jaxl2.evidence_l2`.
      steps: its steps at each update (an integer ``>= 1``).
      lr: Adam's learning rate on ``ln λ``.
      every: an update every ``every`` epochs.
      burn_in: epochs trained before the first update.
      keep_best: whether the state keeps the params of the best evidence.
      batch_size: examples per vectorised Jacobian in :func:`jaxl2.ggn`, or ``None``.
      bounds: ``(lo, hi)``: the λs stay within them.

    Returns:
      An :class:`EvidenceTuner`: ``init``, ``update``, ``rules``, ``l2``.

    Raises:
      Jaxl2Error: for a bad argument, at once; an empty selection at ``init``.
    """
    if not callable(apply_fn):
        raise Jaxl2Error(f"apply_fn must be a function apply_fn(params, x), got {shown(apply_fn)}")
    if likelihood not in LIKELIHOODS:
        raise Jaxl2Error(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
    if structure not in STRUCTURES:
        raise Jaxl2Error(f"structure must be one of {', '.join(STRUCTURES)}, got {structure!r}")
    if method not in METHODS:
        raise Jaxl2Error(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not (isinstance(bounds, tuple | list) and len(bounds) == 2):
        raise Jaxl2Error(f"bounds must be a pair (lo, hi), got {shown(bounds)}")
    lo = check_number(bounds[0], "bounds[0] (the least λ)", above=True)
    hi = check_number(bounds[1], "bounds[1] (the largest λ)", low=lo, above=True)
    check_number(l2, "l2 (the initial λ)", above=True)
    if not lo <= l2 <= hi:
        raise Jaxl2Error(f"l2 (the initial λ) {l2!r} is outside bounds ({lo:g}, {hi:g})")
    check_number(sigma, "sigma (the Gaussian noise scale)", above=True)
    check_number(steps, "steps", integer=True, low=1)
    check_number(lr, "lr", above=True)
    check_number(every, "every", integer=True, low=1)
    check_number(burn_in, "burn_in", integer=True)
    if batch_size is not None:
        check_number(batch_size, "batch_size", integer=True, low=1)
    check_bool(shared, "shared")
    check_bool(keep_best, "keep_best")
    _select.predicate(select)  # a bad selector or stacked fails now, not at init
    check_stacked(stacked)
    hyper_tx = optax.adam(lr)

    def init(params: Any) -> EvidenceTunerState:
        entries = plan(params, l2, select=select, stacked=stacked)
        dtype = jnp.promote_types(jnp.float32, jnp.result_type(*(e.leaf for e in entries)))
        log_l2 = {u: jnp.asarray(math.log(l2), dtype) for e in entries for u in e.units}
        hyper_state = hyper_tx.init(log_l2) if method == "adam" else None
        state = EvidenceTunerState(log_l2, jnp.zeros((), jnp.int32), jnp.asarray(jnp.nan, dtype), hyper_state)
        if not keep_best:
            return state
        copy = jax.tree.map(lambda w: jnp.array(w) if isinstance(w, jax.Array | np.ndarray) else w, params)
        return state._replace(
            best_params=copy, best_log_l2=log_l2, best_evidence=jnp.asarray(-jnp.inf, dtype)
        )

    def rules_of(log_l2: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {re.escape(u): jnp.exp(v) for u, v in log_l2.items()}

    def rules(state: EvidenceTunerState) -> dict[str, jax.Array]:
        return rules_of(state.log_l2)

    def l2_of(state: EvidenceTunerState) -> dict[str, float]:
        return {u: float(np.exp(np.float64(jax.device_get(v)))) for u, v in state.log_l2.items()}

    def tie(g: dict[str, Any]) -> dict[str, Any]:
        """With ``shared``, one λ: the evidence's derivative in it is the sum over the units."""
        return dict.fromkeys(g, sum(g.values())) if shared else g

    def tune(
        state: EvidenceTunerState, params: Any, x: jax.Array, y: jax.Array
    ) -> tuple[dict, Any, jax.Array]:
        """The new ``ln λ``, Adam's moments and the log evidence at the new λs."""
        curv = ggn(
            apply_fn,
            params,
            x,
            y,
            likelihood=likelihood,
            sigma=sigma,
            structure=structure,
            select=select,
            batch_size=batch_size,
        )

        def evidence(log_l2: dict) -> jax.Array:
            return log_evidence(curv, params, rules_of(log_l2), select=select, stacked=stacked)

        if method == "adam":  # Adam's moments go on from update to update, as in Immer et al.'s loop
            log_l2, hyper_state = adam_ascent(
                evidence, state.log_l2, hyper_tx, state.hyper_state, steps, (lo, hi), tie
            )
        else:
            new = evidence_l2(
                curv,
                params,
                rules(state),
                select=select,
                stacked=stacked,
                shared=shared,
                method=method,
                steps=steps,
                bounds=(lo, hi),
            )
            log_l2 = {u: jnp.log(new[re.escape(u)]).astype(v.dtype) for u, v in state.log_l2.items()}
            hyper_state = None
        return log_l2, hyper_state, evidence(log_l2).astype(state.log_evidence.dtype)

    def update(state: EvidenceTunerState, params: Any, x: jax.Array, y: jax.Array) -> EvidenceTunerState:
        epoch = state.epoch + 1
        due = (epoch > burn_in) & (epoch % every == 0)
        # the arrays that change only: params and the best params may hold functions (Equinox)
        log_l2, hyper_state, evidence = jax.lax.cond(
            due,
            lambda: tune(state, params, x, y),
            lambda: (state.log_l2, state.hyper_state, state.log_evidence),
        )
        state = state._replace(log_l2=log_l2, epoch=epoch, log_evidence=evidence, hyper_state=hyper_state)
        if state.best_evidence is None:  # without keep_best
            return state
        better = due & (evidence > state.best_evidence)  # a NaN evidence is never better

        def pick(new: Any, old: Any) -> Any:
            return jnp.where(better, new, old) if isinstance(new, jax.Array | np.ndarray) else new

        return state._replace(
            best_params=jax.tree.map(pick, params, state.best_params),
            best_log_l2=jax.tree.map(pick, state.log_l2, state.best_log_l2),
            best_evidence=pick(state.log_evidence, state.best_evidence),
        )

    return EvidenceTuner(init=init, update=update, rules=rules, l2=l2_of)
