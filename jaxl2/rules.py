"""Which λ each selected leaf gets: one λ, ``{regex: λ}`` rules, schedules and stacked layers.

A *unit* is what one λ applies to. It is a selected leaf, named by its path, or, for a leaf
whose layers are stacked along an axis (``nn.scan``, ``jax.lax.scan``, ``eqx.filter_vmap``),
one slice of it along that axis, named ``path[i]``: a kernel of shape ``(12, 768, 3072)``
stacked on axis 0 is twelve units ``…/kernel[0]`` … ``…/kernel[11]`` of shape ``768×3072``.

* ``l2`` is one λ for every unit, or an ordered mapping ``{regex: λ}``: each unit takes the λ
  of the first pattern that ``re.fullmatch``-es its name, or, for a slice, its leaf's path (so
  ``'.*kernel'`` covers every slice and ``r'.*kernel\\[0\\]'`` the first one only). A key equal
  to a name is taken as it is, so ``{path: λ}`` (``{'blocks/kernel[0]': 1e-2}``) needs no escaping.
* A λ is a finite number ``>= 0``, a traced scalar (under ``jit``/``vmap``), or, where a step
  count is known, an optax schedule: a function of the step count, such as
  ``optax.linear_schedule(1e-2, 0.0, 1000)``.
* ``stacked`` is ``None`` or an ordered mapping ``{regex: axis}`` over leaf paths: a selected
  leaf whose path a pattern fullmatches first is stacked along that axis.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxl2 import rules
  >>> params = {"blocks": {"kernel": jnp.ones((3, 4, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
  >>> for e in rules.plan(params, {r".*kernel\\[0\\]": 1e-2, ".*": 1e-3}, stacked={"blocks/.*": 0}):
  ...     print(e.path, e.axis, e.units, e.l2)
  blocks/kernel 0 ('blocks/kernel[0]', 'blocks/kernel[1]', 'blocks/kernel[2]') (0.01, 0.001, 0.001)
  head/kernel None ('head/kernel',) (0.001,)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2 import select as _select
from jaxl2.errors import Jaxl2Error, describe, listing, shown

__all__ = [
    "is_traced",
    "L2",
    "Entry",
    "check_l2",
    "check_bool",
    "check_stacked",
    "check_l2_rules",
    "has_schedule",
    "plan",
]

Schedule = Callable[[Any], Any]
L2 = float | jax.Array | Schedule | Mapping[str, Any]
Stacked = Mapping[str, int] | None


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a tracer (a value inside ``jit``/``vmap``/``grad``), not a concrete number."""
    return isinstance(x, jax.core.Tracer)


def is_schedule(value: Any) -> bool:
    """A function of the step count (an optax schedule): callable and not an array."""
    return callable(value) and not hasattr(value, "dtype")


def check_l2(value: Any, name: str = "l2", *, schedule: bool = False) -> Any:
    """Checks one coefficient ``λ``: a real number, finite and ``>= 0`` (or, with ``schedule``, a
    function of the step count whose value at step 0 is one).

    Accepted: a python ``int``/``float``, a NumPy integer or float scalar, a 0-d NumPy or
    JAX array of an integer or float dtype (all checked for ``0 <= λ < ∞``), and a traced
    value under ``jit``/``vmap``: its shape and dtype are checked as outside ``jit``, with the
    same message, but not its sign or finiteness (its value is not known yet). Refused:
    strings, bytes, bools, ``None``, complex numbers, arrays that are not 0-d, and pytrees
    (the message then asks whether the params were given where λ goes).

    Args:
      value: the coefficient.
      name: the argument's name, for the error message.
      schedule: whether an optax schedule (``count -> λ``) is allowed here.

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
      >>> import optax
      >>> check_l2(optax.linear_schedule(-1.0, 0.0, 10), schedule=True)
      Traceback (most recent call last):
      ...
      jaxl2.errors.Jaxl2Error: l2 is a schedule whose value at step 0 is -1.0; a λ must be a finite number >= 0
    """
    if is_schedule(value):
        if not schedule:
            raise Jaxl2Error(
                f"{name} is a schedule (a function of the step count), and there is no step count here: "
                "schedules are taken by jaxl2.add_decayed_weights and jaxl2.make_train_step, and by "
                "jaxl2.l2_penalty with step=; otherwise give a number"
            )
        try:
            at0 = value(0)
        except Exception as e:  # a user's callable: say which argument it was
            raise Jaxl2Error(
                f"{name} is callable, so it is taken as a schedule (step count -> λ), but {name}(0) "
                f"raised {type(e).__name__}: {e}"
            ) from None
        if is_traced(at0):  # a schedule closing over a traced value: checked when it is known
            return value
        try:
            check_l2(at0, name)
        except Jaxl2Error:
            raise Jaxl2Error(
                f"{name} is a schedule whose value at step 0 is {number_text(at0)}; a λ must be a finite number >= 0"
            ) from None
        return value
    real = isinstance(value, (int, float, np.integer, np.floating, np.ndarray, jax.Array))
    if real and hasattr(value, "dtype"):
        dtype = value.dtype
        real = value.ndim == 0 and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))
    if real and is_traced(value):  # its shape and dtype are known, its value is not
        return value
    if not real or isinstance(value, bool) or not (0 <= float(value) < math.inf):
        got = shown(value)
        if hasattr(value, "dtype"):
            got += " (traced)" if is_traced(value) else f" ({type(value).__name__})"
        elif got.startswith("a pytree"):
            got += ": are the arguments swapped? (params where a λ goes)"
        raise Jaxl2Error(f"{name} must be a finite number >= 0 (a float or a 0-d array), got {got}")
    return value


def number_text(x: Any) -> str:
    try:
        return repr(float(x))
    except (TypeError, ValueError):
        return repr(x)


def check_bool(value: Any, name: str) -> bool:
    """Checks a flag: ``True`` or ``False`` (a Python or NumPy bool), nothing truthy in their place.

    Examples:
      >>> check_bool(True, "has_aux")
      True
      >>> check_bool("yes", "has_aux")
      Traceback (most recent call last):
      ...
      jaxl2.errors.Jaxl2Error: has_aux must be True or False, got 'yes' (str)
    """
    if not isinstance(value, (bool, np.bool_)):
        raise Jaxl2Error(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_l2_rules(l2: Any, *, schedule: bool = False) -> list[tuple[str, re.Pattern, Any]] | None:
    """Checks ``l2``; returns its ``(pattern, compiled regex, λ)`` rules, or ``None`` for one λ."""
    if not isinstance(l2, Mapping):
        check_l2(l2, schedule=schedule)
        return None
    if not l2:
        raise Jaxl2Error("l2 mapping is empty; give {regex: λ} entries, e.g. {'.*': 1e-3}")
    if any(describe(v).startswith("a pytree") for v in l2.values()):  # e.g. params where λ goes
        raise Jaxl2Error(
            f"l2 must be one λ or a mapping {{regex or path: λ}}, got {describe(l2)}: "
            "are the arguments swapped? (params where a λ goes)"
        )
    rules = _patterns(l2, "l2", "l2 mapping keys")
    for pattern, _, lam in rules:
        check_l2(lam, f"l2[{pattern!r}]", schedule=schedule)
    return rules


def _patterns(mapping: Mapping, name: str, keys: str) -> list[tuple[str, re.Pattern, Any]]:
    """``(pattern, compiled regex, value)`` of each entry of the argument ``name``, its keys checked."""
    for pattern in mapping:
        if not isinstance(pattern, str):
            raise Jaxl2Error(f"{keys} must be regex strings, got {pattern!r} ({type(pattern).__name__})")
    return [(p, _select.compile_regex(p, name), value) for p, value in mapping.items()]


def check_stacked(stacked: Stacked) -> list[tuple[str, re.Pattern, int]]:
    """Checks ``stacked``: ``None`` or a non-empty mapping ``{regex over leaf paths: axis (an int)}``.

    Examples:
      >>> check_stacked({".*blocks.*": "0"})
      Traceback (most recent call last):
      ...
      jaxl2.errors.Jaxl2Error: stacked['.*blocks.*'] must be an int, the layer axis of the leaves it matches, got '0' (str)
    """
    if stacked is None:
        return []
    if not isinstance(stacked, Mapping) or not stacked:
        raise Jaxl2Error(
            "stacked must be None or a non-empty mapping {regex over leaf paths: layer axis}, e.g. "
            f"{{'params/blocks/.*': 0}}; got {shown(stacked)}"
        )
    specs = _patterns(stacked, "stacked", "stacked keys")
    for pattern, _, axis in specs:
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
            raise Jaxl2Error(
                f"stacked[{pattern!r}] must be an int, the layer axis of the leaves it matches, "
                f"got {axis!r} ({type(axis).__name__})"
            )
    return [(pattern, rx, int(axis)) for pattern, rx, axis in specs]


def has_schedule(l2: Any) -> bool:
    """Whether ``l2`` (one λ or a mapping) holds a schedule."""
    values = l2.values() if isinstance(l2, Mapping) else [l2]
    return any(is_schedule(v) for v in values)


class Entry(NamedTuple):
    """One selected leaf, its units and the λ of each: a row of the plan.

    Attributes:
      path: the leaf's path.
      leaf: the leaf.
      axis: its layer axis (non-negative) when it is stacked, else ``None``.
      units: the units' names: ``(path,)``, or ``(path[0], …, path[L-1])`` when stacked.
      l2: one λ (a number, a traced value or a schedule) per unit; ``None`` each when no λ
        was asked for.
      rules: per unit, the ``l2`` pattern that gave its λ (``None`` when ``l2`` is not a mapping).
      center: the leaf's ``w₀`` (checked to fit), or ``None`` without a center.
    """

    path: str
    leaf: Any
    axis: int | None
    units: tuple[str, ...]
    l2: tuple
    rules: tuple
    center: Any = None

    def lam(self, count: Any = None, dtype: Any = jnp.float32) -> Any:
        """The λ at step ``count``: one scalar when all units share it, else a vector of ``dtype``
        (one λ per slice) shaped to multiply the leaf: along the layer axis, size 1 elsewhere.

        Examples:
          >>> import jax.numpy as jnp, optax
          >>> e = Entry("k", jnp.ones((2, 3)), 0, ("k[0]", "k[1]"), (0.5, optax.constant_schedule(0.25)), (None, None))
          >>> e.lam(count=0).tolist()
          [[0.5], [0.25]]
        """
        if count is None and any(callable(lam) for lam in self.l2):
            raise Jaxl2Error(f"the λ of {self.path!r} is a schedule, which needs the step count")
        lams = [lam(count) if callable(lam) else lam for lam in self.l2]
        if _same(self.l2):
            return lams[0]
        shape = [1] * self.leaf.ndim
        shape[cast(int, self.axis)] = -1  # a vector λ belongs to a stacked leaf, which has an axis
        return jnp.reshape(jnp.stack([jnp.asarray(lam, dtype) for lam in lams]), shape)

    def sq(self, x: Any = None, w0: Any = None) -> jax.Array:
        """``Σ(x − w₀)²`` over each unit in at least float32 (``x``: the leaf, ``w₀``: none by
        default): a scalar, or a ``[L]`` vector for a stacked leaf."""
        x = self.leaf if x is None else x
        acc = jnp.promote_types(x.dtype, jnp.float32)
        d = x.astype(acc) if w0 is None else x.astype(acc) - jnp.asarray(w0, acc)
        if self.axis is None:
            return jnp.sum(d * d)
        return jnp.sum(d * d, axis=tuple(i for i in range(d.ndim) if i != self.axis))

    def slices(self, x: Any) -> list[Any]:
        """``x`` (shaped like the leaf) cut into its units."""
        if self.axis is None:
            return [x]
        return [jnp.take(x, i, axis=self.axis) for i in range(len(self.units))]


def _axes(chosen: list[tuple[str, Any]], stacked: Stacked) -> list[int | None]:
    """The layer axis of each chosen leaf (``None``: not stacked), every pattern checked."""
    specs = check_stacked(stacked)
    paths = [p for p, _ in chosen]
    for pattern, rx, _ in specs:
        if not any(rx.fullmatch(p) for p in paths):
            raise Jaxl2Error(
                f"stacked pattern {pattern!r} matches no selected parameter (a typo?); "
                f"the selected paths are: {listing(paths)}"
            )
    axes = []
    for p, w in chosen:
        axis = next((a for _, rx, a in specs if rx.fullmatch(p)), None)
        if axis is not None:
            if not -w.ndim <= axis < max(w.ndim, 1) or w.ndim == 0:
                raise Jaxl2Error(
                    f"stacked gives {p!r} layer axis {axis}, but it has shape {tuple(w.shape)} "
                    f"(ndim {w.ndim}); the axis must be in [-{w.ndim}, {w.ndim})"
                )
            axis %= w.ndim
        axes.append(axis)
    return axes


def _rule_l2(
    units: list[tuple[str, str]], rules: list[tuple[str, re.Pattern, Any]], every: dict[str, Any]
) -> list[tuple[Any, str]]:
    """``(λ, pattern)`` of each ``(unit name, leaf path)``: those of the first rule matching either.

    A rule matches a name equal to its pattern (a path, taken as it is) or one its regex
    fullmatches. ``every`` holds all of params' array leaves by path, selected or not."""

    def matches(rule: tuple[str, re.Pattern, Any], name: str) -> bool:
        return name == rule[0] or rule[1].fullmatch(name) is not None

    def takes(rule: tuple[str, re.Pattern, Any], unit: tuple[str, str]) -> bool:
        return matches(rule, unit[0]) or (unit[0] != unit[1] and matches(rule, unit[1]))

    # the index of each unit's first matching rule, None where none matches
    first: list[Any] = [next((i for i, r in enumerate(rules) if takes(r, u)), None) for u in units]
    names = [u[0] for u in units]
    for i, (pattern, rx, _) in enumerate(rules):
        hits = [j for j, u in enumerate(units) if takes(rules[i], u)]
        if not hits:
            layers = {n: every[n].shape[0] if every[n].ndim else 0 for n, p in units if n == p}
            slices = [f"{n}[{k}]" for n, size in layers.items() for k in range(size)]
            if hit := next((n for n in slices if matches(rules[i], n)), None):
                raise Jaxl2Error(
                    f"l2 pattern {pattern!r} matches no selected parameter, but names the layer slice "
                    f"{hit!r} of a leaf that is not stacked: pass stacked={{{hit.rsplit('[', 1)[0]!r}: 0}} "
                    "(the layer axis) to give each slice its own λ"
                )
            raise Jaxl2Error(
                f"l2 pattern {pattern!r} matches no selected parameter (a typo?); "
                f"the selected paths are: {listing(names)}"
            )
        # A pattern that only matches units an earlier one takes is dead code, unless it matches
        # every leaf of params: a catch-all ('.*': 0.0) that says "the rest" on purpose.
        catch_all = all(rx.fullmatch(p) for p in every)
        if all(first[j] < i for j in hits) and not catch_all:
            takers = sorted({first[j] for j in hits})
            said = ", ".join(repr(rules[t][0]) for t in takers)
            which = "an earlier pattern" if len(takers) == 1 else "earlier patterns"
            raise Jaxl2Error(
                f"l2 pattern {pattern!r} never applies: the first match wins, and every selected path it "
                f"matches ({listing([names[j] for j in hits])}) is taken by {which} ({said}); remove it, "
                "or narrow the earlier pattern if it was meant to take some of them"
            )
    if None in first:
        raise Jaxl2Error(
            f"selected parameter {names[first.index(None)]!r} matches no l2 pattern; add an entry for it, "
            "or a catch-all such as {'.*': 0.0} to leave the remaining leaves unpenalised on purpose"
        )
    return [(rules[i][2], rules[i][0]) for i in first]


def plan(
    params: Any,
    l2: L2 | None,
    *,
    select: _select.Selector = None,
    stacked: Stacked = None,
    center: Any = None,
    schedule: bool = True,
) -> list[Entry]:
    """The plan: the selected leaves of ``params``, their units, each unit's λ (``l2=None``: no
    λ) and, with ``center``, each leaf's ``w₀``. Every public function of jaxl2 that selects
    derives from it.

    Raises:
      Jaxl2Error: an empty selection (the paths that exist are listed), a bad λ, an l2
        pattern that matches nothing or only units an earlier pattern takes (unless it matches
        every leaf of params, a catch-all), a selected unit no pattern matches, a bad ``stacked`` (not a mapping, a
        pattern that matches no selected leaf, an axis out of range), a ``center`` that does
        not fit ``params``.
    """
    chosen = _select.resolve(params, select)
    w0 = {} if center is None else _centers(params, center, chosen)
    axes = _axes(chosen, stacked)
    units = [
        [(p, p)] if axis is None else [(f"{p}[{i}]", p) for i in range(w.shape[axis])]
        for (p, w), axis in zip(chosen, axes)
    ]
    flat = [u for us in units for u in us]
    rules = None if l2 is None else check_l2_rules(l2, schedule=schedule)
    lams: list[tuple[Any, Any]]  # (λ, the pattern that gave it) per unit; (None, None) without λ
    lams = [(l2, None)] * len(flat) if rules is None else _rule_l2(flat, rules, dict(_select.leaves(params)))
    it = iter(lams)
    entries = []
    for (p, w), axis, us in zip(chosen, axes, units):
        lam, rule = zip(*[next(it) for _ in us])
        entries.append(Entry(p, w, axis, tuple(n for n, _ in us), lam, rule, w0.get(p)))
    return entries


def _same(lams: tuple) -> bool:
    """Whether every λ is the same object or the same concrete number."""
    a = lams[0]
    for b in lams[1:]:
        if b is a:
            continue
        concrete = not (callable(a) or callable(b) or is_traced(a) or is_traced(b))
        if not (concrete and float(a) == float(b)):
            return False
    return True


def _centers(params: Any, center: Any, chosen: list[tuple[str, Any]]) -> dict[str, Any]:
    """``{path: w₀}`` of the chosen leaves, once ``center`` is known to fit ``params``: a
    floating-point leaf at each of params' paths, and no other (paths are compared, not
    containers or order: a plain dict fits an NNX ``State``), shaped like each chosen leaf."""
    ours, theirs = dict(_select.leaves(params)), dict(_select.leaves(center))
    if missing := next((p for p in ours if p not in theirs), None):
        every = {_select.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(center)[0]}
        there = (
            f"center has {shown(every[missing])} there" if missing in every else "center has no leaf there"
        )
        diff = f"params has a floating-point leaf at {missing!r} and {there}"
    elif extra := next((p for p in theirs if p not in ours), None):
        diff = f"center has a floating-point leaf at {extra!r} that params lacks"
    else:
        for path, w in chosen:
            if tuple(theirs[path].shape) != tuple(w.shape):
                raise Jaxl2Error(
                    f"center must have the shapes of params on the selected leaves, but at {path!r} "
                    f"center has shape {tuple(theirs[path].shape)} and params {tuple(w.shape)}"
                )
        return {path: theirs[path] for path, _ in chosen}
    raise Jaxl2Error(f"center must have the structure of params (e.g. the pretrained params), but {diff}")
