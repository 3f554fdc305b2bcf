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

__all__ = ["Jaxl2Error"]


class Jaxl2Error(ValueError):
    """Bad input to jaxl2: the message names the argument, the value and what is allowed."""
