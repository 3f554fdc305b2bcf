"""Gradient checks in float64: autodiff against the analytic ``λ·w`` and finite differences.

Two numbers, both computed under ``jax.enable_x64``:

1. ``penalty_grad_max_abs_err`` = ``max |∇(λ/2·Σw²) − λ·w|`` over selected leaves (and
   ``max |∇ − 0|`` elsewhere), the analytic gradient computed in NumPy;
2. ``finite_difference_max_rel_err`` = ``max_d |D_d − ⟨∇L, d⟩| / max(|D_d|, |⟨∇L, d⟩|)`` over
   random unit directions ``d``, with the central difference
   ``D_d = (L(θ + εd) − L(θ − εd)) / 2ε`` of the full regularized loss ``L``.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxl2.gradcheck import gradcheck
  >>> def mse(params, x, y):
  ...     return jnp.mean((x @ params["dense"]["kernel"] + params["dense"]["bias"] - y) ** 2)
  >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  >>> report = gradcheck(mse, params, jnp.ones((4, 3)), jnp.zeros((4, 2)), l2=1e-2)
  >>> report.ok
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from jaxl2 import select as _select
from jaxl2.errors import Jaxl2Error
from jaxl2.penalty import L2, l2_penalty, regularized, selected

__all__ = ["GradcheckReport", "gradcheck"]


@dataclasses.dataclass(frozen=True)
class GradcheckReport:
    """The result of :func:`gradcheck`; ``ok`` when both errors are under their tolerances."""

    penalty_grad_max_abs_err: float
    finite_difference_max_rel_err: float
    atol: float
    rtol: float
    n_params: int
    n_selected: int

    @property
    def ok(self) -> bool:
        return bool(
            self.penalty_grad_max_abs_err <= self.atol and self.finite_difference_max_rel_err <= self.rtol
        )

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}

    def __str__(self) -> str:
        rows = [
            ("check", "max error", "tolerance", "pass"),
            (
                "grad of penalty vs analytic λ·w / 0 (abs)",
                f"{self.penalty_grad_max_abs_err:.3e}",
                f"{self.atol:.0e}",
                str(self.penalty_grad_max_abs_err <= self.atol),
            ),
            (
                "grad of loss+penalty vs central differences (rel)",
                f"{self.finite_difference_max_rel_err:.3e}",
                f"{self.rtol:.0e}",
                str(self.finite_difference_max_rel_err <= self.rtol),
            ),
        ]
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(n) for c, n in zip(r, w)).rstrip() for r in rows]
        tail = f"{self.n_selected} of {self.n_params} leaves penalised; float64; ok={self.ok}"
        return "\n".join([lines[0], "  ".join("-" * n for n in w), *lines[1:], tail])


def _to64(tree: Any) -> Any:
    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x, jnp.float64)
        return x

    return jax.tree_util.tree_map(cast, tree)


def gradcheck(
    loss_fn: Callable[..., Any],
    params: Any,
    *args: Any,
    l2: L2 = 1e-3,
    select: _select.Selector = None,
    directions: int = 8,
    eps: float = 1e-5,
    atol: float = 1e-12,
    rtol: float = 1e-6,
    seed: int = 0,
) -> GradcheckReport:
    """Checks ``jax.grad`` of ``regularized(loss_fn, l2)`` in float64.

    ``loss_fn(params, *args)`` is the user's own data loss; floating leaves of ``params``
    and ``args`` are cast to float64.

    Returns:
      A :class:`GradcheckReport`; ``report.ok`` is the verdict, ``print(report)`` a table.
    """
    if directions < 1:
        raise Jaxl2Error(f"directions must be >= 1, got {directions}")
    with jax.enable_x64(True):
        params, args = _to64(params), _to64(args)
        rows = {r.path: float(r.l2) for r in selected(params, l2, select=select)}
        leaves = _select.leaves(params)

        pen_grad = jax.grad(lambda p: l2_penalty(p, l2, select=select))(params)
        pen_err = 0.0
        for (path, w), (_, g) in zip(leaves, _select.leaves(pen_grad)):
            expected = rows[path] * np.asarray(w) if path in rows else np.zeros(w.shape)
            pen_err = max(pen_err, float(np.max(np.abs(np.asarray(g) - expected), initial=0.0)))

        loss = jax.jit(regularized(loss_fn, l2, select=select))
        grad = jax.grad(loss)(params, *args)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        g_flat, _ = jax.flatten_util.ravel_pytree(grad)
        rng = np.random.default_rng(seed)
        fd_err = 0.0
        for _ in range(directions):
            d = rng.standard_normal(flat.shape)
            d = jnp.asarray(d / np.linalg.norm(d))
            plus = float(loss(unravel(flat + eps * d), *args))
            minus = float(loss(unravel(flat - eps * d), *args))
            fd = (plus - minus) / (2 * eps)
            ad = float(jnp.vdot(g_flat, d))
            fd_err = max(fd_err, abs(fd - ad) / max(abs(fd), abs(ad), 1e-30))
    return GradcheckReport(pen_err, fd_err, atol, rtol, len(leaves), len(rows))
