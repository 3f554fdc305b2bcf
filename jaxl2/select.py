"""Which leaves of a params pytree are penalised: paths, presets and selectors.

A leaf's *path* is its pytree keys joined by ``/``: ``params/Dense_0/kernel`` for a
Flax Linen dict, ``l1/kernel`` for an NNX ``State`` (the trailing ``.value`` of an
``nnx.Variable`` is dropped), ``layers/0/weight`` for an Equinox module. Only
floating-point array leaves are candidates; anything else (integers, functions,
``None``) is never selected.

A *selector* is ``None`` (the kernels), a regular expression matched with
``re.fullmatch`` against the path, or a predicate ``(path: str, leaf) -> bool``.
The presets below are predicates.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxl2 import select
  >>> params = {"params": {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}}
  >>> [p for p, _ in select.leaves(params)]
  ['params/Dense_0/bias', 'params/Dense_0/kernel']
  >>> [p for p, _ in select.resolve(params, None)]
  ['params/Dense_0/kernel']
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxl2.errors import Jaxl2Error

Predicate = Callable[[str, Any], bool]
Selector = None | str | Predicate

__all__ = [
    "kernels",
    "haiku",
    "equinox",
    "leaves",
    "is_float_array",
    "path_str",
    "predicate",
    "resolve",
    "PRESETS",
]


def _last(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def kernels(path: str, leaf: Any) -> bool:
    """Flax Linen/NNX ``Dense``/``Linear``/``Conv`` weights: the last path key is ``kernel``."""
    return _last(path) == "kernel"


def haiku(path: str, leaf: Any) -> bool:
    """Haiku ``Linear``/``Conv`` weights: the last path key is ``w``."""
    return _last(path) == "w"


def equinox(path: str, leaf: Any) -> bool:
    """Equinox ``nn.Linear``/``nn.Conv`` weights: last key ``weight`` and ``ndim >= 2``."""
    return _last(path) == "weight" and len(getattr(leaf, "shape", ())) >= 2


PRESETS: dict[str, Predicate] = {"kernels": kernels, "haiku": haiku, "equinox": equinox}


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath: tuple) -> str:
    """Joins a JAX key path with ``/``, dropping an ``nnx.Variable``'s trailing ``.value``."""
    keys = list(keypath)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_str(k) for k in keys)


def is_float_array(leaf: Any) -> bool:
    """Whether ``leaf`` is an array (NumPy or JAX) of a floating-point dtype."""
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and hasattr(leaf, "shape") and jnp.issubdtype(dtype, jnp.floating)


def leaves(params: Any) -> list[tuple[str, Any]]:
    """All floating-point array leaves of ``params`` as ``(path, leaf)`` pairs, in tree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [(path_str(kp), leaf) for kp, leaf in flat if is_float_array(leaf)]


def compile_regex(pattern: str, what: str = "select") -> re.Pattern:
    """``re.compile`` with an error that names the bad pattern."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise Jaxl2Error(
            f"{what} pattern {pattern!r} is not a valid regular expression ({e}); "
            "patterns are Python regexes matched with re.fullmatch against paths "
            "like 'params/Dense_0/kernel'"
        ) from None


def predicate(select: Selector) -> Predicate:
    """The predicate ``(path, leaf) -> bool`` of a selector (``None`` means the kernels)."""
    if select is None:
        return kernels
    if isinstance(select, str):
        rx = compile_regex(select)
        return lambda path, leaf: rx.fullmatch(path) is not None
    if callable(select):
        return select
    raise Jaxl2Error(
        f"select must be None (kernels), a regex string or a predicate (path, leaf) -> bool; "
        f"got {type(select).__name__}"
    )


def _describe(select: Selector) -> str:
    if select is None:
        return "the default selection (kernels: last path key 'kernel')"
    if isinstance(select, str):
        return f"select={select!r}"
    return f"select={getattr(select, '__name__', repr(select))}"


def resolve(params: Any, select: Selector = None) -> list[tuple[str, Any]]:
    """The ``(path, leaf)`` pairs that ``select`` picks; an empty match is a ``ValueError``.

    The error lists the floating-point paths that do exist, so a typo or a preset for
    another library (``kernel`` vs ``w`` vs ``weight``) shows at once.
    """
    pred = predicate(select)
    candidates = leaves(params)
    chosen = [(p, x) for p, x in candidates if pred(p, x)]
    if not chosen:
        existing = ", ".join(p for p, _ in candidates) or "(none: no floating-point leaves)"
        raise Jaxl2Error(
            f"{_describe(select)} matched no parameter; the paths that exist are: {existing}. "
            "Use a regex over these paths, a predicate, or a preset "
            "(jaxl2.select.kernels, .haiku, .equinox)"
        )
    return chosen
