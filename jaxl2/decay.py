"""Weight decay as an optax transform, with jaxl2's selection and per-layer λ.

:func:`add_decayed_weights` adds ``λ_leaf·(w − w₀)`` (``w₀ = 0`` unless a ``center`` is given)
to the updates of the selected leaves and leaves every other update as it is. Where it sits in
an ``optax.chain`` decides what it is:

* **before** the optimizer (``sgd``, ``sgd`` with momentum, ``adam``, ...) it adds exactly the
  gradient of :func:`jaxl2.l2_penalty`, so it is L2 regularization (*coupled* decay), the same
  as training on :func:`jaxl2.regularized`;
* **between** ``optax.scale_by_adam()`` and ``optax.scale_by_learning_rate(lr)`` it is AdamW's
  *decoupled* decay (``optax.adamw``), with jaxl2's per-layer rules.

Example:
  >>> import jax.numpy as jnp, optax
  >>> from jaxl2.decay import add_decayed_weights
  >>> params = {"Dense_0": {"kernel": jnp.array([[2.0]]), "bias": jnp.array([2.0])}}
  >>> tx = optax.chain(add_decayed_weights(0.5), optax.sgd(0.1))
  >>> zero = {"Dense_0": {"kernel": jnp.zeros((1, 1)), "bias": jnp.zeros(1)}}
  >>> updates, _ = tx.update(zero, tx.init(params), params)
  >>> optax.apply_updates(params, updates)  # kernel: 2 − 0.1·0.5·2; the bias is not selected
  {'Dense_0': {'bias': Array([2.], dtype=float32), 'kernel': Array([[1.9]], dtype=float32)}}

:func:`audit` checks the other way round: what a given optax optimizer does to each leaf when
the data gradient is zero (its decay), against jaxl2's selection. With a zero gradient, whatever
an optimizer still does to a weight is its decay: one step ``tx.update(0, tx.init(params),
params)`` shows, per leaf, whether it is decayed and by how much, so a decayed bias, norm scale
or embedding, a kernel left alone (an inverted mask, a mask with wrong names), or a decay too
small for the weights' dtype (bf16) shows before training.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxl2 import rules as _rules
from jaxl2 import select as _select
from jaxl2.errors import Jaxl2Error, check_number, describe
from jaxl2.penalty import check_rules
from jaxl2.rules import L2, Stacked, has_schedule
from jaxl2.table import format_shape, format_table

__all__ = ["add_decayed_weights", "audit", "AuditRow", "Audit", "ScheduleState"]


class ScheduleState(NamedTuple):
    """The state of a λ schedule: the step count (the schedules are read at ``count``, then it
    is incremented, as optax's schedules count), and the optimizer's own state where there is
    one: :func:`add_decayed_weights` keeps the count alone, :func:`jaxl2.make_train_step` the
    count and ``tx``'s state (its count advances with the updates ``tx`` applies: once every k
    micro-batches under ``optax.MultiSteps``)."""

    count: jax.Array  # type: ignore[assignment]  # a field named as optax names it, over tuple.count
    opt_state: Any = None


def add_decayed_weights(
    l2: L2, *, select: _select.Selector = None, center: Any = None, stacked: Stacked = None
) -> optax.GradientTransformation:
    """Adds ``λ_unit·(w − w₀)`` to the updates of the selected leaves, ``0`` to the others.

    ``update(u, state, params)`` returns ``u + λ_unit·(w − w₀)`` on every selected leaf
    (``w₀ = 0`` without ``center``; one λ per layer slice of a ``stacked`` leaf) and ``u``
    unchanged elsewhere; ``λ·(w − w₀)`` is computed in at least float32 and cast to the
    update's dtype, as the gradient of :func:`jaxl2.l2_penalty` is.

    **Where it goes in the chain.**

    * Before the optimizer, e.g.
      ``optax.chain(add_decayed_weights(λ), optax.sgd(lr, momentum=0.9))`` or
      ``optax.chain(add_decayed_weights(λ), optax.adam(lr))``: the optimizer sees
      ``∇J + λ·(w − w₀)``, exactly the gradient of ``J + l2_penalty(params, λ)``: coupled L2,
      the same training as the optimizer on ``jaxl2.regularized(J, λ)``.
    * Between ``optax.scale_by_adam()`` and ``optax.scale_by_learning_rate(lr)``:
      ``w ← w − lr·(m̂/(√v̂ + ε) + λ·(w − w₀))``, decoupled decay: AdamW, i.e.
      ``optax.adamw(lr, weight_decay=λ, mask=...)`` with per-layer rates. Under Adam this is a
      different method from L2 (the decay is not divided by ``√v̂``).
    * Not after ``scale_by_learning_rate``: the updates there are already ``−lr·…``, and adding
      ``+λ·w`` would grow the weights instead of shrinking them.

    **Schedules.** ``l2``, or any value of an ``l2`` mapping, may be an optax schedule (a
    function of the step count, e.g. ``optax.linear_schedule(1e-2, 0.0, 1000)``). The state is
    then :class:`ScheduleState`: the count starts at 0, each update reads the schedules at it
    and increments it, as ``optax.add_decayed_weights`` and ``optax.inject_hyperparams`` do.
    Otherwise the state is empty.

    **Params.** ``update`` needs the params (``tx.update(updates, state, params)``). The rules
    are checked on the params given to ``init`` (a selection or pattern that matches nothing,
    a ``center`` that does not fit them, fail there) and applied by path, by the same rules,
    to the params given to ``update``. Params may be a Linen dict, an NNX
    ``State`` (``nnx.split(model, nnx.Param)``; ``nnx.Optimizer``, which initialises with the
    ``State`` of Variables and updates with plain arrays, works too), an Equinox module
    filtered with ``eqx.filter(model, eqx.is_array)`` (its ``None`` leaves stay ``None``).

    Args:
      l2: one λ for every selected leaf (a float, a 0-d array, a traced scalar, or a
        schedule), or an ordered mapping ``{regex: λ}``: each unit takes the λ of the first
        pattern that ``re.fullmatch``-es it, as in :func:`jaxl2.l2_penalty`. A traced λ is
        checked for shape at trace time, as outside ``jit``; its sign and finiteness cannot be.
      select: which leaves: ``None`` for the kernels, a regex over paths, a predicate
        ``(path, leaf) -> bool`` or a preset from ``jaxl2.select``.
      center: ``None``, or the reference weights ``w₀`` (L2-SP): a pytree like the params,
        e.g. the pretrained params: every floating-point leaf (the shapes checked on the
        selected ones), as in :func:`jaxl2.l2_penalty`.
      stacked: ``None``, or ``{regex over leaf paths: layer axis}`` for leaves that hold
        stacked layers, each slice ``path[i]`` with its own λ, as in :func:`jaxl2.l2_penalty`.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      Jaxl2Error: here for a bad λ, mapping, regex, ``select`` or ``stacked``, or a ``center``
        without arrays; at ``init`` when the selection or a pattern matches nothing or
        ``center`` does not fit the params; at ``update`` when no params are given.

    Examples:
      Per-layer decoupled decay, Adam's step then ``lr·λ_leaf·w``:

      >>> import jax.numpy as jnp, optax
      >>> from jaxl2.decay import add_decayed_weights
      >>> params = {"Dense_0": {"kernel": jnp.ones((1, 1))}, "Dense_1": {"kernel": jnp.ones((1, 1))}}
      >>> tx = optax.chain(
      ...     optax.scale_by_adam(),
      ...     add_decayed_weights({".*Dense_0.*": 0.5, ".*": 0.25}),
      ...     optax.scale_by_learning_rate(0.1),
      ... )
      >>> zero = {"Dense_0": {"kernel": jnp.zeros((1, 1))}, "Dense_1": {"kernel": jnp.zeros((1, 1))}}
      >>> updates, _ = tx.update(zero, tx.init(params), params)
      >>> [round(float(u["kernel"][0, 0]), 6) for u in updates.values()]  # −0.1·0.5·1, −0.1·0.25·1
      [-0.05, -0.025]

      A decay that falls linearly from 0.5 to 0 over two steps:

      >>> tx = add_decayed_weights(optax.linear_schedule(0.5, 0.0, 2))
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     u, state = tx.update(zero, state, params)
      ...     print(float(u["Dense_0"]["kernel"][0, 0]), int(state.count))
      0.5 1
      0.25 2
      0.0 3
    """
    check_rules(l2, select=select, center=center, stacked=stacked, schedule=True)
    scheduled = has_schedule(l2)

    def init_fn(params: Any) -> Any:
        # an empty selection, a stray pattern or a bad stacked axis fails here
        _rules.plan(params, l2, select=select, stacked=stacked, center=center)
        return ScheduleState(jnp.zeros([], jnp.int32)) if scheduled else optax.EmptyState()

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise Jaxl2Error(
                "params must be given to jaxl2.add_decayed_weights' update, which adds λ·(w − w₀): "
                "call tx.update(updates, state, params)"
            )
        count = state.count if scheduled else None
        decay, done = {}, set()  # λ·(w − w₀) of each selected leaf, in at least float32
        for e in _rules.plan(params, l2, select=select, stacked=stacked, center=center):
            acc = jnp.promote_types(e.leaf.dtype, jnp.float32)
            d = e.leaf.astype(acc) if e.center is None else e.leaf.astype(acc) - jnp.asarray(e.center, acc)
            decay[e.path] = jnp.asarray(e.lam(count, acc), acc) * d

        def add(keypath: tuple, u: Any) -> Any:
            path = _select.path_str(keypath)
            if path not in decay:
                return u
            done.add(path)
            return u + decay[path].astype(u.dtype)

        updates = jax.tree_util.tree_map_with_path(add, updates)
        if missing := [p for p in decay if p not in done]:
            raise Jaxl2Error(
                f"updates have no leaf at {missing[0]!r}, a selected path of params: "
                "updates and params must have the same structure"
            )
        return updates, (ScheduleState(optax.safe_increment(count)) if scheduled else state)

    return optax.GradientTransformation(init_fn, update_fn)


class AuditRow(NamedTuple):
    """One floating-point leaf: what one step of the optimizer did to it with a zero gradient.

    Attributes:
      path: the leaf's path, as :func:`jaxl2.select.leaves` spells it.
      shape: its shape.
      dtype: its dtype's name.
      selected: whether jaxl2's selection (``select=``, default: the kernels) picks it.
      decayed: whether the update is non-zero.
      shrink: the relative shrink per step, ``mean(−update / w)`` in float64 (``lr·wd`` for
        ``optax.adamw``); 0 when not decayed, negative when the leaf grows.
      mismatch: ``decayed != selected``: a decayed bias, norm scale or embedding, or a
        selected kernel left alone.
      note: why the row deserves a look (a mismatch, a decay below the dtype's resolution), or "".
    """

    path: str
    shape: tuple
    dtype: str
    selected: bool
    decayed: bool
    shrink: float
    mismatch: bool
    note: str


class Audit(list):
    """A list of :class:`AuditRow` that prints as a table."""

    @property
    def mismatches(self) -> list[AuditRow]:
        """The rows whose decay disagrees with the selection."""
        return [r for r in self if r.mismatch]

    def __str__(self) -> str:
        head = ("path", "shape", "dtype", "selected", "decayed", "shrink/step", "mismatch", "note")
        body = [
            (
                r.path,
                format_shape(r.shape),
                r.dtype,
                "yes" if r.selected else "no",
                "yes" if r.decayed else "no",
                f"{r.shrink:.3g}",
                "MISMATCH" if r.mismatch else "-",
                r.note,
            )
            for r in self
        ]
        return format_table(head, body)


def _row(path: str, w: Any, u: Any, selected: bool) -> AuditRow:
    w64 = np.asarray(w).astype(np.float64)
    u64 = np.zeros_like(w64) if u is None else np.asarray(u).astype(np.float64)
    decayed = bool(np.any(u64 != 0))
    shrink = float(np.mean(-u64 / w64)) if decayed and w64.size else 0.0
    notes = []
    if decayed and not selected:
        notes.append("decayed but not selected")
    if selected and not decayed:
        notes.append("selected but not decayed")
    eps = float(jnp.finfo(w.dtype).eps)
    if decayed and abs(shrink) < eps / 2:
        new = np.asarray(optax.apply_updates(w, u))
        stuck = float(np.mean(new == np.asarray(w)))
        notes.append(
            f"{abs(shrink):.3g}/step < eps({w.dtype})/2 = {eps / 2:.3g}: w·(1−shrink) == w on {stuck:.0%} of entries"
        )
    return AuditRow(
        path, tuple(w.shape), str(w.dtype), selected, decayed, shrink, decayed != selected, "; ".join(notes)
    )


def _at_step(state: Any, step: int) -> Any:
    """``state`` with every real-step counter (fields ``count``, and ``gradient_step`` of
    ``optax.MultiSteps``) set to ``step``."""

    def set_count(keypath: tuple, x: Any) -> Any:
        counter = keypath and getattr(keypath[-1], "name", None) in ("count", "gradient_step")
        return jnp.full_like(x, step) if counter and jnp.issubdtype(x.dtype, jnp.integer) else x

    return jax.tree_util.tree_map_with_path(set_count, state)


def audit(
    tx: optax.GradientTransformation,
    params: Any,
    *,
    select: _select.Selector = None,
    stacked: Stacked = None,
    step: int = 0,
) -> Audit:
    """What one step of ``tx`` does to each floating-point leaf of ``params`` when the gradient is 0.

    Runs ``state = tx.init(p)`` and ``updates, _ = tx.update(zeros_like(p), state, p)`` once,
    where ``p`` is ``params`` with its zero entries set to one (a decay of a zero bias is
    zero, and would hide that the bias is decayed); nothing else is changed. For each leaf:

    * ``decayed``: the update is non-zero;
    * ``shrink = mean(−update / w)`` in float64, the relative shrink per step:
      ``optax.adamw(lr, weight_decay=wd)`` gives ``update = −lr·wd·w``, so ``shrink = lr·wd``;
      ``optax.chain(optax.add_decayed_weights(λ), optax.sgd(lr))`` gives ``lr·λ``;
    * ``mismatch``: ``decayed != selected``, where ``selected`` is jaxl2's selection
      (``select=``, default: the kernels): a decayed bias, LayerNorm scale or embedding, or a
      selected kernel that is not decayed;
    * ``note``: the mismatch in words, and a warning where ``|shrink| < eps(dtype)/2``:
      ``w·(1 − shrink)`` then rounds back to ``w`` in the leaf's dtype and the decay does
      nothing (``lr·wd = 1e-7`` on bfloat16 weights, ``eps = 2⁻⁷``).

    The audit is about the decay in ``tx``. With the L2 penalty in the loss instead
    (``jaxl2.regularized``) and a ``tx`` without decay, every selected leaf shows as "selected
    but not decayed": that is the expected picture then, and decay in both places is the
    accident to look for.

    One step is enough: with a zero gradient Adam's moments stay zero, so its bias correction
    has nothing to correct and decoupled decay is ``−lr·wd·w`` at every step. Schedules (of
    the learning rate or of the decay) are read at ``step``: every step counter in the state
    (each field named ``count``: optax's schedules, ``inject_hyperparams``,
    :func:`add_decayed_weights`; ``gradient_step`` of ``optax.MultiSteps``) is set to it before
    the step. Under gradient accumulation (``optax.MultiSteps``, which returns zero updates until
    its ``k``-th micro-step) the audit runs the micro-steps up to the real update and reports
    that one, at real step ``step``. Momentum makes a coupled decay
    grow from ``lr·λ`` at the first step to ``lr·λ/(1 − β)``; the audit shows the first.

    With ``stacked`` (as in :func:`jaxl2.l2_penalty`), a selected stacked leaf gives one row
    per layer slice ``path[i]``, its shrink measured on that slice.

    Args:
      tx: the optax optimizer, exactly as it will be used (masks included).
      params: the params as ``tx`` sees them: a Linen or Haiku dict, an NNX ``State``
        (``nnx.state(model, nnx.Param)``), ``eqx.filter(model, eqx.is_array)``.
      select: what should be decayed, as in ``jaxl2.l2_penalty``: ``None`` (the kernels), a
        regex, a predicate, or a preset (``jaxl2.select.haiku``, ``jaxl2.select.equinox``).
      stacked: ``None``, or ``{regex over leaf paths: layer axis}``: rows per layer slice.
      step: the step count at which schedules are read (default 0).

    Returns:
      An :class:`Audit`: a list of :class:`AuditRow` in tree order that prints as a table;
      ``.mismatches`` lists the rows that disagree.

    Raises:
      Jaxl2Error: when ``select`` matches nothing in ``params`` (the paths that exist are listed).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from jaxl2.decay import audit
      >>> params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
      >>> print(audit(optax.adamw(1e-3, weight_decay=1e-2), params))
      path            shape  dtype    selected  decayed  shrink/step  mismatch  note
      --------------  -----  -------  --------  -------  -----------  --------  ------------------------
      Dense_0/bias    3      float32  no        yes      1e-05        MISMATCH  decayed but not selected
      Dense_0/kernel  2×3    float32  yes       yes      1e-05        -
    """
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        swapped = (
            ": are the arguments swapped?" if hasattr(params, "init") and hasattr(params, "update") else ""
        )
        raise Jaxl2Error(
            f"audit(tx, params) takes an optax optimizer first, got {describe(tx)} as tx{swapped}"
        )
    check_number(step, "step (the step count)", integer=True)
    entries = {e.path: e for e in _rules.plan(params, None, select=select, stacked=stacked)}
    # zero entries set to one (a decay of 0 is 0, which would hide it), and a zero gradient
    probe = jax.tree.map(lambda w: jnp.where(w == 0, 1, w) if _select.is_float_array(w) else w, params)
    zeros = jax.tree.map(
        lambda w: jnp.zeros_like(w) if hasattr(w, "dtype") and hasattr(w, "shape") else w, params
    )
    updates, state = tx.update(zeros, _at_step(tx.init(probe), int(step)), probe)
    # the micro-steps of gradient accumulation (optax.MultiSteps), on to the real update
    while any(
        np.any(np.asarray(x) != 0) for _, x in optax.tree_utils.tree_get_all_with_path(state, "mini_step")
    ):
        updates, state = tx.update(zeros, state, probe)
    by_path = dict(_select.leaves(updates))
    rows = []
    for p, w in _select.leaves(probe):
        u, e = by_path.get(p), entries.get(p)
        if e is None:
            rows.append(_row(p, w, u, False))
        else:
            us = [None] * len(e.units) if u is None else e.slices(u)
            rows += [_row(n, wi, ui, True) for n, wi, ui in zip(e.units, e.slices(w), us)]
    return Audit(rows)
