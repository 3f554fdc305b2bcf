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
small models; ``"diag"``: its exact diagonal; ``"kron"``: K-FAC's factors per leaf, ``"ekfac"``:
EK-FAC's values, of the leaves that enter the model through dense products, which
:mod:`jaxl2.kfac` finds); :func:`ggn_lanczos` estimates what one λ shared by all the leaves needs
of the whole ``H`` by stochastic Lanczos quadrature.
:func:`log_evidence` is then cheap and differentiable in ``λ``; :func:`evidence_l2` returns the
λs that maximise it, one per leaf or one shared (``shared=True``), by MacKay's fixed point (1992)
``α_l = γ_l / ‖w_l − w₀_l‖²``, ``γ_l = P_l − α_l·tr_l (H + A)⁻¹`` (the effective number of
parameters of layer ``l``), by bisection of the root of ``γ_l − α_l·‖w_l − w₀_l‖²``, or by Adam
on ``log λ`` (Immer et al., ICML 2021: a few steps every few epochs). Every function is pure and
jittable.

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
from jaxl2.errors import Jaxl2Error, check_number, describe
from jaxl2.kfac import arrays_of, dense_curvature
from jaxl2.penalty import check_order
from jaxl2.rules import Stacked, check_bool, has_schedule, is_traced, plan

__all__ = ["Curvature", "ggn", "ggn_lanczos", "log_evidence", "evidence_l2", "LIKELIHOODS", "STRUCTURES"]

LIKELIHOODS = ("classification", "gaussian")
STRUCTURES = ("full", "diag", "kron", "ekfac", "lanczos")
METHODS = ("mackay", "bisect", "adam")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["log_likelihood", "ggn"],
    meta_fields=["n", "paths", "structure"],
)
@dataclasses.dataclass(frozen=True)
class Curvature:
    """What :func:`ggn` measured at one set of params: ``log p(D | w)``, the GGN ``H`` of the
    summed negative log-likelihood over the selected leaves, ``n`` (the examples) and the selected
    ``paths``. A pytree: it passes through ``jit``. ``ggn`` holds, by ``structure``:

    * ``"full"``: a ``(P, P)`` matrix in the order of ``paths``, each leaf raveled;
    * ``"diag"``: a tuple of arrays, one per path, of the leaves' shapes;
    * ``"kron"``: a tuple of pairs ``(A, G)``, one per path, K-FAC's factors: the leaf's block
      ``H_l ≈ A ⊗ G`` with ``A`` over the kernel's input (contracted) entries and ``G`` over its
      output entries (:mod:`jaxl2.kfac` states them), i.e. on the leaf raveled row-major when its
      input dims lead (Linen, NNX, Haiku ``(in, out)``), on its transpose for Equinox's
      ``(out, in)``; a bias has ``A = [[1]]``. A leaf stacked for a ``scan`` has a pair per slice,
      ``A (L, I, I)`` and ``G (L, O, O)``, and takes a λ per slice (``stacked=``);
    * ``"ekfac"``: a tuple of arrays, one per path, with as many entries as the leaf: the diagonal
      ``s`` of the block in an orthonormal basis ``Q`` of the leaf, ``H_l ≈ Q·diag(s)·Qᵀ``:
      EK-FAC's values, ``Q`` the eigenvectors of K-FAC's factors, ``s_jk = Σ_i (u_jᵀa_i)²·(v_kᵀG_iv_k)``
      (George et al., NeurIPS 2018), the best diagonal in that basis. In the leaf's shape (what
      :func:`ggn` gives), each slice of a stacked leaf holds its own slice's values, and a λ per
      slice may be given; a flat array is one basis for the whole leaf;
    * ``"lanczos"``: a pair ``(nodes, weights)`` of ``(probes, steps)`` arrays, the Gauss
      quadrature of the whole ``H`` that :func:`ggn_lanczos` estimates, for one λ shared by all
      the selected leaves.

    The evidence of ``"kron"`` and ``"ekfac"`` needs one λ per basis, a leaf or a slice (only then
    is the prior precision ``αI`` diagonal in the basis ``Q``)."""

    log_likelihood: jax.Array
    ggn: Any
    n: int
    paths: tuple[str, ...]
    structure: str


def _flat_outputs(
    apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, select: _select.Selector
) -> tuple[list[str], jax.Array, Callable[[jax.Array], Any], Callable[[jax.Array, jax.Array], jax.Array]]:
    """The selected paths, their leaves raveled ``θ`` (P,), ``unravel`` and ``outputs(θ, x)``:
    ``apply_fn`` at ``params`` with the selected leaves taken from ``θ``, as ``(len(x), -1)``."""
    chosen = _select.resolve(params, select)
    theta, unravel = jax.flatten_util.ravel_pytree([w for _, w in chosen])

    def outputs(theta: jax.Array, xb: jax.Array) -> jax.Array:
        new = dict(zip([p for p, _ in chosen], unravel(theta)))
        swapped = jax.tree_util.tree_map_with_path(lambda kp, w: new.get(_select.path_str(kp), w), params)
        return apply_fn(swapped, xb).reshape(xb.shape[0], -1)

    return [p for p, _ in chosen], theta, unravel, outputs


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


def _check_ggn_args(
    apply_fn: Any, params: Any, x: Any, y: Any, likelihood: Any, structure: Any, sigma: Any, batch_size: Any
) -> None:
    """Refuses a bad argument of :func:`ggn`, and labels the likelihood cannot read: classification
    needs integer class indices ``(n,)`` in ``[0, C)`` (the range checked only where ``y`` is
    concrete, not traced); a Gaussian needs targets of the outputs' shape (a trailing axis of 1
    may be left out or added)."""
    if not callable(apply_fn):
        raise Jaxl2Error(f"apply_fn must be a function apply_fn(params, x), got {type(apply_fn).__name__}")
    if likelihood not in LIKELIHOODS:
        raise Jaxl2Error(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
    if structure == "lanczos":
        raise Jaxl2Error("structure 'lanczos' is jaxl2.ggn_lanczos's: call it instead of jaxl2.ggn")
    if structure not in STRUCTURES:
        raise Jaxl2Error(
            "structure must be one of full (the exact GGN, P×P), diag (its exact diagonal), kron (K-FAC) "
            f"or ekfac (EK-FAC), got {structure!r}"
        )
    check_number(sigma, "sigma (the Gaussian noise scale)", above=True)
    if batch_size is not None:
        check_number(batch_size, "batch_size", integer=True, low=1)
    arrays, rebuild = arrays_of(params)
    out = jax.eval_shape(lambda ws, xb: apply_fn(rebuild(ws), xb), arrays, x).shape
    n, shape = int(np.shape(x)[0]), tuple(np.shape(y))
    if likelihood == "classification":
        classes = int(np.prod(out[1:]))
        need = f"integer class indices in [0, {classes}) of shape ({n},)"
        if shape != (n,) or not jnp.issubdtype(jnp.result_type(y), jnp.integer):
            hint = " (one-hot labels? give y.argmax(-1))" if shape == out else ""
            raise Jaxl2Error(f"with likelihood 'classification', y must be {need}, got {describe(y)}{hint}")
        labels = None if is_traced(y) or not n else np.asarray(y)  # concrete: the range is known
        if labels is not None and not 0 <= labels.min() <= labels.max() < classes:
            raise Jaxl2Error(
                f"with likelihood 'classification', y must be {need}, but it holds labels from "
                f"{labels.min()} to {labels.max()} for the {classes} outputs of apply_fn"
            )
    elif not (shape[:1] == (n,) and math.prod(shape[1:]) == math.prod(out[1:])):
        raise Jaxl2Error(
            f"with likelihood 'gaussian', y must be targets of the outputs' shape {out}, got {describe(y)}"
        )


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
      y: their labels: integer class indices ``(n,)`` in ``[0, C)`` for classification (their
        range is checked where ``y`` is concrete; under ``jit``, where it is traced, a label
        out of range gives a NaN log-likelihood), targets of the outputs' shape for a Gaussian.
      likelihood: ``"classification"`` (softmax cross-entropy) or ``"gaussian"`` (noise scale
        ``sigma``).
      structure: ``"full"`` (the exact ``P×P`` matrix), ``"diag"`` (its exact diagonal),
        ``"kron"`` (K-FAC's factors) or ``"ekfac"`` (EK-FAC's values), as :class:`Curvature`
        holds them. ``"kron"`` and ``"ekfac"`` need every selected leaf to enter ``apply_fn``
        through one dense product (a kernel) or an added bias, one per slice of a leaf stacked
        for a ``scan`` (:mod:`jaxl2.kfac`). ``"diag"`` is computed that way too where every
        selected leaf does so with one row per example (a few gradients' cost), else by
        per-example Jacobians (one backward pass per output and example).
      select: the leaves of the Laplace approximation (default: the kernels).
      batch_size: examples per chunk (per-example Jacobians: memory ``batch_size·C·P`` floats;
        K-FAC: ``batch_size·C`` times the layers' outputs), or ``None``: all at once.

    Returns:
      A :class:`Curvature`.

    Raises:
      Jaxl2Error: for a bad argument, labels the likelihood cannot read (as ``y`` says), a
        selection that matches nothing, or (``"kron"``, ``"ekfac"``) a selected leaf that does
        not enter through a dense product, named.
    """
    _check_ggn_args(apply_fn, params, x, y, likelihood, structure, sigma, batch_size)
    if structure != "full":
        try:
            blocks, out = dense_curvature(
                apply_fn,
                params,
                x,
                select,
                likelihood=likelihood,
                sigma=sigma,
                structure=structure,
                batch_size=batch_size,
            )
            chosen = tuple(p for p, _ in _select.resolve(params, select))
            return Curvature(
                _log_likelihood(out, y, likelihood, sigma), blocks, int(x.shape[0]), chosen, structure
            )
        except Jaxl2Error:
            if structure != "diag":  # the per-example Jacobians below give the exact diagonal of any model
                raise
    paths, theta, unravel, outputs = _flat_outputs(apply_fn, params, select)

    def batch(xb: jax.Array, yb: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = outputs(theta, xb)
        jac = jax.vmap(jax.jacrev(lambda t, xi: outputs(t, xi[None])[0]), in_axes=(None, 0))(theta, xb)
        h = _gauss_newton(jac, out, likelihood, sigma, structure == "full")
        return h, _log_likelihood(out, yb, likelihood, sigma)

    n = x.shape[0]
    size = n if batch_size is None else min(batch_size, n)
    whole, rest = divmod(n, size)
    xs, ys = (a[: whole * size].reshape(whole, size, *a.shape[1:]) for a in (x, y))

    def add(total: Any, b: tuple) -> tuple[Any, None]:
        return jax.tree.map(jnp.add, total, batch(*b)), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(batch, xs[0], ys[0]))
    (h, ll), _ = jax.lax.scan(add, zeros, (xs, ys))
    if rest:
        (h, ll), _ = add((h, ll), (x[whole * size :], y[whole * size :]))
    blocks = tuple(unravel(h)) if structure == "diag" else h
    return Curvature(ll, blocks, int(n), tuple(paths), structure)


def _lanczos(
    product: Callable[[jax.Array], jax.Array], z: jax.Array, steps: int
) -> tuple[jax.Array, jax.Array]:
    """``steps`` steps of Lanczos on ``product`` from ``z`` (full reorthogonalisation): the Ritz
    values ``θ_j`` and the squared first components ``τ_j²`` of the tridiagonal's eigenvectors, so
    that ``zᵀf(H)z ≈ ‖z‖²·Σ_j τ_j²·f(θ_j)``. After a breakdown (a Krylov space invariant under
    ``H``) the rest of the basis is zero, and its nodes carry no weight."""
    basis = jnp.zeros((steps, z.size), z.dtype).at[0].set(z / jnp.linalg.norm(z))

    def step(basis: jax.Array, j: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        q = basis[j]
        w = product(q)
        a = jnp.vdot(w, q)
        for _ in range(2):  # twice is enough
            w = w - basis.T @ (basis @ w)
        b = jnp.linalg.norm(w)
        ok = b > 1e-6 * jnp.abs(a) + jnp.finfo(z.dtype).tiny
        basis = basis.at[j + 1].set(jnp.where(ok, w / jnp.where(ok, b, 1), 0), mode="drop")
        return basis, (a, jnp.where(ok, b, 0))

    _, (alphas, betas) = jax.lax.scan(step, basis, jnp.arange(steps))
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    nodes, vectors = jnp.linalg.eigh(tri)
    return jnp.maximum(nodes, 0), vectors[0] ** 2


def ggn_lanczos(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    probes: int = 4,
    steps: int = 40,
    likelihood: str = "classification",
    sigma: float = 1.0,
    select: _select.Selector = None,
) -> Curvature:
    """The whole GGN ``H`` over the selected leaves, as far as one λ shared by all of them needs
    it, by stochastic Lanczos quadrature; and ``log p(D | w)``, at ``params`` on ``(x, y)``.

    With one ``α`` for all ``P`` selected weights, the evidence reads ``H`` only through
    ``log det(I + H/α) = tr log(I + H/α)`` and ``γ = tr(H(H + αI)⁻¹)``: traces of functions of
    ``H``. Each is estimated as the mean over ``probes`` Rademacher vectors ``z`` of ``zᵀf(H)z``
    (Hutchinson), each of those by ``steps`` steps of Lanczos from ``z`` and Gauss quadrature
    (Ubaru, Chen and Saad, SIAM J. Matrix Anal. Appl. 2017). Only products ``H·v`` are formed
    (the outputs' linearization in the selected leaves, ``Λ``, then its transpose), so the
    cost is ``probes·steps`` forward and backward passes over ``x`` and memory of one pass over all
    of ``x`` (pass a subsample for a large model), with no block-diagonal or Kronecker
    approximation: where ``"kron"`` and ``"diag"`` keep a block per leaf, this keeps the
    couplings between layers. The result is an estimate: its spread over probes shrinks as
    ``1/√probes``; ``steps`` sets the quadrature's accuracy (enough when ``f`` is smooth on
    ``H``'s spectrum at the scale of ``α``).

    Args:
      apply_fn: ``apply_fn(params, x)`` → the outputs of all of ``x``, as in :func:`ggn`.
      params: the params, as in :func:`jaxl2.l2_penalty`.
      x: all the inputs the evidence is of (``n = len(x)``), in one pass.
      y: their labels or targets, as in :func:`ggn`.
      key: a ``jax.random`` key for the probes.
      probes: Rademacher vectors (the estimate's spread falls as ``1/√probes``).
      steps: Lanczos steps per probe (at most ``P``).
      likelihood: ``"classification"`` or ``"gaussian"``, as in :func:`ggn`.
      sigma: the Gaussian noise scale.
      select: the leaves of the Laplace approximation (default: the kernels).

    Returns:
      A :class:`Curvature` of structure ``"lanczos"``: :func:`log_evidence` and :func:`evidence_l2`
      take it with one λ for all the selected leaves (``evidence_l2(..., shared=True)``).

    Raises:
      Jaxl2Error: for a bad argument, labels the likelihood cannot read (as in :func:`ggn`), or
        a selection that matches nothing.
    """
    _check_ggn_args(apply_fn, params, x, y, likelihood, "full", sigma, None)
    check_number(probes, "probes", integer=True, low=1)
    check_number(steps, "steps", integer=True, low=1)
    paths, theta, _, outputs = _flat_outputs(apply_fn, params, select)
    steps = min(steps, theta.size)
    out, jvp = jax.linearize(lambda t: outputs(t, x), theta)
    vjp = jax.linear_transpose(jvp, theta)  # Jᵀ from the same residuals: one forward pass
    p = jax.nn.softmax(out, axis=-1) if likelihood == "classification" else None

    def product(v: jax.Array) -> jax.Array:  # Σ_i J_iᵀ Λ_i J_i v
        u = jvp(v)
        lam_u = p * u - p * jnp.sum(p * u, axis=-1, keepdims=True) if p is not None else u / sigma**2
        return vjp(lam_u)[0]

    zs = jax.random.rademacher(key, (probes, theta.size), theta.dtype)
    nodes, weights = jax.lax.map(lambda z: _lanczos(product, z, steps), zs)
    return Curvature(
        _log_likelihood(out, y, likelihood, sigma), (nodes, weights), int(x.shape[0]), tuple(paths), "lanczos"
    )


def _check_blocks(curvature: Curvature, entries: list[Any]) -> None:
    """Refuses ``"diag"``/``"ekfac"`` blocks and ``"kron"`` factors that do not fit their leaves, and
    a λ per slice of a leaf whose ``"kron"``/``"ekfac"`` basis is not per slice (factors without a
    leading axis of slices, EK-FAC values not in the leaf's shape)."""
    for e, block in zip(entries, curvature.ggn if curvature.structure in ("diag", "ekfac", "kron") else ()):
        if curvature.structure != "kron":
            if np.size(block) != e.leaf.size:
                raise Jaxl2Error(
                    f"a {curvature.structure} curvature holds one value per entry of each leaf; {e.path!r} "
                    f"has {np.size(block)} for its {e.leaf.size} entries (shape {tuple(e.leaf.shape)})"
                )
            per_slice = np.shape(block) == np.shape(e.leaf)
        elif not (isinstance(block, tuple | list) and len(block) == 2):
            raise Jaxl2Error(
                f"a kron curvature holds a pair (A, G) per leaf; {e.path!r} has {type(block).__name__}"
            )
        else:
            a, g = (np.shape(f) for f in block)
            slices = a[0] if len(a) == 3 else 1
            if (
                len(a) != len(g)
                or len(a) not in (2, 3)
                or a[:-2] != g[:-2]
                or a[-1] != a[-2]
                or g[-1] != g[-2]
                or slices * a[-1] * g[-1] != e.leaf.size
            ):
                raise Jaxl2Error(
                    f"the kron factors of {e.path!r} are {a} and {g}: they need to be square (with a "
                    "leading axis of slices or none), with sizes whose product is the leaf's "
                    f"{e.leaf.size} entries (shape {tuple(e.leaf.shape)})"
                )
            per_slice = slices == len(e.units)
        if curvature.structure != "diag" and len(e.units) > 1 and not per_slice:
            raise Jaxl2Error(
                f"a {curvature.structure} curvature has one basis per leaf, so one λ per leaf: it cannot "
                f"take the slices of {e.path!r} (jaxl2.ggn gives a leaf stacked in a scan a basis per "
                "slice; else use structure 'diag' or 'full' for λ per slice)"
            )


def _parts(
    fn: str, curvature: Curvature, params: Any, l2: Any, select: Any, center: Any, stacked: Stacked
) -> tuple[Any, Any, Any, list[str]]:
    """From the plan: the flat ``α = n·λ`` (P,) and ``w − w₀`` (P,) of the selected leaves raveled in
    the order of ``curvature.paths``, the unit of each entry (P,: 0 for the first leaf's first unit,
    a stacked leaf's slices each their own) and the units' names."""
    check_order(params, l2, fn)
    if has_schedule(l2):
        raise Jaxl2Error(
            f"l2 holds a schedule (a function of the step count), and {fn} takes the λs of one set of "
            "params: read the schedule at the step those params were trained to, l2=schedule(step) "
            "(in a mapping, each schedule)"
        )
    if not isinstance(curvature, Curvature):
        raise Jaxl2Error(f"curvature must be what jaxl2.ggn returns, got {type(curvature).__name__}")
    paths = tuple(p for p, _ in _select.resolve(params, select))
    if paths != curvature.paths:
        raise Jaxl2Error(
            f"the curvature is of the leaves {', '.join(curvature.paths)}, but this selection picks "
            f"{', '.join(paths)}: pass the select= that jaxl2.ggn had"
        )
    entries = plan(params, l2, select=select, stacked=stacked, center=center)
    _check_blocks(curvature, entries)
    names = [n for e in entries for n in e.units]
    alpha, dw, unit, first = [], [], [], 0  # first: the number of the leaf's first unit
    for e in entries:
        w, lam = e.leaf, e.lam(None, jnp.promote_types(e.leaf.dtype, jnp.float32))
        if not is_traced(lam) and not np.all(np.asarray(lam) > 0):
            raise Jaxl2Error(
                f"the evidence needs λ > 0 on every selected leaf (a prior of precision 0 has no density), "
                f"but {e.path!r} has λ {lam!r}; narrow select= (the leaves of jaxl2.ggn) or give it a λ"
            )
        alpha.append(curvature.n * jnp.broadcast_to(jnp.asarray(lam, w.dtype), w.shape).ravel())
        dw.append((w if e.center is None else w - e.center).ravel())
        layer = np.arange(len(e.units)).reshape([-1 if i == e.axis else 1 for i in range(w.ndim)])
        unit.append(first + np.broadcast_to(layer, w.shape).ravel())
        first += len(e.units)
    return jnp.concatenate(alpha), jnp.concatenate(dw), np.concatenate(unit).astype(np.int32), names


def _unit_sums(values: jax.Array, unit: np.ndarray, units: int) -> jax.Array:
    """``Σ values`` per unit (``unit``: each entry's, static), one reduction of its own entries
    each: XLA's scatter-add (``segment_sum``) adds in sequence, and over a layer's 10⁵ entries in
    float32 that loses the γ that ``P − α·Σ(H + A)⁻¹`` leaves."""
    order = np.argsort(unit, kind="stable")
    ordered = values if np.array_equal(order, np.arange(unit.size)) else values[order]
    ends = np.cumsum(np.bincount(unit, minlength=units))
    return jnp.stack([jnp.sum(ordered[a:b]) for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)])


_ONE_LAMBDA = (
    "a lanczos curvature estimates traces of functions of the whole H, which need one λ for all the "
    "selected leaves ({})"
)


def _spectrum(curvature: Curvature, unit: np.ndarray) -> jax.Array | None:
    """The values ``h`` (P,) with ``log det(H + A) = Σ log(h + α)`` for a diagonal ``A`` of one
    ``α`` per unit (``unit``: each entry's, :func:`_parts`'s): the diagonal (``"diag"``), EK-FAC's
    ``s`` (``"ekfac"``), the products of the factors' eigenvalues ``a_j·g_k`` (``"kron"``; factors
    per slice put each slice's products at that slice's entries, in some order: the evidence
    reads them per unit only); ``None`` for ``"full"`` and ``"lanczos"``."""
    if curvature.structure in ("full", "lanczos"):
        return None
    blocks = curvature.ggn
    if curvature.structure == "kron":
        blocks, first = [], 0
        for a, g in curvature.ggn:
            values = (jnp.linalg.eigvalsh(a)[..., :, None] * jnp.linalg.eigvalsh(g)[..., None, :]).ravel()
            mine = unit[first : first + values.size]
            blocks.append(values[np.argsort(np.argsort(mine, kind="stable"))])  # slice k where unit k
            first += values.size
    # round-off can leave a Gram matrix's eigenvalues just below 0
    return jnp.maximum(jnp.concatenate([jnp.ravel(b) for b in blocks]), 0)


def _occam(curvature: Curvature, alpha: jax.Array, h: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``log det(H + A) − log det A`` and, per entry, ``1 − α·[(H + A)⁻¹]_pp`` (the entry's share of
    ``γ``; ``"kron"`` and ``"ekfac"``: in the leaf's basis, which has the same sum per leaf, all
    that MacKay's ``γ`` reads), both without the cancellation of ``P`` against ``α·Σ(H + A)⁻¹``:
    ``Σ log(1 + h/α)`` and ``h/(h + α)`` (``h``: :func:`_spectrum`'s), or for ``"full"`` from the
    Cholesky factor of ``M = I + A^(−½)·H·A^(−½)`` and ``[M⁻¹(M − I)]_pp``. ``"lanczos"``: the
    quadrature of both for the one ``α`` of all entries; the second is then ``γ`` itself, a
    scalar."""
    if curvature.structure == "lanczos":
        nodes, weights = curvature.ggn
        a, size = alpha[0], alpha.size
        occam = size * jnp.mean(jnp.sum(weights * jnp.log1p(nodes / a), axis=-1))
        return occam, size * jnp.mean(jnp.sum(weights * nodes / (nodes + a), axis=-1))
    if h is None:
        root = 1 / jnp.sqrt(alpha)
        scaled = curvature.ggn * root[:, None] * root[None, :]  # M − I
        eye = jnp.eye(alpha.size, dtype=alpha.dtype)
        chol = jnp.linalg.cholesky(scaled + eye)
        inv = jax.scipy.linalg.cho_solve((chol, True), eye)
        # 1 − [M⁻¹]_pp = [M⁻¹(M − I)]_pp, summed from products rather than cancelled
        return 2 * jnp.sum(jnp.log(jnp.diagonal(chol))), jnp.sum(inv * scaled, axis=0)
    return jnp.sum(jnp.log1p(h / alpha)), h / (h + alpha)


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
        (its prior precision per slice; ``"kron"`` and ``"ekfac"`` where
        their basis is per slice, as :func:`ggn` gives a leaf stacked in a scan).

    Returns:
      A scalar (nats). A ``"lanczos"`` curvature needs one λ for all the selected leaves: λs that
      differ are an error, or under ``jit`` (where they are traced) a NaN.
    """
    alpha, dw, unit, names = _parts("log_evidence", curvature, params, l2, select, center, stacked)
    value = _evidence(curvature, alpha, dw, _spectrum(curvature, unit))
    if curvature.structure != "lanczos":
        return value
    if not is_traced(alpha) and not np.all(np.asarray(alpha) == alpha[0]):
        raise Jaxl2Error(_ONE_LAMBDA.format(", ".join(names)) + ": give l2 one number")
    return jnp.where(jnp.all(alpha == alpha[0]), value, jnp.nan)  # traced λs that differ: NaN


def _evidence(curvature: Curvature, alpha: jax.Array, dw: jax.Array, h: jax.Array | None) -> jax.Array:
    occam, _ = _occam(curvature, alpha, h)  # ½·log det A − ½·log det(H + A) = −½·occam
    return curvature.log_likelihood - 0.5 * jnp.sum(alpha * dw * dw) - 0.5 * occam


def adam_ascent(
    evidence: Callable[[Any], jax.Array],
    log_lam: Any,
    tx: optax.GradientTransformation,
    state: Any,
    steps: int,
    bounds: tuple[float, float],
    tie: Callable[[Any], Any] = lambda g: g,
) -> tuple[Any, Any]:
    """``steps`` of ``tx`` (Adam) up ``evidence(ln λ)`` from ``log_lam`` (any pytree) and the
    optimizer's ``state``, ``ln λ`` clipped to ``ln bounds``; ``tie`` maps the gradient first
    (one λ shared by several entries: their gradients summed). Returns ``(log_lam, state)``."""
    lo, hi = math.log(bounds[0]), math.log(bounds[1])

    def one(carry: tuple, _: Any) -> tuple[tuple, None]:
        log_lam, state = carry
        g = tie(jax.grad(evidence)(log_lam))
        step, state = tx.update(jax.tree.map(jnp.negative, g), state)
        return (jax.tree.map(lambda v, d: jnp.clip(v + d, lo, hi), log_lam, step), state), None

    return jax.lax.scan(one, (log_lam, state), None, length=steps)[0]


def evidence_l2(
    curvature: Curvature,
    params: Any,
    l2: Any,
    *,
    select: _select.Selector = None,
    center: Any = None,
    stacked: Stacked = None,
    shared: bool = False,
    method: str = "mackay",
    steps: int | None = None,
    lr: float = 0.1,
    bounds: tuple[float, float] = (1e-8, 1e4),
) -> dict[str, jax.Array]:
    """One λ per selected leaf that raises :func:`log_evidence`, from the λs ``l2``, at fixed
    params and curvature; ``{re.escape(path): λ}`` rules that ``l2=`` of every jaxl2 function takes.
    With ``stacked`` (as in :func:`jaxl2.l2_penalty`), one λ per slice of a stacked leaf:
    ``{re.escape("path[i]"): λ}`` (pass the same ``stacked=`` wherever the rules go). With
    ``shared=True``, one λ for all of them (a rule each, all equal), starting from the geometric
    mean of ``l2``'s: the λ to choose where only a joint scale is identified, as in a ReLU network
    whose biases are not penalised (scaling one layer by ``c`` and the next by ``1/c`` leaves the
    function unchanged, and the regularized optimum depends on the layers' λs through their
    product only).

    With ``γ_l = Σ_{p∈l} (1 − α_l·[(H + A)⁻¹]_pp)`` (layer ``l``'s effective number of
    parameters), the evidence's derivative in ``ln α_l`` is ``½·(γ_l − α_l·‖w_l − w₀_l‖²)``
    (sums over the layers that share ``α``):

    * ``method="mackay"``: ``steps`` iterations of MacKay's ``α_l ← γ_l / ‖w_l − w₀_l‖²``, whose
      fixed point is where that derivative vanishes;
    * ``method="bisect"``: ``steps`` halvings, in ``ln λ``, of ``bounds`` around the root of that
      derivative, which decreases in ``α_l`` where each ``α_l`` has its own block of ``H`` (``"diag"``,
      ``"kron"``, ``"ekfac"``, or one shared λ): the evidence is then concave in ``ln α_l`` and the
      root its maximum. ``k`` halvings leave λ within a factor ``(hi/lo)^(2⁻ᵏ)``, down to the
      resolution of ``ln λ`` in its dtype (float32: about 1e-6, reached in about 25 halvings of
      1e-8..1). The starting λs in ``l2`` do not matter. It cannot overshoot, where MacKay's
      iteration oscillates around the root (by orders of magnitude, far from a mode);
    * ``method="adam"``: ``steps`` steps of Adam (learning rate ``lr``) on ``ln λ`` up the
      evidence's gradient.

    ``steps`` defaults to 1 for ``"mackay"`` and ``"adam"`` (an update from the current λs, for a
    training loop) and 40 for ``"bisect"``. The λs are clipped to ``bounds``. In a training loop: train a few epochs at the current λs,
    then ``ggn`` and ``evidence_l2`` at the params reached, and go on with the λs it returns.
    """
    if method not in METHODS:
        raise Jaxl2Error(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if steps is None:
        steps = 40 if method == "bisect" else 1
    check_number(steps, "steps", integer=True, low=1)
    check_bool(shared, "shared")
    lo, hi = bounds
    alpha, dw, unit, names = _parts("evidence_l2", curvature, params, l2, select, center, stacked)
    log_lam = jnp.log(
        jnp.clip(jax.ops.segment_max(alpha, jnp.asarray(unit), len(names)) / curvature.n, lo, hi)
    )
    if shared:  # every unit in group 0
        group, log_lam = jnp.zeros(len(names), jnp.int32), jnp.mean(log_lam, keepdims=True)
    else:
        group = jnp.arange(len(names))
    groups, seg, h = log_lam.size, group[jnp.asarray(unit)], _spectrum(curvature, unit)
    if curvature.structure == "lanczos" and groups > 1:
        raise Jaxl2Error(_ONE_LAMBDA.format(", ".join(names)) + ": give shared=True")
    if method == "bisect" and h is None and groups > 1:
        raise Jaxl2Error(
            "method 'bisect' needs an evidence that separates into one problem per λ: a full "
            "curvature couples the leaves' λs, so give shared=True, or use method 'mackay' or 'adam'"
        )

    def group_sums(values: jax.Array) -> jax.Array:
        return jax.ops.segment_sum(_unit_sums(values, unit, len(names)), group, groups)

    sq = group_sums(dw * dw)

    def slope(log_lam: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(γ, α·‖w − w₀‖²)`` per group; the evidence rises in ``ln α`` where ``γ`` is larger."""
        a = curvature.n * jnp.exp(log_lam)
        _, shares = _occam(curvature, a[seg], h)
        gamma = shares[None] if curvature.structure == "lanczos" else group_sums(shares)
        return gamma, a * sq

    if method == "mackay":

        def fixed_point(log_lam: jax.Array, _: Any) -> tuple[jax.Array, None]:
            gamma, _ = slope(log_lam)
            new = gamma / jnp.maximum(sq, jnp.finfo(sq.dtype).tiny) / curvature.n
            return jnp.log(jnp.clip(new, lo, hi)), None

        log_lam, _ = jax.lax.scan(fixed_point, log_lam, None, length=steps)
    elif method == "bisect":

        def halve(bracket: tuple, _: Any) -> tuple[tuple, None]:
            below, above = bracket
            mid = 0.5 * (below + above)
            gamma, fit = slope(mid)
            up = gamma > fit
            return (jnp.where(up, mid, below), jnp.where(up, above, mid)), None

        ends = (jnp.full_like(log_lam, math.log(lo)), jnp.full_like(log_lam, math.log(hi)))
        (below, above), _ = jax.lax.scan(halve, ends, None, length=steps)
        log_lam = 0.5 * (below + above)
    else:
        tx = optax.adam(lr)

        def evidence(ll: jax.Array) -> jax.Array:
            return _evidence(curvature, curvature.n * jnp.exp(ll)[seg], dw, h)

        log_lam, _ = adam_ascent(evidence, log_lam, tx, tx.init(log_lam), steps, bounds)
    return {re.escape(p): jnp.exp(log_lam[group[i]]) for i, p in enumerate(names)}
