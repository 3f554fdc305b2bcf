"""The L2 penalty ``λ/2·Σw²`` over selected leaves, and a loss wrapper that adds it.

``jax.grad`` of the penalty is exactly ``λ·w`` on every selected leaf (in the leaf's own
dtype) and exactly zero elsewhere: nobody writes the weight-decay term by hand.

With ``center=w₀`` (a pytree like the params, e.g. pretrained weights) the penalty is
``λ/2·Σ(w − w₀)²`` instead, L2-SP (Li, Grandvalet and Davoine, ICML 2018): it pulls the
weights toward ``w₀`` rather than toward zero, and its gradient is ``λ·(w − w₀)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2 import rules as _rules
from jaxl2 import select as _select
from jaxl2.errors import Jaxl2Error, describe, shown
from jaxl2.rules import L2, Stacked, check_bool, is_traced
from jaxl2.table import format_shape, format_table

__all__ = [
    "l2_penalty",
    "selected",
    "regularized",
    "coefficients",
    "Row",
    "Selection",
    "check_rules",
    "check_order",
]


def describe_output(out: Any) -> str:
    """What a loss function returned, for a message: ``a tuple of length 3``, ``a float``."""
    kind = type(out).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    if isinstance(out, (tuple, list)):
        return f"{article} {kind} of length {len(out)}"
    if hasattr(out, "dtype") and hasattr(out, "shape"):
        return f"{article} {kind} of dtype {out.dtype} and shape {tuple(out.shape)}"
    return f"{article} {kind}"


def check_rules(
    l2: L2,
    *,
    select: _select.Selector = None,
    center: Any = None,
    stacked: Stacked = None,
    schedule: bool = False,
) -> None:
    """Checks what can be checked before the params are known.

    That is: ``l2`` (a λ, or a non-empty ``{regex: λ}`` mapping with string keys, valid
    regexes and valid λs; schedules only with ``schedule=True``), ``select`` (``None``, a
    valid regex or a callable), ``center`` (``None``, or a pytree with at least one
    floating-point array) and ``stacked`` (``None`` or ``{regex: axis}``). Which paths the
    rules match, and whether ``center`` fits, is checked later, against the params.

    Raises:
      Jaxl2Error: naming the argument, the value and what is allowed.

    Examples:
      >>> check_rules({"Dense_[0": 1e-3})
      Traceback (most recent call last):
      ...
      jaxl2.errors.Jaxl2Error: l2 pattern 'Dense_[0' is not a valid regular expression (unterminated character set at position 6); patterns are Python regexes matched with re.fullmatch against paths like 'params/Dense_0/kernel'
    """
    _rules.check_l2_rules(l2, schedule=schedule)
    _select.predicate(select)
    _rules.check_stacked(stacked)
    if center is not None and not _select.leaves(center):
        raise Jaxl2Error(
            f"center must be None or a pytree of arrays with the structure of params (e.g. the "
            f"pretrained params), got {shown(center)}, which has no floating-point array"
        )


def check_order(params: Any, l2: Any, fn: str) -> None:
    """Refuses ``fn(l2, params)``: params without a floating-point array (a number, a ``{regex:
    λ}`` mapping) while ``l2`` holds arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> check_order(1e-3, {"d": {"kernel": jnp.ones((2, 2))}}, "l2_penalty")
      Traceback (most recent call last):
      ...
      jaxl2.errors.Jaxl2Error: l2_penalty(params, l2) takes the params first, but got the number 0.001 as params and a pytree of arrays as l2: are the arguments swapped?
    """
    if isinstance(params, bool) or not _select.leaves(l2):  # l2 is almost always a number: cheap
        return
    number = isinstance(params, (int, float, np.number)) or (hasattr(params, "ndim") and params.ndim == 0)
    if not number and _select.leaves(params):
        return
    got = f"the number {_rules.number_text(params)}" if number else describe(params)
    raise Jaxl2Error(
        f"{fn}(params, l2) takes the params first, but got {got} as params "
        "and a pytree of arrays as l2: are the arguments swapped?"
    )


def _check_call(params: Any, l2: Any, fn: str, step: Any) -> None:
    """The checks of ``fn(params, l2, step=step)`` that need no params: the order, λ, schedules."""
    check_order(params, l2, fn)
    _rules.check_l2_rules(l2, schedule=True)
    if step is None and _rules.has_schedule(l2):
        raise Jaxl2Error(
            f"l2 holds a schedule (a function of the step count): give {fn} the step=, "
            "or use jaxl2.make_train_step or jaxl2.add_decayed_weights, which count the steps"
        )


def l2_penalty(
    params: Any,
    l2: L2,
    *,
    select: _select.Selector = None,
    center: Any = None,
    stacked: Stacked = None,
    step: Any = None,
) -> jax.Array:
    """The L2 penalty ``Σ_units λ_unit/2 · Σ w²`` over the selected leaves of ``params``.

    A unit is a selected leaf, or one layer slice of a leaf stacked along an axis (``stacked``):
    the penalty of a stack of L layers with λ_i each is ``Σ_i λ_i/2 · Σ w_i²``, exactly that of
    the same L layers unrolled. Its gradient is ``λ·w`` on selected leaves (``λ_i·w_i`` on each
    slice) and ``0`` on all others, so ``loss + l2_penalty(params, λ)`` is the classic recipe
    ``J(W, b) + λ/2·‖W‖²``.

    With ``center=w₀`` it is ``Σ_units λ_unit/2 · Σ (w − w₀)²`` (L2-SP), whose gradient
    is ``λ·(w − w₀)`` on selected leaves and ``0`` on all others.

    Args:
      params: any pytree of arrays: a Linen params dict, an NNX ``State`` or pure dict, a
        Haiku dict, an Equinox module.
      l2: one λ for every unit (a float or 0-d array, a traced scalar under ``jit``/``vmap``
        (its shape is checked at trace time, with the message given outside ``jit``; its sign
        and finiteness cannot be, its value being unknown), or with ``step`` an optax
        schedule ``count -> λ``), or an ordered mapping
        ``{regex: λ}``; each unit takes the λ of the first pattern that ``re.fullmatch``-es its
        name or equals it (so ``{path: λ}`` needs no escaping; a slice ``path[i]`` also matches
        by its leaf's ``path``). Every pattern must be
        the first match of some unit (a pattern that matches nothing, or only units an earlier
        pattern takes, is an error, except a catch-all that matches every leaf), and
        every unit must match a pattern (add ``'.*': 0.0`` to opt out on purpose).
      select: which leaves: ``None`` for the kernels (last key ``kernel``), a regex over
        paths, a predicate ``(path, leaf) -> bool``, or a preset from ``jaxl2.select``.
      center: ``None`` (penalise ``w``), or ``w₀``, a pytree like ``params`` (e.g. the
        pretrained params: a floating-point array at every path where ``params`` has one,
        selected or not, and nowhere else; the same shape on the selected leaves) to
        penalise ``w − w₀``. ``w − w₀`` is computed in the accumulation dtype (``w₀`` is cast
        to it); ``w₀``'s unselected leaves are unused, so their shapes are not checked.
      stacked: ``None``, or an ordered mapping ``{regex over leaf paths: axis}``: a selected
        leaf whose path a pattern fullmatches first holds one layer per index of that axis
        (``nn.scan``/``jax.lax.scan``-stacked kernels, usually axis 0), named ``path[i]``.
      step: the step count (an int, or traced) at which schedules in ``l2`` are read.

    Returns:
      A scalar in ``float32`` at least (``float64`` for float64 params).

    Raises:
      Jaxl2Error: when the selection matches nothing, a λ is not a finite number ``>= 0``,
        a schedule is given without ``step``, a pattern is invalid, matches no unit or only
        units that an earlier pattern takes, ``stacked`` names no selected leaf or an axis
        the leaf lacks, ``center`` differs from ``params`` in structure or in a selected
        leaf's shape (the first such path is named), or the arguments look swapped.

    Examples:
      >>> import jax.numpy as jnp, jaxl2
      >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, 2.0]]), "bias": jnp.array([5.0])}}
      >>> float(jaxl2.l2_penalty(params, 0.1))  # 0.1/2 · (1 + 4); the bias is not selected
      0.25
      >>> w0 = {"Dense_0": {"kernel": jnp.array([[1.0, 0.0]]), "bias": jnp.array([0.0])}}
      >>> float(jaxl2.l2_penalty(params, 0.5, center=w0))  # 0.5/2 · ((1 − 1)² + (2 − 0)²)
      1.0

      Two layers stacked on axis 0, each with its own λ:

      >>> stack = {"blocks": {"kernel": jnp.stack([jnp.ones((2, 2)), 2 * jnp.ones((2, 2))])}}
      >>> rules = {r"blocks/kernel\\[0\\]": 0.5, "blocks/kernel": 0.25}
      >>> float(jaxl2.l2_penalty(stack, rules, stacked={"blocks/.*": 0}))  # 0.5/2·4 + 0.25/2·16
      3.0
    """
    _check_call(params, l2, "l2_penalty", step)
    entries = _rules.plan(params, l2, select=select, stacked=stacked, center=center)
    if not isinstance(l2, Mapping):  # one λ: λ/2 · Σ_leaves Σw², the sum a hand-written penalty takes
        total = _total([_sq_sum(e) for e in entries])
        return jnp.asarray(entries[0].lam(step, total.dtype), total.dtype) / 2 * total
    terms = []
    for e in entries:  # Σ_units λ_u/2 · Σ_u (w − w₀)², in at least float32
        acc = jnp.promote_types(e.leaf.dtype, jnp.float32)
        lam = e.lam(step, acc)
        if jnp.ndim(lam) == 0:
            terms.append(jnp.asarray(lam, acc) / 2 * _sq_sum(e))
        else:
            terms.append(jnp.sum(jnp.ravel(lam) * e.sq(w0=e.center)) / 2)
    return _total(terms)


def _sq_sum(e: _rules.Entry) -> jax.Array:
    """``Σ(w − w₀)²`` over the whole leaf of ``e``, in at least float32."""
    return e._replace(axis=None).sq(w0=e.center)


def _total(xs: list[jax.Array]) -> jax.Array:
    """``Σ xs`` in their common result dtype."""
    dtype = jnp.result_type(*xs)
    return sum((x.astype(dtype) for x in xs[1:]), xs[0].astype(dtype))


class Row(NamedTuple):
    """One unit (a selected leaf, or a layer slice ``path[i]`` of a stacked leaf): its name,
    shape (a slice's, without the layer axis), dtype and λ (``None`` when no λ was given).

    With a ``center``, also ``‖w₀‖`` and ``‖w − w₀‖`` of the unit (else ``None``).
    """

    path: str
    shape: tuple
    dtype: str
    l2: Any
    center_norm: Any = None
    center_dist: Any = None


class Selection(list):
    """A list of :class:`Row` that prints as a table (with ``‖w₀‖`` and ``‖w−w₀‖`` columns
    when a center was given)."""

    def __str__(self) -> str:
        centered = any(r.center_norm is not None for r in self)
        head = ("path", "shape", "dtype", "λ") + (("‖w₀‖", "‖w−w₀‖") if centered else ())
        body = [
            (r.path, format_shape(r.shape), r.dtype, _fmt(r.l2))
            + ((_fmt(r.center_norm, ".4g"), _fmt(r.center_dist, ".4g")) if centered else ())
            for r in self
        ]
        return format_table(head, body)


def _fmt(lam: Any, spec: str = "g") -> str:
    if lam is None:
        return "-"
    return "traced" if is_traced(lam) else format(float(lam), spec)


def _norm(x: Any, ref: Any = 0.0) -> Any:
    """``‖x − ref‖`` in float64 (a traced value stays traced, in at least float32)."""
    if is_traced(x) or is_traced(ref):
        acc = jnp.promote_types(x.dtype, jnp.float32)
        return jnp.linalg.norm(jnp.asarray(x, acc) - jnp.asarray(ref, acc))
    return float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(ref, np.float64)))


def selected(
    params: Any,
    l2: L2 | None = None,
    *,
    select: _select.Selector = None,
    center: Any = None,
    stacked: Stacked = None,
    step: Any = 0,
) -> Selection:
    """What :func:`l2_penalty` would penalise: rows ``(path, shape, dtype, λ)``, one per unit.

    Printing the result gives a table, so rules can be checked before training. A stacked
    leaf (``stacked``) gives one row per layer slice, ``path[i]``, with the slice's shape; a
    schedule shows its λ at ``step`` (default 0). With ``center=w₀`` (checked as in
    :func:`l2_penalty`) each row also has ``‖w₀‖`` (is the reference the one meant, not
    zeros?) and ``‖w − w₀‖`` (how far the weights are from it: ``0`` when ``params`` are the
    pretrained weights themselves).

    Examples:
      >>> import jax.numpy as jnp, jaxl2
      >>> params = {"Dense_0": {"kernel": jnp.ones((784, 256)), "bias": jnp.zeros(256)}}
      >>> print(jaxl2.selected(params, 1e-3))
      path            shape    dtype    λ
      --------------  -------  -------  -----
      Dense_0/kernel  784×256  float32  0.001
      >>> w0 = {"Dense_0": {"kernel": jnp.full((784, 256), 0.5), "bias": jnp.zeros(256)}}
      >>> print(jaxl2.selected(params, 1e-3, center=w0))  # ‖w₀‖ = 0.5·√(784·256)
      path            shape    dtype    λ      ‖w₀‖  ‖w−w₀‖
      --------------  -------  -------  -----  ----  ------
      Dense_0/kernel  784×256  float32  0.001  224   224
      >>> stack = {"blocks": {"kernel": jnp.ones((2, 8, 8))}}
      >>> print(jaxl2.selected(stack, {r".*\\[0\\]": 1e-2, ".*": 1e-3}, stacked={"blocks/.*": 0}))
      path              shape  dtype    λ
      ----------------  -----  -------  -----
      blocks/kernel[0]  8×8    float32  0.01
      blocks/kernel[1]  8×8    float32  0.001
    """
    check_order(params, l2, "selected")
    rows = []
    for e in _rules.plan(params, l2, select=select, stacked=stacked, center=center):
        lams = [lam(step) if callable(lam) else lam for lam in e.l2]
        refs = [None] * len(e.units) if e.center is None else e.slices(e.center)
        for name, lam, w, ref in zip(e.units, lams, e.slices(e.leaf), refs):
            norms = () if ref is None else (_norm(ref), _norm(w, ref))  # ‖w₀‖, ‖w − w₀‖
            rows.append(Row(name, tuple(w.shape), str(e.leaf.dtype), lam, *norms))
    return Selection(rows)


def coefficients(
    params: Any, l2: L2, *, select: _select.Selector = None, stacked: Stacked = None, step: Any = None
) -> Any:
    """The λ of every leaf of ``params``, as a pytree of the same structure.

    A selected leaf gets its λ (the same rules as :func:`l2_penalty`: one λ, or the first
    ``{regex: λ}`` pattern that matches its path), every other array leaf (a bias, a norm
    scale, an integer array) gets ``0.0``, and every leaf that is not an array (an Equinox
    module's activation functions) is returned unchanged, so that
    ``jax.tree.structure(coefficients(params, l2)) == jax.tree.structure(params)`` for any
    pytree: a Linen dict, an NNX ``State`` (its Variables then hold the λs), an
    Equinox module whole or filtered with ``eqx.filter(model, eqx.is_array)`` (its
    ``None`` leaves stay ``None``). The λs are returned as given (a float, a 0-d array, a
    traced value; a schedule read at ``step``); the zeros are the Python float ``0.0``. A
    stacked leaf whose slices have different λs gets an array that broadcasts against it:
    the λs along the layer axis, size 1 on every other axis.

    It agrees with the penalty: ``l2_penalty(params, l2) = Σ_leaves Σ c_leaf/2 · w²`` summed
    over the array leaves, with ``c = coefficients(params, l2)``, and the penalty's
    gradient is ``c·w`` leaf by leaf.

    Args:
      params: any pytree of arrays, as in :func:`l2_penalty`.
      l2: a λ, or an ordered ``{regex: λ}`` mapping, as in :func:`l2_penalty`.
      select: which leaves, as in :func:`l2_penalty`.
      stacked: which leaves are stacked layers, as in :func:`l2_penalty`.
      step: the step count at which schedules are read, as in :func:`l2_penalty`.

    Returns:
      A pytree with the structure of ``params``.

    Raises:
      Jaxl2Error: as :func:`l2_penalty`: an empty selection, a bad λ, a bad pattern, a
        pattern that matches no selected leaf (or only leaves an earlier pattern takes) or a
        selected leaf that matches no pattern.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxl2.penalty import coefficients
      >>> params = {
      ...     "Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
      ...     "Dense_1": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
      ... }
      >>> coefficients(params, {".*Dense_0.*": 1e-2, ".*": 1e-3})
      {'Dense_0': {'bias': 0.0, 'kernel': 0.01}, 'Dense_1': {'bias': 0.0, 'kernel': 0.001}}
    """
    _check_call(params, l2, "coefficients", step)
    entries = _rules.plan(params, l2, select=select, stacked=stacked)
    # one λ as given, or a stacked leaf's per-slice λs that broadcast against it, in its precision
    lams = {e.path: e.lam(step, jnp.promote_types(e.leaf.dtype, jnp.float32)) for e in entries}

    def coefficient(keypath: tuple, leaf: Any) -> Any:
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            return leaf
        return lams.get(_select.path_str(keypath), 0.0)

    return jax.tree_util.tree_map_with_path(coefficient, params)


def add_penalty(out: Any, penalty: Any, *, has_aux: bool) -> Any:
    """``loss_fn``'s output with ``penalty`` added: ``loss + penalty``, or with ``has_aux``
    ``(loss + penalty, aux')`` where ``aux'`` is ``aux`` (a mapping; anything else is kept under
    ``"aux"``) plus ``"data_loss"`` (the loss) and ``"penalty"``.

    A tuple returned without ``has_aux`` (and anything but a pair with it) is an error that
    says which flag the output asks for.

    Examples:
      >>> add_penalty((2.0, {"accuracy": 0.5}), 0.25, has_aux=True)
      (2.25, {'accuracy': 0.5, 'data_loss': 2.0, 'penalty': 0.25})
      >>> add_penalty((2.0, {"accuracy": 0.5}), 0.25, has_aux=False)
      Traceback (most recent call last):
      ...
      jaxl2.errors.Jaxl2Error: loss_fn returned a tuple of length 2, not a scalar loss; a loss_fn that returns (loss, aux) needs has_aux=True
    """
    if not has_aux:
        if isinstance(out, (tuple, list)):
            raise Jaxl2Error(
                f"loss_fn returned {describe_output(out)}, not a scalar loss; a loss_fn that returns "
                "(loss, aux) needs has_aux=True"
            )
        return out + penalty
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        alone = not isinstance(out, (tuple, list))
        hint = " (a loss_fn that returns the loss alone needs has_aux=False)" if alone else ""
        raise Jaxl2Error(
            f"with has_aux=True, loss_fn must return (loss, aux); it returned {describe_output(out)}{hint}"
        )
    data_loss, aux = out
    if isinstance(aux, Mapping) and (taken := [k for k in ("data_loss", "penalty") if k in aux]):
        raise Jaxl2Error(
            f"loss_fn's aux already has a {taken[0]!r} entry, which jaxl2 adds "
            "(aux['data_loss'] is loss_fn's loss, aux['penalty'] the L2 penalty); "
            "rename that key in loss_fn's aux"
        )
    aux = dict(aux) if isinstance(aux, Mapping) else {"aux": aux}
    aux.update(data_loss=data_loss, penalty=penalty)
    return data_loss + penalty, aux


def regularized(
    loss_fn: Callable[..., Any],
    l2: L2,
    *,
    select: _select.Selector = None,
    center: Any = None,
    stacked: Stacked = None,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """Wraps ``loss_fn(params, *args)`` into ``loss_fn(params, *args) + λ/2·Σw²``.

    ``jax.grad`` of the result is the data gradient plus ``λ·w`` on the selected leaves.
    With ``center=w₀`` the penalty is ``λ/2·Σ(w − w₀)²`` (L2-SP) and the added gradient
    ``λ·(w − w₀)``. With ``has_aux=True``, ``loss_fn`` returns ``(loss, aux)`` and the
    wrapper returns ``(loss + penalty, aux')`` where ``aux'`` is ``aux`` (a mapping;
    anything else is put under ``"aux"``) with ``"data_loss"`` and ``"penalty"`` added (an
    ``aux`` mapping that already has either key is an error: it would be overwritten).

    Args:
      loss_fn: the data loss ``(params, *args, **kwargs) -> loss`` (or ``(loss, aux)``).
      l2: a λ, or an ordered ``{regex: λ}`` mapping, as in :func:`l2_penalty` (a traced λ is
        checked for shape, not for sign or finiteness).
      select: which leaves, as in :func:`l2_penalty`.
      center: ``None``, or the reference weights ``w₀`` (a pytree like the params), as in
        :func:`l2_penalty`. The wrapper holds on to it: a jitted loss sees it as a constant.
      stacked: which leaves are stacked layers (``{regex: axis}``), as in :func:`l2_penalty`.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``: ``True`` or ``False``.

    Returns:
      The regularized loss, with the signature of ``loss_fn``.

    Raises:
      Jaxl2Error: at once for a ``loss_fn`` that is not callable, a ``has_aux`` that is not a
        bool, a bad λ, an empty mapping, a non-string key, an invalid regex, a bad ``select``
        or a ``center`` without arrays; at the call, when the selection or a pattern matches
        nothing in the params it is given (or a pattern only paths an earlier one takes), or
        ``center`` does not fit them (only then are the paths known), and with
        ``has_aux=True`` when ``loss_fn`` does not return a pair or its ``aux`` mapping
        already has a ``"data_loss"`` or ``"penalty"`` key.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxl2
      >>> def mse(params, x, y):
      ...     return jnp.mean((x @ params["Dense_0"]["kernel"] - y) ** 2)
      >>> params = {"Dense_0": {"kernel": jnp.ones((2, 1))}}
      >>> loss = jaxl2.regularized(mse, 0.5)
      >>> x, y = jnp.zeros((4, 2)), jnp.zeros((4, 1))
      >>> jax.grad(loss)(params, x, y)["Dense_0"]["kernel"].ravel().tolist()  # λ·w
      [0.5, 0.5]
      >>> w0 = {"Dense_0": {"kernel": jnp.array([[0.5], [3.0]])}}
      >>> loss_sp = jaxl2.regularized(mse, 0.5, center=w0)
      >>> jax.grad(loss_sp)(params, x, y)["Dense_0"]["kernel"].ravel().tolist()  # λ·(w − w₀)
      [0.25, -1.0]
    """
    # Everything that can be checked without params fails here, not at the first call.
    if not callable(loss_fn):
        raise Jaxl2Error(
            f"loss_fn must be callable, a function loss_fn(params, *args) -> loss, got {shown(loss_fn)}"
            + (": are the arguments swapped?" if callable(l2) else "")
        )
    has_aux = check_bool(has_aux, "has_aux")
    if _rules.has_schedule(l2):
        raise Jaxl2Error(
            "l2 holds a schedule (a function of the step count), and a loss function has no step count: "
            "use jaxl2.make_train_step (it counts the steps), or add "
            "jaxl2.l2_penalty(params, l2, step=count) to the loss yourself"
        )
    check_rules(l2, select=select, center=center, stacked=stacked)

    def loss(params, *args, **kwargs):
        out = loss_fn(params, *args, **kwargs)
        pen = l2_penalty(params, l2, select=select, center=center, stacked=stacked)
        return add_penalty(out, pen, has_aux=has_aux)

    what = "λ/2·Σw²" if center is None else "λ/2·Σ(w − w₀)²"
    loss.__name__ = f"regularized_{getattr(loss_fn, '__name__', 'loss')}"
    loss.__doc__ = f"{getattr(loss_fn, '__name__', 'loss')} + {what} (jaxl2.regularized)."
    return loss
