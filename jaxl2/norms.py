"""Norms per group of weights, gradients and updates, and the decay's share: what to log.

For a group ``G`` of units (selected leaves or layer slices, see :mod:`jaxl2.rules`):

* ``param_norm/G = ‖w‖_G``, ``grad_norm/G = ‖g‖_G``, ``update_norm/G = ‖u‖_G``, the L2 norms
  over all the entries of the group's units;
* ``decay_share/G = ‖λ·(w − w₀)‖_G / ‖g‖_G``: the penalty gradient's share of the gradient the
  optimizer receives (for SGD without momentum, exactly its share of the update), 0 where
  ``‖g‖_G = 0``.

The groups are the rules of an ``l2`` mapping (each pattern with the units it gives a λ), or
with one λ (or none) each selected unit; the floating-point leaves outside the selection form
the group ``unselected``. The global ``param_norm``, ``grad_norm`` and ``update_norm`` come
with them. One pass: each leaf's ``Σw²``, ``Σg²`` and ``Σu²`` (per slice, for a stacked leaf)
are taken once, and ``‖λ·w‖² = λ²·Σw²`` reuses ``Σw²``.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxl2.norms import group_norms
  >>> params = {"d": {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.ones(2)}}
  >>> grads = {"d": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.zeros(2)}}
  >>> n = group_norms(params, grads, grads, 0.5)
  >>> float(n["param_norm/d/kernel"]), float(n["decay_share/d/kernel"])  # √(4·9); ‖0.5·w‖/‖g‖ = 3/4
  (6.0, 0.75)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxl2 import rules as _rules
from jaxl2 import select as _select
from jaxl2.errors import Jaxl2Error
from jaxl2.penalty import check_order
from jaxl2.rules import L2, Stacked

__all__ = ["group_norms", "global_norms", "UNSELECTED"]

UNSELECTED = "unselected"
NAMES = ("param_norm", "grad_norm", "update_norm")


def _sq(x: Any) -> jax.Array:
    """``Σx²`` in at least float32."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.sum(x * x)


def global_norms(params: Any, grads: Any, updates: Any) -> dict[str, jax.Array]:
    """``param_norm``, ``grad_norm`` and ``update_norm``: the L2 norms over every float leaf.

    Examples:
      >>> import jax.numpy as jnp
      >>> {k: float(v) for k, v in global_norms({"a": jnp.ones(4)}, {"a": jnp.ones(1)}, {"a": jnp.zeros(2)}).items()}
      {'param_norm': 2.0, 'grad_norm': 1.0, 'update_norm': 0.0}
    """
    out = {}
    for name, tree in zip(NAMES, (params, grads, updates)):
        sums = [_sq(x) for _, x in _select.leaves(tree)]
        out[name] = jnp.sqrt(sum(sums[1:], sums[0]) if sums else jnp.float32(0))
    return out


def _by_path(tree: Any, name: str, paths: list[str]) -> dict[str, Any]:
    found = dict(_select.leaves(tree))
    if missing := [p for p in paths if p not in found]:
        raise Jaxl2Error(
            f"{name} has no floating-point leaf at {missing[0]!r}, a path of params: "
            f"params, grads and updates must have the same structure"
        )
    return found


def group_norms(
    params: Any,
    grads: Any,
    updates: Any,
    l2: L2 | None = None,
    *,
    select: _select.Selector = None,
    stacked: Stacked = None,
    center: Any = None,
    step: Any = None,
) -> dict[str, jax.Array]:
    """Per-group ``‖w‖``, ``‖g‖``, ``‖u‖`` and the decay's share, as a flat mapping of scalars.

    Keys: ``param_norm/G``, ``grad_norm/G``, ``update_norm/G`` for every group ``G`` (and the
    group ``unselected`` when some float leaf is not selected), ``decay_share/G`` for every
    selected group when ``l2`` is given, and the global ``param_norm``, ``grad_norm``,
    ``update_norm``. The groups: with an ``l2`` mapping, its patterns (``G`` is the pattern);
    otherwise each unit (``G`` is its path, or ``path[i]`` for a slice of a ``stacked`` leaf).

    ``decay_share/G = ‖λ·(w − w₀)‖_G / ‖g‖_G`` (``w₀ = 0`` without ``center``), the penalty
    gradient's share of the gradient, for ``g`` the gradient of the regularized loss (as
    :func:`jaxl2.make_train_step` computes it); for plain SGD it is the decay's share of the
    update. Everything is jit-safe and accumulated in at least float32.

    Args:
      params: the params before the step.
      grads: the gradients, with the structure of ``params`` (float leaves).
      updates: the optimizer's updates, with the structure of ``params``.
      l2: ``None`` (groups per selected unit, no decay share), a λ, or ``{regex: λ}``, as in
        :func:`jaxl2.l2_penalty`.
      select: which leaves are selected, as in :func:`jaxl2.l2_penalty`.
      stacked: ``{regex: layer axis}`` of stacked leaves, as in :func:`jaxl2.l2_penalty`.
      center: the reference weights ``w₀`` of the decay, as in :func:`jaxl2.l2_penalty`.
      step: the step count at which schedules in ``l2`` are read.

    Returns:
      ``{key: scalar array}``.

    Raises:
      Jaxl2Error: as :func:`jaxl2.l2_penalty` for the selection and rules, and when ``grads``
        or ``updates`` lack a float leaf that ``params`` has.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones(4)}}
      >>> n = group_norms(params, params, params, {"a/.*": 1e-2, ".*": 0.0})
      >>> sorted(k for k in n if k.startswith("param_norm"))
      ['param_norm', 'param_norm/.*', 'param_norm/a/.*']
    """
    check_order(params, l2, "group_norms")
    entries = {e.path: e for e in _rules.plan(params, l2, select=select, stacked=stacked, center=center)}
    w_all = _select.leaves(params)
    paths = [p for p, _ in w_all]
    g_all, u_all = _by_path(grads, "grads", paths), _by_path(updates, "updates", paths)
    sums: dict[str, list[Any]] = {}  # group -> [Σw², Σg², Σu², ‖λ(w − w₀)‖²]

    def add(group: str, values: list[Any]) -> None:
        sums[group] = [a + b for a, b in zip(sums[group], values)] if group in sums else values

    for path, w in w_all:
        e = entries.get(path)
        if e is None:
            add(UNSELECTED, [_sq(w), _sq(g_all[path]), _sq(u_all[path]), jnp.float32(0)])
            continue
        sw, sg, su = e.sq(w), e.sq(g_all[path]), e.sq(u_all[path])
        sd = sw if e.center is None else e.sq(w, e.center)
        lam = jnp.zeros_like(sd) if l2 is None else jnp.asarray(e.lam(step, sd.dtype), sd.dtype)
        lam = jnp.reshape(lam, jnp.shape(lam)[:1])  # a stacked leaf's λs as a vector, like sd
        parts = [sw, sg, su, jnp.broadcast_to(lam * lam * sd, sd.shape)]
        for i, unit in enumerate(e.units):
            group = e.rules[i] if isinstance(l2, Mapping) else unit
            add(group, [x if e.axis is None else x[i] for x in parts])
    out: dict[str, jax.Array] = {}
    for group, (sw, sg, su, sd) in sums.items():
        out.update({f"{name}/{group}": jnp.sqrt(x) for name, x in zip(NAMES, (sw, sg, su))})
        if l2 is not None and group != UNSELECTED:
            out[f"decay_share/{group}"] = jnp.where(
                sg > 0, jnp.sqrt(sd) / jnp.sqrt(jnp.where(sg > 0, sg, 1)), 0.0
            )
    out.update({name: jnp.sqrt(sum(v[k] for v in sums.values())) for k, name in enumerate(NAMES)})
    return out
