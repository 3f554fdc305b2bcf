"""λ from the evidence: the Laplace approximation of the marginal likelihood under jaxl2's penalty.

An L2 penalty ``λ/2·‖w‖²`` added to a **mean** negative log-likelihood over ``n`` examples
(cross-entropy; ``(y − f)²/(2σ²)`` for regression) is, times ``n``, the negative log of a
Gaussian prior ``w ~ N(w₀, α⁻¹)`` with precision ``α = n·λ``. At params ``w`` (a mode, once
trained) the Laplace approximation of the log evidence of the data ``D`` is

    log p(D | α) ≈ log p(D | w) − ½·Σ α_l‖w_l − w₀_l‖² + ½·log det A − ½·log det(H + A)

with ``A`` the diagonal of the prior precisions (``α_l`` on every entry of layer ``l``) and
``H`` the generalised Gauss–Newton ``Σ_i J_iᵀ Λ_i J_i`` of the summed negative log-likelihood
(``J_i`` the Jacobian of the model's outputs for example ``i``, ``Λ_i`` the likelihood's
Hessian in the outputs: ``diag(p) − ppᵀ`` for the softmax, ``I/σ²`` for a Gaussian). Nothing is
dropped: the two ``(P/2)·log 2π`` of prior and posterior cancel, and ``log p(D | w)`` is the
full log-likelihood (with ``−(N/2)·log 2πσ²`` for a Gaussian). It is exact for a linear model
with a Gaussian likelihood at its posterior mode.

The Laplace approximation covers the **selected** leaves (``select=``, the kernels by
default): the others (biases, norm scales) are held at their values, the evidence is that of
the selected weights given them.

:func:`ggn` computes ``H`` once per set of params (``"full"``: the exact matrix, ``P×P``, for
small models; ``"diag"``: its exact diagonal, at the cost of one backward pass per output and
example); :func:`log_evidence` is then cheap and differentiable in ``λ``; :func:`evidence_l2`
returns the per-layer λs that maximise it, by MacKay's fixed point (1992)
``α_l = γ_l / ‖w_l − w₀_l‖²``, ``γ_l = P_l − α_l·tr_l (H + A)⁻¹`` (the effective number of
parameters of layer ``l``), or by Adam on ``log λ`` (Immer et al., ICML 2021: a few steps
every few epochs). Every function is pure and jittable.

Example:
  >>> import jax.numpy as jnp, jaxl2
  >>> def f(params, x):
  ...     return x @ params["dense"]["kernel"]
  >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  >>> y = jnp.array([[1.0], [-1.0], [0.0]])
  >>> params = {"dense": {"kernel": jnp.array([[0.9], [-0.9]])}}
  >>> curv = jaxl2.ggn(f, params, x, y, likelihood="gaussian", structure="full")
  >>> round(float(jaxl2.log_evidence(curv, params, 0.1)), 4)  # nats
  -4.9419
  >>> best = jaxl2.evidence_l2(curv, params, 0.1, steps=50)  # MacKay's fixed point, at these params
  >>> {p: round(float(v), 4) for p, v in best.items()}
  {'dense/kernel': 0.2743}
  >>> float(jaxl2.log_evidence(curv, params, best)) > float(jaxl2.log_evidence(curv, params, 0.1))
  True
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from jaxl2 import select as _select
from jaxl2.errors import Jaxl2Error
from jaxl2.penalty import check_center, coefficients
from jaxl2.rules import Stacked, is_traced, plan

__all__ = ["Curvature", "ggn", "log_evidence", "evidence_l2", "LIKELIHOODS", "STRUCTURES"]

LIKELIHOODS = ("classification", "gaussian")
STRUCTURES = ("full", "diag", "kron")
METHODS = ("mackay", "adam")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["log_likelihood", "ggn"],
    meta_fields=["n", "paths", "structure"],
)
@dataclasses.dataclass(frozen=True)
class Curvature:
    """What :func:`ggn` measured at one set of params: ``log p(D | w)``, the GGN ``H`` of the
    summed negative log-likelihood over the selected leaves (``"full"``: a ``(P, P)`` matrix in
    the order of ``paths``, each leaf raveled; ``"diag"``: a tuple of arrays, one per path, of
    the leaves' shapes; ``"kron"``: a tuple of pairs ``(A, G)``, one per path, with the leaf's
    block ``H_l ≈ A ⊗ G`` on the leaf raveled row-major, K-FAC's factors), ``n`` (the examples)
    and the selected ``paths``. A pytree: it passes through ``jit``.

    ``"kron"`` needs each layer's inputs, which an ``apply_fn`` does not expose, so :func:`ggn`
    does not compute it: for a Dense kernel ``(d_in, d_out)`` with inputs ``a_i`` and
    ``b_ic = ∂f_ic/∂z_i`` (``z`` its output), ``A = Σ_i a_i a_iᵀ / n`` and
    ``G = Σ_i Σ_c p_ic·b_ic b_icᵀ − μ_i μ_iᵀ`` with ``μ_i = Σ_c p_ic·b_ic`` (a bias: ``A = [[1]]``
    and the same ``G``, which is then exact); build ``Curvature(log_likelihood, ((A, G), ...),
    n, paths, "kron")`` (:mod:`jaxl2.mnist.evidence` does, for its MLP). The evidence then needs
    one λ per leaf (only then is the prior precision ``αI`` diagonal in the factors' eigenbasis)."""

    log_likelihood: jax.Array
    ggn: Any
    n: int
    paths: tuple[str, ...]
    structure: str


def _chosen(params: Any, select: _select.Selector) -> tuple[list[int], list[str], Any, list[Any]]:
    """The selected leaves' indices among ``params``'s leaves, their paths, the treedef, the leaves."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    wanted = [p for p, _ in _select.resolve(params, select)]
    paths = [_select.path_str(kp) for kp, _ in flat]
    idx = [paths.index(p) for p in wanted]
    return idx, wanted, treedef, [x for _, x in flat]


def _gauss_newton(jac: jax.Array, out: jax.Array, likelihood: str, sigma: float, full: bool) -> jax.Array:
    """``Σ_i J_iᵀ Λ_i J_i`` of one batch (``jac``: ``(b, C, P)``), or its diagonal, without forming
    ``Λ_i``: for the softmax ``Λ = diag(p) − ppᵀ``, so ``JᵀΛJ = Σ_c p_c J_cᵀJ_c − (Jᵀp)(Jᵀp)ᵀ``
    (``C·P`` work per example, not ``C²·P``); for a Gaussian ``Λ = I/σ²``. The sums over examples
    are matrix products (XLA's CPU reductions over leading axes are several times slower)."""
    flat = jac.reshape(-1, jac.shape[-1])  # (b·C, P)
    if likelihood == "classification":
        p = jax.nn.softmax(out, axis=-1)
        weight = p.reshape(-1)
        mean = jnp.matmul(p[:, None, :], jac)[:, 0]  # (b, P): J_iᵀp_i
    else:
        weight, mean = jnp.full(flat.shape[0], 1 / sigma**2, flat.dtype), None
    if full:
        h = (flat * weight[:, None]).T @ flat
        return h if mean is None else h - mean.T @ mean
    h = weight @ (flat * flat)
    return h if mean is None else h - jnp.ones(mean.shape[0], mean.dtype) @ (mean * mean)


def _log_likelihood(out: jax.Array, y: jax.Array, likelihood: str, sigma: float) -> jax.Array:
    if likelihood == "classification":
        return jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(out, axis=-1), y[:, None], axis=-1))
    r = (y.reshape(out.shape) - out) / sigma
    return -0.5 * jnp.sum(r * r) - 0.5 * out.size * math.log(2 * math.pi * sigma**2)


def _check_ggn_args(apply_fn: Any, likelihood: Any, structure: Any, sigma: Any, batch_size: Any) -> None:
    if not callable(apply_fn):
        raise Jaxl2Error(f"apply_fn must be a function apply_fn(params, x), got {type(apply_fn).__name__}")
    if likelihood not in LIKELIHOODS:
        raise Jaxl2Error(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
    if structure == "kron":
        raise Jaxl2Error(
            "structure 'kron' needs each layer's inputs, which apply_fn does not expose: build "
            "Curvature(log_likelihood, ((A, G), ...), n, paths, 'kron') from them (jaxl2.Curvature says how)"
        )
    if structure not in STRUCTURES:
        raise Jaxl2Error(
            f"structure must be one of full (the exact GGN, P×P) or diag (its exact diagonal), got {structure!r}"
        )
    if not (isinstance(sigma, int | float) and not isinstance(sigma, bool) and 0 < sigma < math.inf):
        raise Jaxl2Error(f"sigma (the Gaussian noise scale) must be a finite number > 0, got {sigma!r}")
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
        raise Jaxl2Error(f"batch_size must be None or an integer >= 1, got {batch_size!r}")


def ggn(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    y: jax.Array,
    *,
    likelihood: str = "classification",
    sigma: float = 1.0,
    structure: str = "diag",
    select: _select.Selector = None,
    batch_size: int | None = 32,
) -> Curvature:
    """The generalised Gauss–Newton ``H = Σ_i J_iᵀ Λ_i J_i`` over the selected leaves, and
    ``log p(D | w)``, at ``params`` on the data ``(x, y)``.

    Args:
      apply_fn: ``apply_fn(params, x)`` → the outputs of a batch: logits ``(b, C)`` for
        classification, predictions ``(b, d)`` or ``(b,)`` for a Gaussian likelihood.
      params: the params, as in :func:`jaxl2.l2_penalty`.
      x: all the inputs the evidence is of (``n = len(x)``).
      y: their labels: integers ``(n,)`` for classification, targets of the outputs' shape for
        a Gaussian.
      likelihood: ``"classification"`` (softmax cross-entropy) or ``"gaussian"`` (noise scale
        ``sigma``).
      structure: ``"full"`` (the exact ``P×P`` matrix) or ``"diag"`` (its exact diagonal).
      select: the leaves of the Laplace approximation (default: the kernels).
      batch_size: examples per vectorised Jacobian (memory ``batch_size·C·P`` floats), or
        ``None``: all at once.

    Returns:
      A :class:`Curvature`.

    Raises:
      Jaxl2Error: for a bad argument, or a selection that matches nothing.
    """
    _check_ggn_args(apply_fn, likelihood, structure, sigma, batch_size)
    idx, paths, treedef, leaves = _chosen(params, select)
    theta, unravel = jax.flatten_util.ravel_pytree([leaves[i] for i in idx])

    def outputs(theta: jax.Array, xb: jax.Array) -> jax.Array:
        full = list(leaves)
        for i, leaf in zip(idx, unravel(theta)):
            full[i] = leaf
        out = apply_fn(jax.tree_util.tree_unflatten(treedef, full), xb)
        return out.reshape(xb.shape[0], -1)

    def batch(xb: jax.Array, yb: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = outputs(theta, xb)
        jac = jax.vmap(jax.jacrev(lambda t, xi: outputs(t, xi[None])[0]), in_axes=(None, 0))(theta, xb)
        h = _gauss_newton(jac, out, likelihood, sigma, structure == "full")
        return h, _log_likelihood(out, yb, likelihood, sigma)

    n = x.shape[0]
    size = n if batch_size is None else min(batch_size, n)
    whole, rest = divmod(n, size)
    xs = x[: whole * size].reshape(whole, size, *x.shape[1:])
    ys = y[: whole * size].reshape(whole, size, *y.shape[1:])

    def add(carry, b):
        h, ll = batch(*b)
        return (carry[0] + h, carry[1] + ll), None

    p = theta.size
    zero = jnp.zeros((p, p) if structure == "full" else (p,), theta.dtype)
    (h, ll), _ = jax.lax.scan(add, (zero, jnp.zeros((), theta.dtype)), (xs, ys))
    if rest:
        h_r, ll_r = batch(x[whole * size :], y[whole * size :])
        h, ll = h + h_r, ll + ll_r
    blocks = tuple(unravel(h)) if structure == "diag" else h
    return Curvature(ll, blocks, int(n), tuple(paths), structure)


def _check_curvature(curvature: Any, params: Any, select: _select.Selector) -> list[Any]:
    """The selected leaves, once ``curvature`` is known to be of them."""
    if not isinstance(curvature, Curvature):
        raise Jaxl2Error(f"curvature must be what jaxl2.ggn returns, got {type(curvature).__name__}")
    idx, paths, _, leaves = _chosen(params, select)
    if tuple(paths) != curvature.paths:
        raise Jaxl2Error(
            f"the curvature is of the leaves {', '.join(curvature.paths)}, but this selection picks "
            f"{', '.join(paths)}: pass the select= that jaxl2.ggn had"
        )
    chosen = [leaves[i] for i in idx]
    if curvature.structure == "kron":
        for path, w, pair in zip(paths, chosen, curvature.ggn):
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise Jaxl2Error(
                    f"a kron curvature holds a pair (A, G) per leaf; {path!r} has {type(pair).__name__}"
                )
            a, g = (np.shape(f) for f in pair)
            if len(a) != 2 or len(g) != 2 or a[0] != a[1] or g[0] != g[1] or a[0] * g[0] != w.size:
                raise Jaxl2Error(
                    f"the kron factors of {path!r} are {a} and {g}: they need to be square, with sizes "
                    f"whose product is the leaf's {w.size} entries (shape {tuple(w.shape)})"
                )
    return chosen


def _precisions(
    curvature: Curvature, params: Any, l2: Any, select: _select.Selector, stacked: Stacked, leaves: list[Any]
) -> list[jax.Array]:
    """``α = n·λ`` of every selected leaf (``leaves``, in the order of ``curvature.paths``),
    broadcast to its shape (per slice along a stacked leaf's layer axis)."""
    flat = jax.tree_util.tree_flatten_with_path(coefficients(params, l2, select=select, stacked=stacked))[0]
    lams = {_select.path_str(kp): lam for kp, lam in flat}
    for p in curvature.paths:
        if not is_traced(lams[p]) and not np.all(np.asarray(lams[p]) > 0):
            raise Jaxl2Error(
                f"the evidence needs λ > 0 on every selected leaf (a prior of precision 0 has no density), "
                f"but {p!r} has λ {lams[p]!r}; narrow select= (the leaves of jaxl2.ggn) or give it a λ"
            )
    return [
        curvature.n * jnp.broadcast_to(jnp.asarray(lams[p], w.dtype), w.shape)
        for p, w in zip(curvature.paths, leaves)
    ]


def _deviations(params: Any, center: Any, select: _select.Selector, leaves: list[Any]) -> list[jax.Array]:
    if center is None:
        return leaves
    w0 = check_center(params, center, select=select)
    return [w - w0[p] for w, p in zip(leaves, w0)]


def _units(params: Any, select: Any, stacked: Stacked) -> tuple[list[str], np.ndarray]:
    """The units' names (a leaf, or ``path[i]`` for each slice of a stacked leaf) and the unit of
    each entry of the selected leaves raveled (P,): 0 for the first selected path's first unit."""
    names, unit, start = [], [], 0
    for e in plan(params, None, select=select, stacked=stacked):
        shape = np.shape(e.leaf)
        if e.axis is None:
            unit.append(np.full(int(np.prod(shape)), start))
        else:
            index = np.arange(shape[e.axis]).reshape([-1 if i == e.axis else 1 for i in range(len(shape))])
            unit.append(start + np.broadcast_to(index, shape).ravel())
        names += list(e.units)
        start += len(e.units)
    return names, np.concatenate(unit).astype(np.int32)


def _parts(
    curvature: Curvature, params: Any, l2: Any, select: Any, center: Any, stacked: Stacked
) -> tuple[Any, Any, Any, list[str]]:
    """The flat ``α`` (P,) and ``w − w₀`` (P,), the unit of each entry (P,) and the units' names."""
    leaves = _check_curvature(curvature, params, select)
    names, unit = _units(params, select, stacked)
    if curvature.structure == "kron" and len(names) != len(curvature.paths):
        raise Jaxl2Error(
            "a kron curvature has one pair of factors per leaf, so one λ per leaf: it cannot take a "
            "stacked leaf's slices (use structure 'diag' or 'full' for λ per slice)"
        )
    alpha = jnp.concatenate([a.ravel() for a in _precisions(curvature, params, l2, select, stacked, leaves)])
    dw = jnp.concatenate([d.ravel() for d in _deviations(params, center, select, leaves)])
    return alpha, dw, jnp.asarray(unit), names


def _occam(curvature: Curvature, alpha: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``log det(H + A)`` and the diagonal of ``(H + A)⁻¹`` (``"kron"``: the diagonal in the
    factors' eigenbasis, which has the same sum per leaf, all that MacKay's ``γ`` reads)."""
    if curvature.structure == "kron":  # eigenvalues of A ⊗ G + αI: a_j·g_k + α, α one per leaf
        logdet, inverses, start = jnp.zeros((), alpha.dtype), [], 0
        for a, g in curvature.ggn:
            s = jnp.outer(jnp.linalg.eigvalsh(a), jnp.linalg.eigvalsh(g)).ravel()
            post = jnp.maximum(s, 0) + alpha[start]  # round-off can leave eigenvalues just below 0
            logdet, start = logdet + jnp.sum(jnp.log(post)), start + s.size
            inverses.append(1 / post)
        return logdet, jnp.concatenate(inverses)
    if curvature.structure == "full":
        chol = jnp.linalg.cholesky(curvature.ggn + jnp.diag(alpha))
        inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(alpha.size, dtype=alpha.dtype))
        return 2 * jnp.sum(jnp.log(jnp.diagonal(chol))), jnp.diagonal(inv)
    post = jnp.concatenate([h.ravel() for h in curvature.ggn]) + alpha
    return jnp.sum(jnp.log(post)), 1 / post


def log_evidence(
    curvature: Curvature,
    params: Any,
    l2: Any,
    *,
    select: _select.Selector = None,
    center: Any = None,
    stacked: Stacked = None,
) -> jax.Array:
    """The Laplace log evidence ``log p(D|w) − ½·Σ α_l‖w_l − w₀_l‖² + ½·log det A − ½·log det(H + A)``
    with ``α = n·λ`` (the module's docstring states it in full).

    Args:
      curvature: :func:`ggn` at ``params``, with the same ``select``.
      params: the params (a mode of the regularized loss, for the approximation to hold).
      l2: the λs, as in :func:`jaxl2.l2_penalty` (a number, ``{regex: λ}`` rules, traced values:
        the result is differentiable in them); every selected leaf needs ``λ > 0``.
      select: the leaves, as :func:`ggn` had them.
      center: ``w₀`` (default zero), as in :func:`jaxl2.l2_penalty`.
      stacked: ``{regex: axis}``, as in :func:`jaxl2.l2_penalty`: a λ per slice of a stacked leaf
        (its prior precision per slice; ``"diag"`` and ``"full"`` only).

    Returns:
      A scalar (nats).
    """
    alpha, dw, _, _ = _parts(curvature, params, l2, select, center, stacked)
    logdet, _ = _occam(curvature, alpha)
    return (
        curvature.log_likelihood
        - 0.5 * jnp.sum(alpha * dw * dw)
        + 0.5 * jnp.sum(jnp.log(alpha))
        - 0.5 * logdet
    )


def evidence_l2(
    curvature: Curvature,
    params: Any,
    l2: Any,
    *,
    select: _select.Selector = None,
    center: Any = None,
    stacked: Stacked = None,
    method: str = "mackay",
    steps: int = 1,
    lr: float = 0.1,
    bounds: tuple[float, float] = (1e-8, 1e4),
) -> dict[str, jax.Array]:
    """One λ per selected leaf that raises :func:`log_evidence`, from the λs ``l2``, at fixed
    params and curvature; ``{re.escape(path): λ}`` rules that ``l2=`` of every jaxl2 function takes.
    With ``stacked`` (as in :func:`jaxl2.l2_penalty`), one λ per slice of a stacked leaf:
    ``{re.escape("path[i]"): λ}`` (pass the same ``stacked=`` wherever the rules go).

    ``method="mackay"``: ``steps`` iterations of ``α_l ← γ_l / ‖w_l − w₀_l‖²`` with
    ``γ_l = Σ_{p∈l} (1 − α_l·[(H + A)⁻¹]_pp)``, whose fixed point is where the evidence's
    derivative in ``α_l`` vanishes. ``method="adam"``: ``steps`` steps of Adam (learning rate
    ``lr``) on ``log λ`` up the evidence's gradient. The λs are clipped to ``bounds``.

    In a training loop: train a few epochs at the current λs, then ``ggn`` and
    ``evidence_l2`` at the params reached, and go on with the λs it returns.
    """
    if method not in METHODS:
        raise Jaxl2Error(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise Jaxl2Error(f"steps must be an integer >= 1, got {steps!r}")
    lo, hi = bounds
    alpha, dw, seg, names = _parts(curvature, params, l2, select, center, stacked)
    layers = len(names)
    per_layer = jax.ops.segment_max(alpha, seg, layers) / curvature.n
    log_lam = jnp.log(jnp.clip(per_layer, lo, hi))
    escaped = [re.escape(p) for p in names]

    def rules(log_lam: jax.Array) -> dict[str, jax.Array]:
        return {e: jnp.exp(log_lam[i]) for i, e in enumerate(escaped)}

    if method == "mackay":
        sq = jax.ops.segment_sum(dw * dw, seg, layers)
        sizes = jax.ops.segment_sum(jnp.ones_like(dw), seg, layers)

        def fixed_point(log_lam: jax.Array, _: Any) -> tuple[jax.Array, None]:
            a = curvature.n * jnp.exp(log_lam)
            _, inv = _occam(curvature, a[seg])
            gamma = sizes - a * jax.ops.segment_sum(inv, seg, layers)
            new = gamma / jnp.maximum(sq, jnp.finfo(sq.dtype).tiny) / curvature.n
            return jnp.log(jnp.clip(new, lo, hi)), None

        log_lam, _ = jax.lax.scan(fixed_point, log_lam, None, length=steps)
    else:
        tx = optax.adam(lr)

        def ascend(carry: tuple, _: Any) -> tuple[tuple, None]:
            log_lam, state = carry
            g = jax.grad(
                lambda ll: log_evidence(
                    curvature, params, rules(ll), select=select, center=center, stacked=stacked
                )
            )(log_lam)
            upd, state = tx.update(-g, state)
            return (jnp.clip(log_lam + upd, math.log(lo), math.log(hi)), state), None

        (log_lam, _), _ = jax.lax.scan(ascend, (log_lam, tx.init(log_lam)), None, length=steps)
    return rules(log_lam)
