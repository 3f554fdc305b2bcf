"""jaxl2's own error type: bad input to a jaxl2 function, said in the caller's terms.

Every error that jaxl2 raises on purpose is a :class:`Jaxl2Error`. It subclasses
``ValueError``, so ``except ValueError`` keeps working, while a program (the ``jaxl2``
command included) can tell jaxl2's word on its input from a ``ValueError`` raised deep
inside JAX, which is a bug to show rather than bad input.

Example:
  >>> import jax.numpy as jnp, jaxl2
  >>> try:
  ...     jaxl2.l2_penalty({"b": jnp.zeros(3)}, 1e-3)
  ... except jaxl2.Jaxl2Error as e:
  ...     print(str(e)[:60])
  the default selection (kernels: last path key 'kernel') matc
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["Jaxl2Error", "describe", "shown", "listing", "check_number"]


class Jaxl2Error(ValueError):
    """Bad input to jaxl2: the message names the argument, the value and what is allowed."""


def describe(value: object) -> str:
    """A short description of ``value`` for an error message, never its whole repr:
    ``the number 0.001``, ``an array of dtype float32 and shape (3,)``, ``a pytree of 2,000
    arrays``, ``a dict with no arrays``, ``a function``.

    Examples:
      >>> import jax.numpy as jnp
      >>> describe(1e-3), describe(jnp.ones(3))
      ('the number 0.001', 'an array of dtype float32 and shape (3,)')
      >>> describe({"a": jnp.ones(2), "b": [jnp.ones(2)] * 1999})
      'a pytree (dict) of 2,000 arrays'
    """
    if isinstance(value, bool):
        return f"the bool {value}"
    if isinstance(value, int | float):
        return f"the number {value:g}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of dtype {value.dtype} and shape {tuple(value.shape)}"
    if hasattr(value, "init") and hasattr(value, "update"):
        return f"an optax {type(value).__name__}"
    if callable(value) and not isinstance(value, type):
        return f"a function ({getattr(value, '__name__', type(value).__name__)})"
    import jax  # only here: describing a pytree

    n = sum(hasattr(leaf, "shape") for leaf in jax.tree.leaves(value))
    kind = type(value).__name__
    if n:
        return f"a pytree ({kind}) of {n:,} array{'s' if n != 1 else ''}"
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({kind})"


def shown(value: object) -> str:
    """:func:`describe`, except that a Python number shows as its repr and type, ``-1.0 (float)``.

    Examples:
      >>> shown(-1.0), shown("1e-3")
      ('-1.0 (float)', "'1e-3' (str)")
    """
    if isinstance(value, bool | int | float | complex):
        return f"{value!r} ({type(value).__name__})"
    return describe(value)


def listing(names: list[str], limit: int = 12) -> str:
    """``names`` joined by commas for a message, at most ``limit`` of them and then how many more
    (a model of 2,000 leaves names 12 paths, never all of them).

    Examples:
      >>> listing(["a", "b"]), listing([f"p{i}" for i in range(30)], limit=3)
      ('a, b', 'p0, p1, p2, … and 27 more')
    """
    shown_names = ", ".join(names[:limit])
    return shown_names if len(names) <= limit else f"{shown_names}, … and {len(names) - limit:,} more"


def check_number(value: Any, name: str, *, integer: bool = False, low: float = 0, above: bool = False) -> Any:
    """``value`` if it is a finite real number (an integer with ``integer``; never a bool) ``>= low``
    (``> low`` with ``above``); else a :class:`Jaxl2Error` that says so.

    Examples:
      >>> check_number(0.5, "eps", above=True)
      0.5
      >>> check_number(True, "directions", integer=True, low=1)
      Traceback (most recent call last):
      ...
      jaxl2.errors.Jaxl2Error: directions must be an integer >= 1, got True (bool)
    """
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value > low if above else value >= low)):
        what = "an integer" if integer else "a finite number"
        raise Jaxl2Error(f"{name} must be {what} {'>' if above else '>='} {low:g}, got {shown(value)}")
    return value
