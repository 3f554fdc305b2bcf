"""Gradient checks in float64: autodiff against the analytic ``λ·w`` and finite differences.

Two numbers, both computed under ``jax.enable_x64``:

1. ``penalty_grad_max_abs_err`` = ``max |∇(λ/2·Σw²) − λ·w|`` over selected leaves (and
   ``max |∇ − 0|`` elsewhere), the analytic gradient computed in NumPy; with a ``center``
   ``w₀``, ``max |∇(λ/2·Σ(w − w₀)²) − λ·(w − w₀)|``; for a leaf of stacked layers, ``λ_i·w_i``
   on each slice ``i``;
2. ``finite_difference_max_rel_err`` = ``max_d |D_d − ⟨∇L, d⟩| / max(|D_d|, |⟨∇L, d⟩|)`` over
   random unit directions ``d``, with the central difference
   ``D_d = (L(θ + εd) − L(θ − εd)) / 2ε`` of the full regularized loss ``L``.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxl2.check import gradcheck
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
import jax.extend
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from jaxl2 import select as _select
from jaxl2.errors import Jaxl2Error, check_number
from jaxl2.penalty import l2_penalty, regularized
from jaxl2.rules import L2, Entry, Stacked, plan
from jaxl2.table import format_table

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
        checks = [
            ("grad of penalty vs analytic λ·w / 0 (abs)", self.penalty_grad_max_abs_err, self.atol),
            (
                "grad of loss+penalty vs central differences (rel)",
                self.finite_difference_max_rel_err,
                self.rtol,
            ),
        ]
        rows = [(check, f"{err:.3e}", f"{tol:.0e}", str(err <= tol)) for check, err, tol in checks]
        tail = f"{self.n_selected} of {self.n_params} leaves penalised; float64; ok={self.ok}"
        return f"{format_table(('check', 'max error', 'tolerance', 'pass'), rows)}\n{tail}"


def _to64(tree: Any) -> Any:
    """``tree`` with its floating-point arrays in float64."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) if _select.is_float_array(x) else x, tree)


def _narrow_float(jaxpr: Any, depends: list[bool], live_only: bool = False) -> tuple[str, str] | None:
    """``(primitive, dtype)`` of the first equation whose output depends on the inputs marked
    in ``depends`` (the params) and is a float narrower than float64, in sub-jaxprs too; else
    ``None``. A cast of the data alone (``x.astype(jnp.float32) @ w``) does not count: the loss
    is still float64 in the params. ``live_only`` skips top-level equations that the outputs
    do not use (such as the ``aux`` of a ``has_aux`` loss)."""
    eqns = jaxpr.eqns
    if live_only:
        live, kept = {id(v) for v in jaxpr.outvars}, []
        for eqn in reversed(eqns):
            if any(id(v) in live for v in eqn.outvars):
                kept.append(eqn)
                live.update(id(v) for v in eqn.invars)
        eqns = kept[::-1]
    marked = {id(v) for v, d in zip(jaxpr.invars, depends) if d}
    for eqn in eqns:
        ins = [id(v) in marked for v in eqn.invars]
        if not any(ins):
            continue
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            # A sub-jaxpr takes the equation's operands (jit, custom_jvp/vjp, scan) or its
            # trailing ones (cond's branches, while's body); otherwise assume it uses them all.
            n = len(sub.invars)
            if found := _narrow_float(sub, ins[len(ins) - n :] if n <= len(ins) else [True] * n):
                return found
        for v in eqn.outvars:
            marked.add(id(v))
            dtype = getattr(v.aval, "dtype", None)
            if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 8:
                return eqn.primitive.name, jnp.dtype(dtype).name
    return None


def _analytic(e: Entry | None, w: Any) -> np.ndarray:
    """The penalty's gradient ``λ·(w − w₀)`` of a leaf (``λ_i`` on each slice of a stacked leaf;
    zero off the plan), in NumPy."""
    if e is None:
        return np.zeros(w.shape)
    lam = np.asarray(e.lam(None, jnp.float64))
    return lam * (np.asarray(w) - (0.0 if e.center is None else np.asarray(e.center)))


def _check_resolution(err: float, rtol: float, eps: float, loss: float, slope: float) -> None:
    """Refuses a failed direction that rounding alone explains: ``L(θ ± eps·d)`` are each rounded
    to float64's ``ε·|L|``, so ``D_d`` carries an error of about ``ε·|L|/eps``; when that exceeds
    ``rtol·|⟨∇L, d⟩|``, the step is below what float64 resolves and the verdict would be noise."""
    noise = float(np.finfo(np.float64).eps) * loss / eps
    if err <= rtol or noise <= rtol * slope:
        return
    smallest = float(np.finfo(np.float64).eps) * loss / (rtol * max(slope, 1e-300))
    raise Jaxl2Error(
        f"eps {eps:g} is below what float64 resolves here: the central difference's rounding error "
        f"(about ε·|L|/eps = {noise:.2g}) exceeds rtol·|⟨∇L, d⟩| = {rtol * slope:.2g}; use eps >= "
        f"{10 ** np.ceil(np.log10(10 * smallest)):g} (default 1e-5)"
    )


def gradcheck(
    loss_fn: Callable[..., Any],
    params: Any,
    *args: Any,
    l2: L2 = 1e-3,
    select: _select.Selector = None,
    center: Any = None,
    stacked: Stacked = None,
    has_aux: bool = False,
    directions: int = 8,
    eps: float = 1e-5,
    atol: float = 1e-12,
    rtol: float = 1e-6,
    seed: int = 0,
) -> GradcheckReport:
    """Checks ``jax.grad`` of ``L = regularized(loss_fn, l2)`` in float64.

    ``loss_fn(params, *args)`` is the user's own data loss; floating leaves of ``params``
    and ``args`` are cast to float64, and only the floating-point array leaves of
    ``params`` are differentiated and perturbed (an Equinox module's functions, ints and
    ``None`` stay as they are). Two checks:

    1. ``max |∇(λ/2·Σw²) − λ·w|`` on the selected leaves (``max |∇ − 0|`` on the others)
       must be ``<= atol``; with ``center=w₀`` it is ``max |∇(λ/2·Σ(w − w₀)²) − λ·(w − w₀)|``
       (``w₀`` is cast to float64 too); with ``stacked``, ``λ_i·(w_i − w₀_i)`` on each layer
       slice ``i`` of a stacked leaf, with its own ``λ_i``;
    2. for ``directions`` random unit vectors ``d``,
       ``|D_d − ⟨∇L, d⟩| / max(|D_d|, |⟨∇L, d⟩|)`` with
       ``D_d = (L(θ + eps·d) − L(θ − eps·d)) / (2·eps)`` must be ``<= rtol``.

    A model that computes on the params in a narrower float (an explicit
    ``astype(jnp.float32)``, a Flax layer with ``dtype=jnp.float32``) makes the finite
    differences meaningless: it is refused before anything is computed.

    Args:
      loss_fn: ``(params, *args) -> loss``, or ``-> (loss, aux)`` with ``has_aux=True``.
      params: any pytree: a params dict, an NNX ``State``, an Equinox module.
      *args: the batch and anything else ``loss_fn`` takes after ``params``.
      l2: λ or an ordered ``{regex: λ}`` mapping, as in :func:`jaxl2.l2_penalty`.
      select: which leaves are penalised, as in :func:`jaxl2.l2_penalty`.
      center: ``None``, or the reference weights ``w₀`` of an L2-SP penalty
        ``λ/2·Σ(w − w₀)²``, a pytree like ``params``, as in :func:`jaxl2.l2_penalty`.
      stacked: ``None``, or ``{regex over leaf paths: layer axis}`` for leaves of stacked
        layers, one λ per slice (``l2`` rules such as ``r".*kernel\\[0\\]"``), as in
        :func:`jaxl2.l2_penalty`.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is ignored.
      directions: the number of random directions, an integer ``>= 1``.
      eps: the finite-difference step, a finite number ``> 0``.
      atol: the tolerance of check 1, a finite number ``>= 0``.
      rtol: the tolerance of check 2, a finite number ``>= 0``.
      seed: the seed of the directions, an integer ``>= 0``.

    Returns:
      A :class:`GradcheckReport`; ``report.ok`` is the verdict, ``print(report)`` a table.

    Raises:
      Jaxl2Error: for a bad argument, a selection or pattern that matches nothing, a
        ``center`` that does not fit ``params``, a ``loss_fn`` that computes in a float
        narrower than float64, or an ``eps`` so small that float64's rounding alone would fail
        the check (its error ``≈ ε·|L|/eps`` exceeds ``rtol·|⟨∇L, d⟩|``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxl2.check import gradcheck
      >>> def mse(params, x, y):
      ...     return jnp.mean((jnp.tanh(x @ params["dense"]["kernel"]) - y) ** 2)
      >>> params = {"dense": {"kernel": jnp.ones((3, 2))}}
      >>> r = gradcheck(mse, params, jnp.ones((4, 3)), jnp.zeros((4, 2)), l2=0.1, directions=2)
      >>> r.ok, r.n_selected
      (True, 1)
    """
    check_number(directions, "directions", integer=True, low=1)
    check_number(seed, "seed", integer=True)
    eps = float(check_number(eps, "eps", above=True))
    atol, rtol = float(check_number(atol, "atol")), float(check_number(rtol, "rtol"))
    regularized(loss_fn, l2, select=select, center=center, stacked=stacked)  # checks the rules
    with jax.enable_x64(True):
        params, args, center = _to64(params), _to64(args), _to64(center)
        loss = regularized(loss_fn, l2, select=select, center=center, stacked=stacked, has_aux=has_aux)
        entries = {e.path: e for e in plan(params, l2, select=select, stacked=stacked, center=center)}
        leaves = _select.leaves(params)
        arrays, merge = _select.float_part(params)  # functions, ints and None stay as they are
        flat, unravel = jax.flatten_util.ravel_pytree(arrays)

        def rebuild(vec: jax.Array) -> Any:
            return merge(unravel(vec))

        def total(vec):
            out = loss(rebuild(vec), *args)
            return out[0] if has_aux else out

        narrow = _narrow_float(jax.make_jaxpr(total)(flat).jaxpr, [True], live_only=True)
        if narrow:
            primitive, dtype = narrow
            raise Jaxl2Error(
                f"loss_fn computes in {dtype} (first: {primitive}) although the check runs in "
                f"float64; central differences at eps={eps:g} in {dtype} are rounding noise, not a "
                "gradient. Remove the explicit dtype from the model (x.astype(jnp.float32), a "
                "layer's dtype=jnp.float32) so that it computes in its inputs' dtype"
            )

        pen_grad = jax.grad(
            lambda v: l2_penalty(rebuild(v), l2, select=select, center=center, stacked=stacked)
        )(flat)
        expected = np.concatenate([np.ravel(_analytic(entries.get(p), w)) for p, w in leaves])
        pen_err = float(np.max(np.abs(np.asarray(pen_grad) - expected), initial=0.0))

        value, grad = jax.jit(total), np.asarray(jax.jit(jax.grad(total))(flat))
        rng = np.random.default_rng(seed)
        fd_err = 0.0
        for _ in range(directions):
            d = rng.standard_normal(flat.shape)
            d /= np.linalg.norm(d)
            up, down = float(value(flat + eps * d)), float(value(flat - eps * d))
            fd, ad = (up - down) / (2 * eps), float(grad @ d)
            err = abs(fd - ad) / max(abs(fd), abs(ad), 1e-30)
            _check_resolution(err, rtol, eps, max(abs(up), abs(down)), abs(ad))
            fd_err = max(fd_err, err)
    return GradcheckReport(pen_err, fd_err, atol, rtol, len(leaves), len(entries))
