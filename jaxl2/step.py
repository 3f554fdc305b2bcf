"""A pure, jittable train step for any params pytree: L2 in the loss, the optimizer from optax.

``step(params, opt_state, *batch) -> (params, opt_state, metrics)`` is
``value_and_grad`` of ``loss_fn + λ/2·Σw²`` → ``tx.update`` → ``optax.apply_updates``, nothing
else; ``jax.grad`` supplies the ``λ·w`` term. Only floating-point array leaves are
differentiated and updated: other leaves (an Equinox module's functions, integer counters)
pass through unchanged, as with ``eqx.filter_grad``.

Example:
  >>> import jax, jax.numpy as jnp, optax, jaxl2
  >>> def mse(params, x, y):
  ...     return jnp.mean((x @ params["dense"]["kernel"] - y) ** 2)
  >>> params = {"dense": {"kernel": jnp.ones((2, 1))}}
  >>> step = jaxl2.make_train_step(mse, optax.sgd(0.1), l2=0.5)
  >>> jstep = jax.jit(step, donate_argnums=(0, 1))
  >>> params, opt_state, metrics = jstep(params, step.init(params), jnp.zeros((4, 2)), jnp.zeros((4, 1)))
  >>> params["dense"]["kernel"].ravel().tolist()  # w − lr·λ·w = 1 − 0.1·0.5
  [0.949999988079071, 0.949999988079071]
  >>> sorted(metrics)
  ['data_loss', 'loss', 'penalty']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxl2 import rules as _rules
from jaxl2 import select as _select
from jaxl2.decay import ScheduleState
from jaxl2.errors import Jaxl2Error, describe, shown
from jaxl2.norms import global_norms, group_norms
from jaxl2.penalty import add_penalty, check_rules, describe_output, l2_penalty
from jaxl2.rules import L2, Stacked, check_bool, check_l2

__all__ = ["make_train_step", "ScheduledState", "check_loss_and_tx"]


ScheduledState = ScheduleState  # the one schedule-state type; this name stays for users' isinstance checks


def _is_pytree(value: Any) -> bool:
    """A container (params, an optimizer state, an Equinox module), not one λ or a schedule."""
    leaves = jax.tree.leaves(value)
    return value is not None and not (len(leaves) == 1 and leaves[0] is value)


def check_loss_and_tx(loss_fn: Any, tx: Any, fn: str, name: str = "tx") -> None:
    """Refuses a ``loss_fn`` that is not a function or a ``tx`` (the argument ``name``) that is not
    an optax optimizer, naming what came in a few words (never a pytree's repr) and saying so when
    they look swapped or the params came as ``tx`` (``fn``: the function they were given to).

    Examples:
      >>> import optax
      >>> check_loss_and_tx(optax.sgd(0.1), lambda p: 0.0, "make_train_step")
      Traceback (most recent call last):
      ...
      jaxl2.errors.Jaxl2Error: loss_fn must be a function loss_fn(params, *batch), got an optax GradientTransformationExtraArgs; are loss_fn and tx swapped? make_train_step(loss_fn, tx, l2=λ)
    """
    if not callable(loss_fn):
        swapped = hasattr(loss_fn, "init") and hasattr(loss_fn, "update") and callable(tx)
        hint = f"; are loss_fn and tx swapped? {fn}(loss_fn, tx, l2=λ)" if swapped else ""
        raise Jaxl2Error(f"loss_fn must be a function loss_fn(params, *batch), got {shown(loss_fn)}{hint}")
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        hint = f"; the params go to the step, not to {fn}" if _is_pytree(tx) else ""
        raise Jaxl2Error(f"{name} must be an optax GradientTransformation, got {shown(tx)}{hint}")


def _advance(count: Any, before: Any, after: Any) -> Any:
    """The count of applied updates after ``tx`` went from state ``before`` to ``after``: one more,
    or, where the state counts the updates it applies apart from its calls (``optax.MultiSteps``'
    ``gradient_step``, which advances once every k micro-batches), one more only when that did."""
    real = optax.tree_utils.tree_get(before, "gradient_step")
    if real is None:
        return optax.safe_increment(count)
    applied = optax.tree_utils.tree_get(after, "gradient_step") != real
    return jnp.where(applied, optax.safe_increment(count), count)


def make_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    l2: L2 = 0.0,
    select: _select.Selector = None,
    center: Any = None,
    stacked: Stacked = None,
    has_aux: bool = False,
    norms: bool = False,
) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
    """A pure train step on ``loss_fn(params, *batch) + λ/2·Σ(w − w₀)²`` for any params pytree.

    ``step(params, opt_state, *batch) -> (params, opt_state, metrics)``:

    * the loss is ``loss_fn`` plus :func:`jaxl2.l2_penalty` over the selected leaves
      (``w₀ = center``, default 0; per layer slice for ``stacked`` leaves), so the gradient
      gains ``λ·(w − w₀)`` there and nothing elsewhere; ``l2=0`` (a number) adds no penalty and
      selects nothing;
    * ``updates, opt_state = tx.update(grads, opt_state, params)``, then
      ``optax.apply_updates``; decoupled decay, if any, belongs to ``tx``;
    * ``metrics``: ``loss`` (total), ``data_loss``, ``penalty``; with ``has_aux`` the entries
      of ``loss_fn``'s aux mapping too (a key that the step's own metrics hold is an error).
      That is all by default: the step costs what a hand-written one does. With ``norms=True`` also :func:`jaxl2.norms.group_norms`: the
      global ``param_norm`` (before the step), ``grad_norm`` and ``update_norm``, and per
      group (each rule of an ``l2`` mapping, else each selected unit, and ``unselected``)
      ``param_norm/G``, ``grad_norm/G``, ``update_norm/G`` and ``decay_share/G``, from one
      pass over each leaf's weights, gradient and update (with ``l2=0``, the global three).

    ``step.init(params)`` builds the optimizer state the step expects: ``tx.init`` of the
    float leaves, or, when ``l2`` holds an optax schedule (``l2=optax.cosine_decay_schedule(…)``,
    or a schedule as a value of the mapping), a :class:`ScheduledState` ``(count, tx state)``:
    the step reads the schedules at ``count``, the number of updates ``tx`` has applied, and
    increments it when ``tx`` applies one, so λ follows the learning rate's schedule: under
    ``optax.MultiSteps(tx, k)`` (gradient accumulation; any state holding its
    ``gradient_step``) the k micro-batches of one update share one λ and ``count`` advances once
    per k calls. ``step.init`` is an attribute of the plain step, which ``jax.jit`` keeps and
    ``eqx.filter_jit`` does not: build the state with ``step.init`` before or beside compiling.

    Only floating-point array leaves are differentiated and updated; for params with other
    leaves (an Equinox module), compile with ``eqx.filter_jit``.

    Args:
      loss_fn: ``loss_fn(params, *batch)`` → scalar data loss, or ``(loss, aux)`` with
        ``has_aux=True`` (aux: a mapping of metrics, or anything, kept under ``"aux"``).
      tx: the optax optimizer.
      l2: λ (a number, a traced scalar, an optax schedule, or an ordered ``{regex: λ}``
        mapping of those), as in :func:`jaxl2.l2_penalty`.
      select: which leaves are penalised (default: the kernels).
      center: reference weights ``w₀`` (L2-SP), a pytree of the params' structure, or None.
      stacked: ``{regex over leaf paths: layer axis}`` for stacked layers, as in
        :func:`jaxl2.l2_penalty`.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      norms: whether to add the per-group and global norms to the metrics.

    Returns:
      The pure step, with its ``init``; ``jax.jit(step, donate_argnums=(0, 1))`` compiles it
      once and reuses the params' and optimizer state's buffers.

    Raises:
      Jaxl2Error: at once for a bad ``loss_fn``, ``tx``, ``l2`` (params or an optimizer state
        given as ``l2`` are summarised, never printed), ``select``, ``stacked``, ``center``,
        ``has_aux`` or ``norms``; at trace time when ``loss_fn``'s output does not fit
        ``has_aux`` or is not a scalar, when its aux has a key of the step's metrics, when the
        rules do not fit the params, or when a scheduled step is given a state that
        ``step.init`` did not build.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxl2
      >>> loss = lambda p, x: jnp.sum(p["layer"]["bias"] * x)
      >>> params = {"layer": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.ones(2)}}
      >>> step = jaxl2.make_train_step(loss, optax.sgd(1.0), l2=0.25)
      >>> new, _, m = step(params, step.init(params), jnp.ones(2))
      >>> float(new["layer"]["kernel"][0, 0]), float(m["penalty"])  # 2 − 0.25·2; 0.25/2·16
      (1.5, 2.0)

      λ on a schedule, read at the step count:

      >>> step = jaxl2.make_train_step(loss, optax.sgd(1.0), l2=optax.linear_schedule(0.25, 0.0, 1))
      >>> state = step.init(params)
      >>> p1, state, m1 = step(params, state, jnp.ones(2))
      >>> p2, state, m2 = step(p1, state, jnp.ones(2))
      >>> float(m1["penalty"]), float(m2["penalty"]), int(state.count)  # λ = 0.25, then 0
      (2.0, 0.0, 2)
    """
    check_loss_and_tx(loss_fn, tx, "make_train_step")
    if any(_is_pytree(v) for v in (l2.values() if isinstance(l2, Mapping) else [l2])):
        raise Jaxl2Error(
            "l2 must be λ (a number, a 0-d array, an optax schedule, or an ordered {regex: λ} mapping of "
            f"those), got {describe(l2)}: params or an optimizer state? They go to the step, "
            "step(params, opt_state, *batch), not to make_train_step"
        )
    # l2=0, a concrete number (a traced λ, as in a vmapped sweep, never is), adds no penalty
    penalised = (
        isinstance(l2, Mapping | jax.core.Tracer) or _rules.is_schedule(l2) or float(check_l2(l2)) != 0
    )
    if penalised:
        check_rules(l2, select=select, center=center, stacked=stacked, schedule=True)
    has_aux = check_bool(has_aux, "has_aux")
    norms = check_bool(norms, "norms")
    scheduled = penalised and _rules.has_schedule(l2)

    def objective(params: Any, count: Any, *batch: Any) -> tuple[Any, dict[str, Any]]:
        out = loss_fn(params, *batch)
        add_penalty(out, 0, has_aux=has_aux)  # an output that does not fit has_aux fails here
        out = out if has_aux else (out, {})
        data_loss = out[0]
        if getattr(data_loss, "shape", ()) != ():
            raise Jaxl2Error(
                "loss_fn must return a scalar loss (e.g. the mean over the batch); it returned "
                + describe_output(data_loss)
            )
        if penalised:
            pen = l2_penalty(params, l2, select=select, center=center, stacked=stacked, step=count)
        else:
            pen = jnp.zeros_like(data_loss)
        return add_penalty(out, pen, has_aux=True)

    def init(params: Any) -> Any:
        state = tx.init(_select.float_part(params)[0])
        return ScheduleState(jnp.zeros([], jnp.int32), state) if scheduled else state

    def step(params: Any, opt_state: Any, *batch: Any) -> tuple[Any, Any, dict[str, jax.Array]]:
        count = None
        if scheduled:
            if not isinstance(opt_state, ScheduleState):
                raise Jaxl2Error(
                    "l2 holds a schedule, so the step counts its steps in the optimizer state: build "
                    "it with step.init(params) (a jaxl2.step.ScheduledState(count, tx state)), "
                    f"not tx.init(params); got {type(opt_state).__name__}"
                )
            count, opt_state = opt_state
        arrays, merge = _select.float_part(params)

        def of_arrays(a, *b):
            return objective(merge(a), count, *b)

        (loss, aux), grads = jax.value_and_grad(of_arrays, has_aux=True)(arrays, *batch)
        updates, new_state = tx.update(grads, opt_state, arrays)
        new_arrays = optax.apply_updates(arrays, updates)
        metrics = {"loss": loss}
        if norms and penalised:
            kw = dict(select=select, stacked=stacked, center=center, step=count)
            metrics.update(group_norms(arrays, grads, updates, l2, **kw))
        elif norms:
            metrics.update(global_norms(arrays, grads, updates))
        if taken := sorted(set(aux) & set(metrics)):
            raise Jaxl2Error(
                f"loss_fn's aux has a {taken[0]!r} entry, which the step's metrics hold ('loss' the "
                "total loss; with norms=True 'param_norm', 'grad_norm', 'update_norm' and the same per "
                "group); rename that key in loss_fn's aux"
            )
        if scheduled:
            new_state = ScheduleState(_advance(count, opt_state, new_state), new_state)
        return merge(new_arrays), new_state, {**aux, **metrics}

    step.init = init  # type: ignore[attr-defined]  # the step function carries its own init
    return step
