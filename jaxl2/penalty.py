"""The L2 penalty ``λ/2·Σw²`` over selected leaves, and a loss wrapper that adds it.

``jax.grad`` of the penalty is exactly ``λ·w`` on every selected leaf (in the leaf's own
dtype) and exactly zero elsewhere: nobody writes the weight-decay term by hand.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2 import select as _select
from jaxl2.errors import Jaxl2Error

L2 = float | jax.Array | Mapping[str, Any]

__all__ = ["l2_penalty", "selected", "regularized", "Row", "Selection", "check_l2"]


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_l2(value: Any, name: str = "l2") -> Any:
    """Checks one coefficient ``λ``: a real number, finite and ``>= 0``.

    Accepted: a python ``int``/``float``, a NumPy integer or float scalar, a 0-d NumPy or
    JAX array of an integer or float dtype (all checked for ``0 <= λ < ∞``), and a traced
    value under ``jit``/``vmap`` (returned unchecked: its value is not known yet). Refused:
    strings, bytes, bools, ``None``, complex numbers and arrays that are not 0-d.

    Args:
      value: the coefficient.
      name: the argument's name, for the error message.

    Returns:
      ``value`` itself.

    Raises:
      Jaxl2Error: when ``value`` is not one of the above, or is negative, NaN or infinite.

    Examples:
      >>> check_l2(1e-3)
      0.001
      >>> check_l2("1e-3")
      Traceback (most recent call last):
      ...
      jaxl2.errors.Jaxl2Error: l2 must be a finite number >= 0 (a float or a 0-d array), got '1e-3' (str)
    """
    if _is_traced(value):
        return value
    real = isinstance(value, (int, float, np.integer, np.floating, np.ndarray, jax.Array))
    if real and hasattr(value, "dtype"):
        dtype = value.dtype
        real = value.ndim == 0 and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))
    if not real or isinstance(value, bool) or not (0 <= float(value) < math.inf):
        raise Jaxl2Error(
            f"{name} must be a finite number >= 0 (a float or a 0-d array), "
            f"got {value!r} ({type(value).__name__})"
        )
    return value


def _rules(l2: Mapping[str, Any]) -> list[tuple[str, re.Pattern, Any]]:
    """The ``(pattern, compiled regex, λ)`` of an ``{regex: λ}`` mapping, each checked."""
    if not l2:
        raise Jaxl2Error("l2 mapping is empty; give {regex: λ} entries, e.g. {'.*': 1e-3}")
    rules = []
    for pattern, lam in l2.items():
        if not isinstance(pattern, str):
            raise Jaxl2Error(
                f"l2 mapping keys must be regex strings, got {pattern!r} ({type(pattern).__name__})"
            )
        check_l2(lam, f"l2[{pattern!r}]")
        rules.append((pattern, _select.compile_regex(pattern, "l2"), lam))
    return rules


def _coefficients(chosen: list[tuple[str, Any]], l2: L2) -> list[Any]:
    """One λ per chosen leaf: a scalar for all, or the first matching ``{regex: λ}`` entry."""
    if not isinstance(l2, Mapping):
        check_l2(l2)
        return [l2] * len(chosen)
    rules = _rules(l2)
    paths = [p for p, _ in chosen]
    for pattern, rx, _ in rules:
        if not any(rx.fullmatch(p) for p in paths):
            raise Jaxl2Error(
                f"l2 pattern {pattern!r} matches no selected parameter (a typo?); "
                f"the selected paths are: {', '.join(paths)}"
            )
    lams = []
    for p in paths:
        lam = next((lam for _, rx, lam in rules if rx.fullmatch(p)), None)
        if lam is None:
            raise Jaxl2Error(
                f"selected parameter {p!r} matches no l2 pattern; add an entry for it, or a "
                "catch-all such as {'.*': 0.0} to leave the remaining leaves unpenalised on purpose"
            )
        lams.append(lam)
    return lams


def _sq_sum(w: jax.Array) -> jax.Array:
    """``Σw²`` accumulated in at least float32 (bf16/f16 params are upcast first)."""
    acc = jnp.promote_types(w.dtype, jnp.float32)
    w = w.astype(acc)
    return jnp.sum(w * w)


def l2_penalty(params: Any, l2: L2, *, select: _select.Selector = None) -> jax.Array:
    """The L2 penalty ``Σ_leaves λ_leaf/2 · Σ w²`` over the selected leaves of ``params``.

    Its gradient is ``λ·w`` on selected leaves and ``0`` on all others, so
    ``loss + l2_penalty(params, λ)`` is the classic recipe ``J(W, b) + λ/2·‖W‖²``.

    Args:
      params: any pytree of arrays: a Linen params dict, an NNX ``State`` or pure dict, a
        Haiku dict, an Equinox module.
      l2: one λ for every selected leaf (a float or 0-d array, or a traced scalar under
        ``jit``/``vmap``), or an ordered mapping ``{regex: λ}``; each selected path takes
        the λ of the first pattern that ``re.fullmatch``-es it. Every pattern must match a
        selected path, and every selected path must match a pattern (add ``'.*': 0.0`` to
        opt out on purpose).
      select: which leaves: ``None`` for the kernels (last key ``kernel``), a regex over
        paths, a predicate ``(path, leaf) -> bool``, or a preset from ``jaxl2.select``.

    Returns:
      A scalar in ``float32`` at least (``float64`` for float64 params).

    Raises:
      Jaxl2Error: when the selection matches nothing, a λ is not a finite number ``>= 0``,
        or a pattern is invalid or matches no selected leaf.

    Examples:
      >>> import jax.numpy as jnp, jaxl2
      >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, 2.0]]), "bias": jnp.array([5.0])}}
      >>> float(jaxl2.l2_penalty(params, 0.1))  # 0.1/2 · (1 + 4); the bias is not selected
      0.25
    """
    chosen = _select.resolve(params, select)
    lams = _coefficients(chosen, l2)
    sums = [_sq_sum(w) for _, w in chosen]
    terms = [jnp.asarray(lam, s.dtype) / 2 * s for lam, s in zip(lams, sums)]
    dtype = jnp.result_type(*terms)
    return sum((t.astype(dtype) for t in terms[1:]), terms[0].astype(dtype))


class Row(NamedTuple):
    """One selected leaf: its path, shape, dtype and λ (``None`` when no λ was given)."""

    path: str
    shape: tuple
    dtype: str
    l2: Any


class Selection(list):
    """A list of :class:`Row` that prints as a table."""

    def __str__(self) -> str:
        head = ("path", "shape", "dtype", "λ")
        body = [(r.path, "×".join(map(str, r.shape)) or "()", r.dtype, _fmt(r.l2)) for r in self]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
        return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])


def _fmt(lam: Any) -> str:
    if lam is None:
        return "-"
    return "traced" if _is_traced(lam) else f"{float(lam):g}"


def selected(params: Any, l2: L2 | None = None, *, select: _select.Selector = None) -> Selection:
    """What :func:`l2_penalty` would penalise: rows ``(path, shape, dtype, λ)``.

    Printing the result gives a table, so rules can be checked before training.

    Examples:
      >>> import jax.numpy as jnp, jaxl2
      >>> params = {"Dense_0": {"kernel": jnp.ones((784, 256)), "bias": jnp.zeros(256)}}
      >>> print(jaxl2.selected(params, 1e-3))
      path            shape    dtype    λ
      --------------  -------  -------  -----
      Dense_0/kernel  784×256  float32  0.001
    """
    chosen = _select.resolve(params, select)
    lams = [None] * len(chosen) if l2 is None else _coefficients(chosen, l2)
    return Selection(Row(p, tuple(w.shape), str(w.dtype), lam) for lam, (p, w) in zip(lams, chosen))


def regularized(
    loss_fn: Callable[..., Any],
    l2: L2,
    *,
    select: _select.Selector = None,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """Wraps ``loss_fn(params, *args)`` into ``loss_fn(params, *args) + λ/2·Σw²``.

    ``jax.grad`` of the result is the data gradient plus ``λ·w`` on the selected leaves.
    With ``has_aux=True``, ``loss_fn`` returns ``(loss, aux)`` and the wrapper returns
    ``(loss + penalty, aux')`` where ``aux'`` is ``aux`` (a mapping; anything else is put
    under ``"aux"``) with ``"data_loss"`` and ``"penalty"`` added.

    Args:
      loss_fn: the data loss ``(params, *args, **kwargs) -> loss`` (or ``(loss, aux)``).
      l2: a λ, or an ordered ``{regex: λ}`` mapping, as in :func:`l2_penalty`.
      select: which leaves, as in :func:`l2_penalty`.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      The regularized loss, with the signature of ``loss_fn``.

    Raises:
      Jaxl2Error: at once for a bad λ, an empty mapping, a non-string key, an invalid regex
        or a bad ``select``; at the call, when the selection or a pattern matches nothing
        in the params it is given (only then are the paths known).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxl2
      >>> def mse(params, x, y):
      ...     return jnp.mean((x @ params["Dense_0"]["kernel"] - y) ** 2)
      >>> params = {"Dense_0": {"kernel": jnp.ones((2, 1))}}
      >>> loss = jaxl2.regularized(mse, 0.5)
      >>> x, y = jnp.zeros((4, 2)), jnp.zeros((4, 1))
      >>> jax.grad(loss)(params, x, y)["Dense_0"]["kernel"].ravel().tolist()  # λ·w
      [0.5, 0.5]
    """
    # Everything that can be checked without params fails here, not at the first call.
    if isinstance(l2, Mapping):
        _rules(l2)
    else:
        check_l2(l2)
    _select.predicate(select)

    def loss(params, *args, **kwargs):
        out = loss_fn(params, *args, **kwargs)
        pen = l2_penalty(params, l2, select=select)
        if not has_aux:
            return out + pen
        data_loss, aux = out
        aux = dict(aux) if isinstance(aux, Mapping) else {"aux": aux}
        aux.update(data_loss=data_loss, penalty=pen)
        return data_loss + pen, aux

    loss.__name__ = f"regularized_{getattr(loss_fn, '__name__', 'loss')}"
    loss.__doc__ = f"{getattr(loss_fn, '__name__', 'loss')} + λ/2·Σw² (jaxl2.regularized)."
    return loss
