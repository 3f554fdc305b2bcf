"""K-FAC for any model whose selected leaves enter it through dense products: what
``jaxl2.ggn(structure="kron" | "ekfac")`` computes, and its fast exact ``"diag"``.

A kernel ``W`` that a dense product ``z = a·W`` consumes has ``∂f_c/∂W = a ⊗ ∂f_c/∂z``: the
GGN block of the summed negative log-likelihood is ``Σ_r a_r a_rᵀ ⊗ G_r`` over the rows ``r``
of ``z`` (every dim of ``z`` that does not come from the kernel: the example, and a sequence's
positions), with ``G_r = Σ_c b'_rc b'_rcᵀ − μ_r μ_rᵀ`` for the softmax (``b'_c = √p_c·∂f_c/∂z``,
``μ = Σ_c p_c·∂f_c/∂z``) and ``Σ_c b'_rc b'_rcᵀ`` with ``b'_c = ∂f_c/∂z / σ`` for a Gaussian.
K-FAC keeps ``A = Σ_r a_r a_rᵀ / R`` and ``G = Σ_r G_r`` (``R`` the rows of all the examples;
with one row per example, Martens & Grosse's K-FAC; with several, K-FAC-expand, Eschenhagen et
al., NeurIPS 2023, exact for a linear model with a Gaussian likelihood). A bias added to ``z``
has the input 1: ``A = [[1]]``, exact with one row per example. EK-FAC keeps the exact diagonal
``Σ_r (Uᵀa_r)² ⊗ diag(VᵀG_rV)`` in the factors' eigenvectors ``U, V`` (George et al., NeurIPS
2018), a second pass; ``"diag"`` the same without the rotation, exact with one row per example.

Why a pass over the jaxpr: the layers' inputs ``a`` and outputs ``z`` are values inside
``apply_fn``. The jaxpr of ``apply_fn(params, x_chunk)`` shows them the same way for every
framework (Linen ``Dense``/``DenseGeneral``, NNX ``Linear``, Equinox ``Linear`` under ``vmap``:
``dot_general(W, x)`` then ``transpose``, Haiku ``Linear``; layers stacked for ``scan``), with no
framework's interceptors and no dependency (kfac-jax's graph matcher is large and follows JAX's
internals). A small interpreter binds every equation as ``jax.core.eval_jaxpr`` does, except that
it adds a zero shift to each site's output (its gradient is ``∂f/∂z``), records the dense
product's other operand ``a``, enters the calls that take a selected leaf (``jit``, ``remat``,
custom derivatives: their primal jaxpr) and unrolls a ``scan`` over a stacked leaf (each slice a
site of its own). A leaf may reach its site through ``convert_element_type``, ``copy``,
``transpose``, ``reshape``, ``squeeze`` and (a bias) ``broadcast_in_dim``; any other use is an
error that names it.

The examples go ``batch_size`` at a time through one jaxpr, summed by ``lax.scan``; the last
chunk is padded with rows that weigh nothing (``p·mask``, ``a·mask``), the examples' axis of each
site's rows being the one that grows with the chunk (a second trace, of shapes only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from jaxl2 import select as _select
from jaxl2.errors import Jaxl2Error

__all__ = ["dense_curvature", "arrays_of"]

_MOVES = ("convert_element_type", "copy", "copy_p", "transpose", "reshape", "squeeze", "broadcast_in_dim")
_CALLS = ("jaxpr", "call_jaxpr")  # the params that hold a call's primal jaxpr


@dataclasses.dataclass(frozen=True)
class _Site:
    """Where a leaf (``slice`` of it, in a scan) enters: ``index`` (in, out) its entries' flat
    positions in the leaf (``in = 1`` for a bias), ``a_perm``/``z_perm`` the permutations that put
    the rows first in the other operand and the output (``a_perm`` ``None`` for a bias)."""

    leaf: int
    slice: int | None
    index: np.ndarray
    a_perm: tuple[int, ...] | None
    z_perm: tuple[int, ...]
    z_shape: tuple[int, ...]
    nrows: int  # how many of z_perm's dims are rows

    @property
    def rows(self) -> tuple[int, ...]:
        """The shape of the output's rows (its dims that do not come from the leaf)."""
        return tuple(self.z_shape[d] for d in self.z_perm[: self.nrows])


def _moved(eqn: Any, idx: np.ndarray) -> np.ndarray:
    """The leaf entries of a move's output, from those of its input."""
    p = eqn.params
    name = eqn.primitive.name
    if name == "transpose":
        return np.transpose(idx, p["permutation"])
    if name == "reshape":
        return idx.reshape(p["new_sizes"])
    if name == "squeeze":
        return np.squeeze(idx, tuple(p["dimensions"]))
    if name == "broadcast_in_dim":
        dims = [int(d) for d in p["broadcast_dimensions"]]
        shape = [idx.shape[dims.index(k)] if k in dims else 1 for k in range(len(p["shape"]))]
        return np.broadcast_to(idx.reshape(shape), p["shape"])
    return idx


def _bind(eqn: Any, vals: list) -> Any:
    """``eqn`` applied to ``vals``, as ``jax.core.eval_jaxpr`` binds it."""
    with eqn.ctx.manager:
        return eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))


class _Interpreter:
    """Evaluates a jaxpr with a shift added at each site (``shifts``, in the order sites are met, or
    ``None``), recording the sites and their other operands ``acts``."""

    def __init__(self, paths: list[str], shifts: list[jax.Array] | None):
        self.paths, self.shifts = paths, shifts
        self.sites: list[_Site] = []
        self.acts: list[jax.Array | None] = []

    def refuse(self, mark: tuple, why: str) -> Jaxl2Error:
        return Jaxl2Error(
            f"{self.paths[mark[0]]!r} enters apply_fn through {why}, not a dense product (dot_general) or "
            "an added bias, which K-FAC needs: use structure 'diag' or 'full' of jaxl2.ggn, or leave "
            "the leaf out of select="
        )

    def site(
        self, mark: tuple, index: np.ndarray, a: Any, a_perm: Any, z: jax.Array, rows: list, outs: list
    ) -> Any:
        self.sites.append(_Site(mark[0], mark[1], index, a_perm, (*rows, *outs), tuple(z.shape), len(rows)))
        self.acts.append(a)
        return z if self.shifts is None else z + self.shifts[len(self.sites) - 1]

    def run(self, jaxpr: Any, consts: list, args: list, marks: list) -> list:
        env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
        marked = {v: m for v, m in zip(jaxpr.invars, marks) if m is not None}

        def read(v: Any) -> Any:
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for eqn in jaxpr.eqns:
            vals = [read(v) for v in eqn.invars]
            ms = [None if isinstance(v, jcore.Literal) else marked.get(v) for v in eqn.invars]
            outs = self.equation(eqn, vals, ms) if any(m is not None for m in ms) else None
            if outs is None:
                outs = _bind(eqn, vals)
            if eqn.primitive.name in _MOVES and ms[0] is not None:
                marked[eqn.outvars[0]] = (*ms[0][:2], _moved(eqn, ms[0][2]))
            env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]))
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn: Any, vals: list, ms: list) -> Any:
        """A marked leaf's equation: ``None`` for a move (bound as usual), else its outputs."""
        name, p = eqn.primitive.name, eqn.params
        mark = next(m for m in ms if m is not None)
        if name in _MOVES:
            return None
        if name in ("dot_general", "add") and ms.count(None) == 0:
            raise self.refuse(mark, f"{name} with another selected leaf")
        if name == "dot_general":
            k = ms.index(mark)
            (contract, batch) = p["dimension_numbers"]
            if batch[k]:
                raise self.refuse(mark, "a dot_general with batch dims on the leaf's side")
            ks, xs = contract[k], contract[1 - k]
            kfree = [d for d in range(vals[k].ndim) if d not in ks]
            xfree = [d for d in range(vals[1 - k].ndim) if d not in xs]
            index = np.transpose(mark[2], (*ks, *kfree)).reshape(
                int(np.prod([vals[k].shape[d] for d in ks])), -1
            )
            z = _bind(eqn, vals)
            zk = list(range(len(kfree))) if k == 0 else list(range(len(xfree), z.ndim))
            rows = [d for d in range(z.ndim) if d not in zk]
            return self.site(mark, index, vals[1 - k], (*xfree, *xs), z, rows, zk)
        if name == "add":
            z = _bind(eqn, vals)
            idx = np.broadcast_to(mark[2], z.shape)
            outs = [d for d in range(z.ndim) if np.any(np.diff(idx, axis=d))]
            rows = [d for d in range(z.ndim) if d not in outs]
            index = np.transpose(idx, (*rows, *outs))[(0,) * len(rows)].reshape(1, -1)
            if np.unique(index).size != index.size:
                raise self.refuse(mark, "an add that repeats its entries")
            return self.site(mark, index, None, None, z, rows, outs)
        if name == "scan":
            return self.scan(eqn, vals, ms, mark)
        sub = next((p[c] for c in _CALLS if c in p), None)
        if sub is not None:
            closed = sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())
            return self.run(closed.jaxpr, list(closed.consts), vals, ms)
        raise self.refuse(mark, name)

    def scan(self, eqn: Any, vals: list, ms: list, mark: tuple) -> list:
        """A scan that takes a leaf, unrolled: each iteration a slice of its stacked ``xs``."""
        p = eqn.params
        body, n, first = p["jaxpr"], p["length"], p["num_consts"] + p["num_carry"]
        if any(m is not None for m in ms[p["num_consts"] : first]) or any(
            m is not None and m[1] is not None for m in ms
        ):
            raise self.refuse(mark, "a scan's carry or a nested scan")
        consts, carry, xs = vals[: p["num_consts"]], vals[p["num_consts"] : first], vals[first:]
        ys = []
        for i in reversed(range(n)) if p["reverse"] else range(n):
            xmarks = [None if m is None else (m[0], i, m[2][i]) for m in ms[first:]]
            slices = [x[i] for x in xs]
            outs = self.run(
                body.jaxpr,
                list(body.consts),
                [*consts, *carry, *slices],
                [*ms[: p["num_consts"]], *[None] * len(carry), *xmarks],
            )
            carry, y = outs[: p["num_carry"]], outs[p["num_carry"] :]
            ys.append(y)
        ys = ys[::-1] if p["reverse"] else ys
        return [*carry, *(jnp.stack(y) for y in zip(*ys))]


def _is_array(w: Any) -> bool:
    return hasattr(w, "shape") and hasattr(w, "dtype")


def arrays_of(params: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """The array leaves of ``params`` and ``rebuild(arrays)``: the params again, with those arrays
    and the other leaves (an Equinox model's functions) as they were. A traced ``apply_fn`` gets
    ``rebuild(traced arrays)``: new containers made inside the trace, as NNX's ``merge`` needs."""
    leaves, tree = jax.tree.flatten(params)
    keep = [_is_array(w) for w in leaves]

    def rebuild(arrays: list[Any]) -> Any:
        given = iter(arrays)
        return jax.tree.unflatten(tree, [next(given) if k else w for w, k in zip(leaves, keep)])

    return [w for w, k in zip(leaves, keep) if k], rebuild


def dense_curvature(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    select: _select.Selector,
    *,
    likelihood: str,
    sigma: float,
    structure: str,
    batch_size: int | None,
) -> tuple[tuple[Any, ...], jax.Array]:
    """The selected leaves' K-FAC factors ``(A, G)`` (``structure="kron"``; a leaf stacked in a scan:
    ``(L, I, I)`` and ``(L, O, O)``, one pair per slice), EK-FAC's values or the exact diagonal (in
    the leaf's shape) over ``x``, ``batch_size`` examples at a time (the last chunk padded with
    rows that weigh nothing), and the outputs ``(n, C)`` of ``apply_fn``.

    Raises:
      Jaxl2Error: naming a selected leaf that does not enter through one dense product or bias
        (the module's docstring says which), or for ``"diag"`` a site with several rows per example.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxl2.kfac import dense_curvature
      >>> def f(params, x):
      ...     return jnp.tanh(x @ params["l0"]["kernel"]) @ params["l1"]["kernel"]
      >>> params = {"l0": {"kernel": jnp.ones((3, 4)) / 4}, "l1": {"kernel": jnp.ones((4, 2))}}
      >>> x = jnp.arange(15.0).reshape(5, 3) / 15
      >>> blocks, out = dense_curvature(
      ...     f, params, x, None, likelihood="gaussian", sigma=1.0, structure="kron", batch_size=2
      ... )
      >>> [tuple(f.shape for f in pair) for pair in blocks]  # (A, G) per kernel
      [((3, 3), (4, 4)), ((4, 4), (2, 2))]
      >>> blocks[1][1].tolist()  # the last layer's G: Σ_i I/σ² over the 5 examples
      [[5.0, 0.0], [0.0, 5.0]]
    """
    chosen = _select.resolve(params, select)
    paths = [p for p, _ in chosen]
    number = {p: i for i, p in enumerate(paths)}
    ws, rebuild = arrays_of(params)
    flat = [(kp, w) for kp, w in jax.tree_util.tree_flatten_with_path(params)[0] if _is_array(w)]
    marks = [
        (number[p], None, np.arange(np.size(w)).reshape(np.shape(w)))
        if (p := _select.path_str(kp)) in number
        else None
        for kp, w in flat
    ]
    n, dtype = x.shape[0], x.dtype
    chunk = n if batch_size is None else min(batch_size, n)
    pad = -n % chunk

    def discover(size: int) -> tuple[Any, list[_Site]]:
        xb = jax.ShapeDtypeStruct((size, *x.shape[1:]), dtype)
        closed = jax.make_jaxpr(lambda ws, xb: apply_fn(rebuild(ws), xb))(ws, xb)
        probe = _Interpreter(paths, None)
        jax.eval_shape(
            lambda ws, xb: probe.run(closed.jaxpr, closed.consts, [*ws, xb], [*marks, None]), ws, xb
        )
        return closed, probe.sites

    closed, sites = discover(chunk)
    for i, (path, w) in enumerate(chosen):
        index = np.sort(np.concatenate([s.index.ravel() for s in sites if s.leaf == i] or [np.zeros(0, int)]))
        if not np.array_equal(index, np.arange(np.size(w))):
            many = index.size > np.size(w)
            raise Jaxl2Error(
                f"{path!r} enters apply_fn {'in more than one dense product' if many else 'in no dense product or bias'}"
                ", and K-FAC needs exactly one (a leaf stacked for a scan: one per slice): use structure 'diag' "
                "or 'full' of jaxl2.ggn, or leave the leaf out of select="
            )
    rows = [int(np.prod(s.z_shape)) // s.index.shape[1] for s in sites]
    if structure == "diag" and any(r != chunk for r in rows):
        raise Jaxl2Error("the exact diagonal by layers needs one row per example in every dense product")
    # where a padded chunk's rows are masked: per site, its rows' shape and the examples' axis in it
    examples: list[tuple[tuple[int, ...], int] | None] = [None] * len(sites)
    if pad:
        for s, t in zip(sites, discover(chunk + 1)[1]):
            moved = [k for k, d in enumerate(s.z_perm[: s.nrows]) if s.z_shape[d] != t.z_shape[d]]
            if len(moved) != 1:
                raise Jaxl2Error(
                    f"{paths[s.leaf]!r}: its dense product's rows do not follow the examples one axis"
                )
            examples[sites.index(s)] = (s.rows, moved[0])

    def chunk_terms(xb: jax.Array, mb: jax.Array, kind: str, bases: list) -> tuple[list, jax.Array]:
        def forward(shifts: list) -> tuple[jax.Array, list]:
            run = _Interpreter(paths, shifts)
            (out,) = run.run(closed.jaxpr, closed.consts, [*ws, xb], [*marks, None])
            return out.reshape(xb.shape[0], -1), run.acts

        zeros = [jnp.zeros(s.z_shape, dtype) for s in sites]
        out, vjp, acts = jax.vjp(forward, zeros, has_aux=True)
        eye = jnp.eye(out.shape[1], dtype=out.dtype)
        if likelihood == "classification":
            p = jax.nn.softmax(out) * mb[:, None]
            cots = jnp.concatenate([jnp.sqrt(p)[None] * eye[:, None, :], p[None]])
        else:
            cots = eye[:, None, :] * (mb[:, None] / sigma)
        grads = jax.vmap(lambda c: vjp(c)[0])(cots)
        terms: list[Any] = []
        for s, a, g, (u, v), ex in zip(sites, acts, grads, bases, examples):
            g = jnp.transpose(g, (0, *(d + 1 for d in s.z_perm))).reshape(g.shape[0], -1, s.index.shape[1])
            b, mu = (g[:-1], g[-1]) if likelihood == "classification" else (g, None)
            if v is not None:
                b, mu = b @ v, None if mu is None else mu @ v
            if a is not None:
                a = jnp.transpose(a, s.a_perm).reshape(b.shape[1], -1)
                if ex is not None:
                    shape, k = ex
                    a = a * jnp.broadcast_to(
                        mb.reshape([-1 if j == k else 1 for j in range(len(shape))]), shape
                    ).reshape(-1, 1)
                a = a if u is None else a @ u
            if kind == "kron":
                bb = b.reshape(-1, b.shape[-1])
                terms.append((None if a is None else a.T @ a, bb.T @ bb - (0 if mu is None else mu.T @ mu)))
            else:
                # sums over leading axes as matrix products (XLA's CPU reductions there are slower)
                d = (jnp.ones((1, b.shape[0]), b.dtype) @ (b * b).reshape(b.shape[0], -1)).reshape(
                    b.shape[1:]
                )
                d = d - (0 if mu is None else mu * mu)
                terms.append(jnp.ones((1, d.shape[0]), d.dtype) @ d if a is None else (a * a).T @ d)
        return terms, out

    xs = jnp.pad(x, ((0, pad), *[(0, 0)] * (x.ndim - 1))).reshape(-1, chunk, *x.shape[1:])
    ms = (jnp.arange(n + pad) < n).astype(dtype).reshape(-1, chunk)

    def total(kind: str, bases: list) -> tuple[list, jax.Array]:
        def add(acc: list, xm: tuple) -> tuple[list, jax.Array]:
            terms, out = chunk_terms(xm[0], xm[1], kind, bases)
            return jax.tree.map(jnp.add, acc, terms), out

        shapes = jax.eval_shape(lambda xm: chunk_terms(xm[0], xm[1], kind, bases)[0], (xs[0], ms[0]))
        acc, outs = jax.lax.scan(add, jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), shapes), (xs, ms))
        return acc, outs.reshape(n + pad, -1)[:n]

    def by_leaf(i: int, values: list) -> list:
        """Leaf ``i``'s sites' values, slice by slice."""
        return [v for s, v in sorted(zip(sites, values), key=lambda t: t[0].slice or 0) if s.leaf == i]

    none: list[tuple[Any, Any]] = [(None, None)] * len(sites)
    if structure == "diag":
        values, out = total("diag", none)
    else:
        factors, out = total("kron", none)
        if structure == "kron":  # A = Σ_r a_r a_rᵀ / R; a bias's input is 1
            pairs = [
                (jnp.ones((1, 1), dtype) if a is None else a * (chunk / (n * r)), g)
                for (a, g), r in zip(factors, rows)
            ]
            stacked = {s.leaf for s in sites if s.slice is not None}
            blocks = (
                tuple(map(jnp.stack, zip(*by_leaf(i, pairs)))) if i in stacked else by_leaf(i, pairs)[0]
                for i in range(len(paths))
            )
            return tuple(blocks), out
        eig = [(None if a is None else jnp.linalg.eigh(a)[1], jnp.linalg.eigh(g)[1]) for a, g in factors]
        values, out = total("diag", eig)
    diagonals = []  # each site's values at its entries of the leaf
    for i, (_, w) in enumerate(chosen):
        index = np.concatenate([s.index.ravel() for s in sites if s.leaf == i])
        vals = jnp.concatenate([v.ravel() for s, v in zip(sites, values) if s.leaf == i])
        diagonals.append(jnp.zeros(np.size(w), vals.dtype).at[index].set(vals).reshape(np.shape(w)))
    return tuple(diagonals), out
