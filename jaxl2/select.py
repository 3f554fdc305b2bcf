"""Which leaves of a params pytree are penalised: paths, presets and selectors.

A leaf's *path* is its pytree keys joined by ``/``: ``params/Dense_0/kernel`` for a
Flax Linen dict, ``l1/kernel`` for an NNX ``State`` (the trailing ``.value`` of an
``nnx.Variable`` is dropped), ``layers/0/weight`` for an Equinox module. Only
floating-point array leaves are candidates; anything else (integers, functions,
``None``) is never selected.

A *selector* is ``None`` (the kernels), a regular expression matched with
``re.fullmatch`` against the path, a predicate ``(path: str, leaf) -> bool``, or a
:class:`Preset`, which sees the whole params and so can ask what a layer *is*. The presets:

* :func:`kernels` (the default): Flax Linen/NNX ``Dense``/``Linear``/``Conv`` kernels, by name;
* :func:`haiku`: Haiku ``Linear``/``Conv`` weights ``w`` (never ``embeddings``), by name;
* :data:`equinox`: the ``weight`` of every ``eqx.nn.Linear``, ``eqx.nn.Conv*`` and
  ``eqx.nn.ConvTranspose*`` layer, found with ``isinstance``, stacked (``vmap``-created, for
  ``scan``) or not; never ``Embedding`` or norm-layer weights, whatever their ``ndim``.

:func:`mask` turns a selection into the boolean pytree that optax takes as ``mask=``.

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
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2.errors import Jaxl2Error, describe, listing

Predicate = Callable[[str, Any], bool]

__all__ = [
    "kernels",
    "haiku",
    "equinox",
    "Preset",
    "mask",
    "leaves",
    "is_float_array",
    "float_part",
    "path_str",
    "predicate",
    "resolve",
]


def kernels(path: str, leaf: Any) -> bool:
    """Flax Linen/NNX ``Dense``/``Linear``/``Conv`` weights: the last path key is ``kernel``.

    Flax names an ``Embed`` table ``embedding`` and a norm layer's parameters ``scale`` and
    ``bias``, so none of them is a kernel, stacked (``nn.scan``, ``nnx.vmap``) or not.
    """
    return path.rsplit("/", 1)[-1] == "kernel"


def haiku(path: str, leaf: Any) -> bool:
    """Haiku ``Linear``/``Conv`` weights: the last path key is ``w``.

    Haiku names the weight of ``hk.Linear`` and ``hk.ConvND``/``hk.ConvNDTranspose`` ``w`` and
    their bias ``b``; ``hk.Embed``'s table is ``embeddings`` and a norm layer's parameters are
    ``scale`` and ``offset``: none of those is selected.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxl2 import select
      >>> params = {"linear": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)},
      ...           "embed": {"embeddings": jnp.ones((5, 2))}}
      >>> [p for p, _ in select.resolve(params, select.haiku)]
      ['linear/w']
    """
    return path.rsplit("/", 1)[-1] == "w"


@dataclass(frozen=True)
class Preset:
    """A selector that sees the whole params: ``find(params)`` gives the selected paths.

    A predicate ``(path, leaf)`` sees one leaf at a time, so it cannot tell an
    ``eqx.nn.Linear``'s ``weight`` from an ``eqx.nn.Embedding``'s, or from the ``weight`` of
    an ``eqx.nn.LayerNorm`` stacked for ``scan`` (same name, same ``ndim``). A preset walks the
    params and asks each layer what it is. :func:`resolve` (and so ``jaxl2.l2_penalty``,
    ``jaxl2.regularized``, ``jaxl2.selected``) and :func:`mask` take a preset wherever they
    take a selector; of the paths ``find`` gives, the floating-point array leaves are selected.

    Attributes:
      name: how messages name the preset.
      find: ``params -> iterable of paths`` (paths as :func:`leaves` spells them).
      description: what it selects, in words, for messages.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxl2 import select
      >>> first = select.Preset("first", lambda params: [select.leaves(params)[0][0]], "the first leaf")
      >>> [p for p, _ in select.resolve({"a": jnp.ones(2), "b": jnp.ones(2)}, first)]
      ['a']
    """

    name: str
    find: Callable[[Any], Iterable[str]]
    description: str

    def __repr__(self) -> str:
        return self.name


def _equinox_weights(params: Any) -> list[str]:
    """The paths of the ``weight`` leaves of every Equinox ``Linear``/``Conv``/``ConvTranspose``.

    Equinox is not imported here: if no one has imported it, ``params`` holds no Equinox module.
    """
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return []
    layer_types = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)  # Conv1d/2d/3d subclass Conv

    def is_layer(x: Any) -> bool:
        return isinstance(x, layer_types)

    found = []
    for kp, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_layer)[0]:
        if is_layer(node):
            for sub, _ in jax.tree_util.tree_flatten_with_path(node)[0]:
                if sub and _key_str(sub[0]) == "weight":
                    found.append(path_str((*kp, *sub)))
    return found


equinox = Preset(
    "jaxl2.select.equinox",
    _equinox_weights,
    "the weight of each eqx.nn.Linear, eqx.nn.Conv* and eqx.nn.ConvTranspose* layer, by isinstance",
)
"""Equinox ``nn.Linear``/``nn.Conv*``/``nn.ConvTranspose*`` weights, found by ``isinstance``.

Stacked layers (made with ``eqx.filter_vmap`` for ``scan``) are selected too; the ``weight``
of ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` and ``nn.BatchNorm``
never is, whatever its ``ndim``. Works on a module and on ``eqx.filter(model, eqx.is_array)``.
"""

Selector = None | str | Predicate | Preset


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


def float_part(tree: Any) -> tuple[Any, Callable[[Any], Any]]:
    """The float-array leaves of ``tree`` as a tree with ``None`` elsewhere (what a gradient or an
    optax update sees), and ``merge(new)``, which puts the other leaves back around new arrays.

    Example:
      >>> import numpy as np
      >>> arrays, merge = float_part({"w": np.ones(2), "n": np.int32(3), "tag": "a"})
      >>> arrays["n"] is None, arrays["tag"] is None, merge({"w": np.zeros(2), "n": None, "tag": None})["n"]
      (True, True, np.int32(3))
    """
    flat, treedef = jax.tree_util.tree_flatten(tree)
    keep = [is_float_array(x) for x in flat]
    arrays = jax.tree_util.tree_unflatten(treedef, [x if k else None for x, k in zip(flat, keep)])

    def merge(new_arrays: Any) -> Any:
        it = iter(jax.tree_util.tree_leaves(new_arrays))
        return jax.tree_util.tree_unflatten(treedef, [next(it) if k else x for x, k in zip(flat, keep)])

    return arrays, merge


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
    """The predicate ``(path, leaf) -> bool`` of a selector (``None`` means the kernels).

    A user's predicate is wrapped so that it must return ``True`` or ``False`` (a Python or
    NumPy bool): anything else (a string, an array, ``None``) raises, naming the path, rather
    than being taken as true or false. A :class:`Preset` needs the whole params; its
    predicate raises when called: use :func:`resolve` or :func:`mask` with it.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxl2 import select
      >>> select.predicate(lambda path, leaf: "no")("params/Dense_0/kernel", jnp.ones(2))
      Traceback (most recent call last):
      ...
      jaxl2.errors.Jaxl2Error: select predicate returned 'no' (str) for path 'params/Dense_0/kernel'; it must return True or False
    """
    if select is None:
        return kernels
    if isinstance(select, str):
        rx = compile_regex(select)
        return lambda path, leaf: rx.fullmatch(path) is not None
    if isinstance(select, Preset):

        def needs_params(path: str, leaf: Any) -> bool:
            raise Jaxl2Error(
                f"select={select!r} chooses by what a layer is, so it needs the whole params, not one "
                f"leaf ({path!r}); use jaxl2.select.resolve(params, select) or jaxl2.select.mask"
            )

        return needs_params
    if callable(select):

        def checked(path: str, leaf: Any) -> bool:
            out = select(path, leaf)
            if not isinstance(out, (bool, np.bool_)):
                raise Jaxl2Error(
                    f"select predicate returned {out!r} ({type(out).__name__}) for path {path!r}; "
                    "it must return True or False"
                )
            return bool(out)

        return checked
    raise Jaxl2Error(
        f"select must be None (kernels), a regex string or a predicate (path, leaf) -> bool, "
        f"or a jaxl2.select.Preset; got {type(select).__name__}"
    )


def _describe(select: Selector) -> str:
    if select is None:
        return "the default selection (kernels: last path key 'kernel')"
    if isinstance(select, str):
        return f"select={select!r}"
    if isinstance(select, Preset):
        return f"select={select!r} ({select.description})"
    return f"select={getattr(select, '__name__', repr(select))}"


def resolve(params: Any, select: Selector = None) -> list[tuple[str, Any]]:
    """The ``(path, leaf)`` pairs that ``select`` picks; an empty match is a ``ValueError``.

    The error lists the floating-point paths that do exist, so a typo or a preset for
    another library (``kernel`` vs ``w`` vs ``weight``) shows at once. A selection that names
    an array that is not floating-point (an ``int8`` kernel, an integer counter) is an error
    too, naming it: such a leaf has no gradient, so it cannot be penalised or decayed.

    Examples:
      >>> import jax.numpy as jnp
      >>> resolve({"q": {"kernel": jnp.ones((2, 2), jnp.int8)}, "d": {"kernel": jnp.ones(2)}})
      Traceback (most recent call last):
      ...
      jaxl2.errors.Jaxl2Error: the default selection (kernels: last path key 'kernel') names 'q/kernel', an array of dtype int8: only floating-point leaves can be penalised (they alone have gradients); narrow the selection with select= (a regex, a predicate or a preset)
    """
    if describe(params).startswith("an optax"):
        raise Jaxl2Error(
            f"params must be a pytree of arrays, got {describe(params)}: are the arguments swapped?"
        )
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    arrays = [(path_str(kp), x) for kp, x in flat if hasattr(x, "shape") and hasattr(x, "dtype")]
    if isinstance(select, Preset):
        wanted = set(select.find(params))
        picked = [(p, x) for p, x in arrays if p in wanted]
    else:
        pred = predicate(select)
        picked = [(p, x) for p, x in arrays if pred(p, x)]
    chosen = [(p, x) for p, x in picked if is_float_array(x)]
    named = [(p, x) for p, x in picked if not is_float_array(x)]
    if named:
        p, x = named[0]
        raise Jaxl2Error(
            f"{_describe(select)} names {p!r}, an array of dtype {x.dtype}: only floating-point leaves "
            "can be penalised (they alone have gradients); narrow the selection with select= "
            "(a regex, a predicate or a preset)"
        )
    if not chosen:
        existing = listing([p for p, x in arrays if is_float_array(x)]) or "(none: no floating-point leaves)"
        raise Jaxl2Error(
            f"{_describe(select)} matched no parameter; the paths that exist are: {existing}. "
            "Use a regex over these paths, a predicate, or a preset "
            "(jaxl2.select.kernels, .haiku, .equinox)"
        )
    return chosen


def mask(params: Any, *, select: Selector = None) -> Any:
    """The optax mask of a selection: ``True`` on the selected leaves, ``False`` elsewhere.

    ``mask(params)[leaf] = leaf ∈ resolve(params, select)``, as a pytree of Python bools with
    the structure that optax's ``mask=`` expects (``optax.adamw``, ``optax.add_decayed_weights``,
    ``optax.masked``): the structure of ``params``, the same container types, one bool per leaf:

    * a Linen params dict or Haiku dict gives a dict of the same keys;
    * an NNX ``State`` (``nnx.state(model, nnx.Param)`` or ``nnx.split(model, nnx.Param)``)
      gives a ``State`` with one bool where each ``nnx.Variable`` is. That is a prefix of both
      trees ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` hands to optax: the ``State`` of
      Variables at ``tx.init`` and the ``State`` of plain arrays at ``tx.update``. (A mask
      mapped over the arrays, ``jax.tree.map(lambda x: x.ndim > 1, state)``, keeps the
      Variables and fails at the first update.) Build it from the state of the same filter as
      ``wrt``;
    * an Equinox module gives a module of the same type with ``False`` at its non-array leaves
      (activation functions, integers) and ``None`` left as ``None``, so it works for the full
      module as well as for ``eqx.filter(model, eqx.is_array)``; every leaf is a bool, so
      optax (which takes a mask whose leaves are all callable for a mask *function*) does not
      mistake this callable module for one.

    Selection by name or by layer type, not by ``ndim``: stacked (``scan``) norm scales of
    ``ndim`` 2 stay unselected, stacked kernels are selected. ``jaxl2.select.mask`` itself (or
    ``functools.partial(jaxl2.select.mask, select=...)``) also serves as a mask function.

    Args:
      params: the params as the optimizer sees them.
      select: which leaves, as in ``jaxl2.l2_penalty``: ``None`` (the kernels), a regex over
        paths, a predicate ``(path, leaf) -> bool`` or a preset (:func:`haiku`, :data:`equinox`).

    Returns:
      A pytree of ``True``/``False`` of the structure of ``params``.

    Raises:
      Jaxl2Error: when the selection matches nothing (the message lists the paths that exist)
        or ``select`` is not a selector.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxl2 import select
      >>> params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> select.mask(params)
      {'Dense_0': {'bias': False, 'kernel': True}}
      >>> tx = optax.adamw(0.1, weight_decay=0.5, mask=select.mask(params))
      >>> zero = jax.tree.map(jnp.zeros_like, params)
      >>> updates, _ = tx.update(zero, tx.init(params), params)
      >>> new = optax.apply_updates(params, updates)  # kernel·(1 − lr·wd), bias as it was
      >>> round(float(new["Dense_0"]["kernel"][0, 0]), 6), float(new["Dense_0"]["bias"][0])
      (0.95, 1.0)
    """
    wanted = {p for p, _ in resolve(params, select)}
    variable = getattr(sys.modules.get("flax.nnx"), "Variable", None)  # no NNX loaded: no Variables
    is_variable = None if variable is None else (lambda x: isinstance(x, variable))
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)
    return jax.tree_util.tree_unflatten(treedef, [path_str(kp) in wanted for kp, _ in flat])
