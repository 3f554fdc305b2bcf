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
  >>> tx = optax.sgd(0.1)
  >>> step = jax.jit(jaxl2.make_train_step(mse, tx, l2=0.5), donate_argnums=(0, 1))
  >>> params, opt_state, metrics = step(params, tx.init(params), jnp.zeros((4, 2)), jnp.zeros((4, 1)))
  >>> params["dense"]["kernel"].ravel().tolist()  # w − lr·λ·w = 1 − 0.1·0.5
  [0.949999988079071, 0.949999988079071]
  >>> sorted(metrics)
  ['data_loss', 'grad_norm', 'loss', 'param_norm', 'penalty', 'update_norm']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxl2 import select as _select
from jaxl2.errors import Jaxl2Error
from jaxl2.penalty import L2, add_penalty, check_bool, check_l2, regularized

__all__ = ["make_train_step"]


def _is_zero(l2: Any) -> bool:
    """A concrete number equal to 0 (a traced λ, as in a vmapped sweep, is never "zero")."""
    return not isinstance(l2, Mapping | jax.core.Tracer) and float(check_l2(l2)) == 0.0


def _norm(tree: Any) -> jax.Array:
    leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.sqrt(sum((jnp.sum(x * x) for x in leaves), jnp.float32(0)))


def make_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    l2: L2 = 0.0,
    select: _select.Selector = None,
    center: Any = None,
    has_aux: bool = False,
    norms: bool = True,
) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
    """A pure train step on ``loss_fn(params, *batch) + λ/2·Σ(w − w₀)²`` for any params pytree.

    ``step(params, opt_state, *batch) -> (params, opt_state, metrics)``:

    * the loss is ``loss_fn`` plus :func:`jaxl2.l2_penalty` over the selected leaves
      (``w₀ = center``, default 0), so the gradient gains ``λ·(w − w₀)`` there and nothing
      elsewhere; ``l2=0`` (a number) adds no penalty and selects nothing;
    * ``updates, opt_state = tx.update(grads, opt_state, params)``, then
      ``optax.apply_updates``; decoupled decay, if any, belongs to ``tx``;
    * ``metrics``: ``loss`` (total), ``data_loss``, ``penalty``, and with ``norms`` the
      global L2 norms ``param_norm`` (before the step), ``grad_norm`` and ``update_norm``;
      with ``has_aux`` the entries of ``loss_fn``'s aux mapping are added too.

    Only floating-point array leaves are differentiated and updated; for params with other
    leaves (an Equinox module), build ``opt_state`` with
    ``tx.init(eqx.filter(model, eqx.is_array))`` and compile with ``eqx.filter_jit``.

    Args:
      loss_fn: ``loss_fn(params, *batch)`` → scalar data loss, or ``(loss, aux)`` with
        ``has_aux=True`` (aux: a mapping of metrics, or anything, kept under ``"aux"``).
      tx: the optax optimizer.
      l2: λ (a number, a traced scalar, or an ordered ``{regex: λ}`` mapping), as in
        :func:`jaxl2.l2_penalty`.
      select: which leaves are penalised (default: the kernels).
      center: reference weights ``w₀`` (L2-SP), a pytree of the params' structure, or None.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      norms: whether to compute the three norms (each costs a pass over the params).

    Returns:
      The pure step; ``jax.jit(step, donate_argnums=(0, 1))`` compiles it once and reuses the
      params' and optimizer state's buffers.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxl2
      >>> loss = lambda p, x: jnp.sum(p["layer"]["bias"] * x)
      >>> params = {"layer": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.ones(2)}}
      >>> step = jaxl2.make_train_step(loss, optax.sgd(1.0), l2=0.25)
      >>> new, _, m = step(params, optax.sgd(1.0).init(params), jnp.ones(2))
      >>> float(new["layer"]["kernel"][0, 0]), float(m["penalty"])  # 2 − 0.25·2; 0.25/2·16
      (1.5, 2.0)
    """
    if not callable(loss_fn):
        raise Jaxl2Error(f"loss_fn must be a function loss_fn(params, *batch), got {type(loss_fn).__name__}")
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise Jaxl2Error(f"tx must be an optax GradientTransformation, got {type(tx).__name__}")
    penalised = not _is_zero(l2)

    has_aux = check_bool(has_aux, "has_aux")

    def data_only(params, *batch):
        out = loss_fn(params, *batch)
        if not has_aux:
            out = (out, {})
        data_loss = out[0] if isinstance(out, tuple | list) and len(out) == 2 else out
        return add_penalty(out, jnp.zeros_like(data_loss), has_aux=True)

    if not penalised:
        objective = data_only
    elif has_aux:
        objective = regularized(loss_fn, l2, select=select, center=center, has_aux=True)
    else:
        objective = regularized(
            lambda p, *b: (loss_fn(p, *b), {}), l2, select=select, center=center, has_aux=True
        )

    def step(params: Any, opt_state: Any, *batch: Any) -> tuple[Any, Any, dict[str, jax.Array]]:
        arrays, merge = _select.float_part(params)

        def of_arrays(a, *b):
            return objective(merge(a), *b)

        (loss, aux), grads = jax.value_and_grad(of_arrays, has_aux=True)(arrays, *batch)
        updates, opt_state = tx.update(grads, opt_state, arrays)
        new_arrays = optax.apply_updates(arrays, updates)
        metrics = {**aux, "loss": loss}
        if norms:
            metrics.update(param_norm=_norm(arrays), grad_norm=_norm(grads), update_norm=_norm(updates))
        return merge(new_arrays), opt_state, metrics

    return step
