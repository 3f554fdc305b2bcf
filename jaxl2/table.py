"""Plain-text tables, as :func:`jaxl2.selected`, :func:`jaxl2.audit` and :func:`jaxl2.gradcheck`
print them: a header, a rule of dashes, left-aligned columns two spaces apart.

Example:
  >>> print(format_table(("path", "shape"), [("Dense_0/kernel", format_shape((784, 256)))]))
  path            shape
  --------------  -------
  Dense_0/kernel  784×256
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table", "format_shape"]


def format_shape(shape: Sequence[int]) -> str:
    """``784×256``; ``()`` for a scalar."""
    return "×".join(map(str, shape)) or "()"


def format_table(head: Sequence[str], body: Sequence[Sequence[object]]) -> str:
    """``head``, a rule, then ``body``; every column as wide as its widest cell."""
    rows = [tuple(map(str, row)) for row in [head, *body]]
    widths = [max(len(c) for c in col) for col in zip(*rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])
