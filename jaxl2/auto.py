"""λ chosen during training: one L2 coefficient per selected layer, tuned by hypergradients.

The method is Luketina et al.'s online hypergradient through one optimizer step (*Scalable
Gradient-Based Tuning of Continuous Regularization Hyperparameters*, ICML 2016), on ``ln λ``
and through any optax optimizer. At step ``t`` the training step is a function of the λs,

    w_{t+1}(λ) = w_t + U(∇J(w_t) + λ⊙w_t, s_t)          (U: ``tx.update``; ``λ⊙w``: ``λ_l·w`` on layer l)

and the validation loss after it, ``V(λ) = L_val(w_{t+1}(λ))`` on a validation batch, has the
hypergradient

    ∂V/∂ln λ_l = λ_l · ⟨∇L_val(w_{t+1}), ∂U/∂g · w_l⟩

(for plain SGD, ``∂U/∂g = −η``: ``−η·λ_l·⟨∇L_val(w_{t+1}), w_l⟩``, Luketina et al.'s eq. 7).
``jax.grad`` computes it through the optimizer's own update (momentum, Adam's scaling, a
schedule), at the cost of one forward and backward pass on the validation batch; the data
gradient does not depend on λ, so no second derivative of the network is taken. A
hyper-optimizer then moves ``ln λ``: by default :func:`shared_adam`, Adam with one second
moment for all the λs, so its steps do not depend on the hypergradient's scale while a λ whose
hypergradient is comparatively tiny stays put; ``ln λ`` is clipped to ``[ln lo, ln hi]``.

The step uses ``λ_t`` for the training update and returns ``λ_{t+1}``. Calling it with a
validation batch every ``k`` steps (``val_batch=None`` in between) keeps the extra cost near
``1/k`` of a validation pass per step. One-step hypergradients are greedy: they see only what λ
does to the next step's validation loss (the "short-horizon bias" of Wu et al., ICLR 2018). For
SGD the λs settle where ``⟨∇L_val, w_l⟩ = 0``: on ridge regression with ``XᵀX ∝ I`` that is the
validation-optimal λ, with unequal feature scales it can be far from it (3× in the tests).

Example:
  >>> import jax, jax.numpy as jnp, optax, jaxl2
  >>> def mse(params, x, y):
  ...     return jnp.mean((x @ params["dense"]["kernel"] - y) ** 2)
  >>> params = {"dense": {"kernel": jnp.ones((2, 1))}}
  >>> auto = jaxl2.auto_l2(mse, optax.sgd(0.1), l2=1e-2)
  >>> tx_state, l2_state = optax.sgd(0.1).init(params), auto.init(params)
  >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
  >>> params, tx_state, l2_state, m = auto.step(params, tx_state, l2_state, (x, y), (x, y))
  >>> lam = auto.l2(params, l2_state)["dense/kernel"]  # validation wants smaller weights: λ goes up
  >>> round(lam, 6)  # one Adam step of 0.02 on ln λ: 0.01·e^0.02
  0.010202
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxl2 import select as _select
from jaxl2.errors import Jaxl2Error, shown
from jaxl2.rules import check_bool, check_l2
from jaxl2.step import check_loss_and_tx, make_train_step

__all__ = ["auto_l2", "AutoL2", "AutoL2State", "shared_adam", "DEFAULT_HYPER_LR", "DEFAULT_BOUNDS"]

DEFAULT_HYPER_LR = 0.02
DEFAULT_BOUNDS = (1e-8, 1.0)


class SharedAdamState(NamedTuple):
    """Adam's state with one second moment for the whole vector."""

    count: jax.Array  # type: ignore[assignment]  # a field named as optax names it, over tuple.count
    mu: jax.Array
    nu: jax.Array


def shared_adam(
    learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-12
) -> optax.GradientTransformation:
    """Adam whose second moment is shared by all coordinates: the default optimizer of ``ln λ``.

    With ``h`` the hypergradient (``[L]``), ``m ← b1·m + (1 − b1)·h``, ``v ← b2·v + (1 − b2)·mean(h²)``
    (one number), and the update is ``−lr·m̂/(√v̂ + eps)`` (``m̂``, ``v̂`` bias-corrected). So
    the largest λ steps are about ``lr``, as with Adam, but a λ whose hypergradient stays much
    smaller than the others' moves proportionally slower. Per-coordinate Adam would move it at
    full speed whenever its sign is steady: in a ReLU network, shifting weight norm from one
    layer to the next barely changes the function, its hypergradient is tiny, and Adam drifts
    the λs along it to their bounds (measured: the output layer's λ at 1.0 under ``adam``).

    Examples:
      >>> import jax.numpy as jnp
      >>> tx = shared_adam(0.1)
      >>> updates, _ = tx.update(jnp.array([1.0, 0.01]), tx.init(jnp.zeros(2)))
      >>> [round(float(u), 4) for u in updates]  # −0.1·h/√mean(h²)
      [-0.1414, -0.0014]
    """

    def init(params: jax.Array) -> SharedAdamState:
        return SharedAdamState(jnp.zeros((), jnp.int32), jnp.zeros_like(params), jnp.zeros((), params.dtype))

    def update(updates: jax.Array, state: SharedAdamState, params: Any = None):
        count = state.count + 1
        mu = b1 * state.mu + (1 - b1) * updates
        nu = b2 * state.nu + (1 - b2) * jnp.mean(updates * updates)
        t = count.astype(mu.dtype)
        mu_hat, nu_hat = mu / (1 - b1**t), nu / (1 - b2**t)
        return -learning_rate * mu_hat / (jnp.sqrt(nu_hat) + eps), SharedAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


class AutoL2State(NamedTuple):
    """What the λs need between steps: ``ln λ`` per selected leaf (``[L]`` float32, in
    selection order) and the hyper-optimizer's state. A pytree of arrays: checkpoint it with
    the params."""

    log_l2: jax.Array
    hyper_state: Any


class AutoL2(NamedTuple):
    """The pure functions of :func:`auto_l2`.

    * ``init(params) -> AutoL2State``: every selected leaf starts at the initial λ;
    * ``step(params, opt_state, l2_state, batch, val_batch=None) -> (params, opt_state,
      l2_state, metrics)``: one training step with the current λs (``batch``: the tuple of
      ``loss_fn``'s arguments after ``params``); with a ``val_batch`` (``val_loss_fn``'s
      arguments) also the hypergradient and the λ update. ``metrics``: those of
      :func:`jaxl2.make_train_step`, and with a ``val_batch`` ``val_loss`` (after the step)
      and ``hypergrad`` (``[L]``: ``∂val_loss/∂ln λ``);
    * ``l2(params, l2_state) -> {path: λ}``: the λs as Python floats (a mapping that
      :func:`jaxl2.l2_penalty` takes, through ``rules``);
    * ``rules(params, l2_state) -> {regex: λ}``: the λs as jaxl2's ordered per-layer mapping
      (escaped paths, so each pattern matches its own leaf only), traced values allowed;
    * ``paths(params) -> [path]``: the selected leaves, in the order of ``log_l2``.
    """

    init: Callable[[Any], AutoL2State]
    step: Callable[..., tuple[Any, Any, AutoL2State, dict[str, jax.Array]]]
    l2: Callable[[Any, AutoL2State], dict[str, float]]
    rules: Callable[[Any, AutoL2State], dict[str, Any]]
    paths: Callable[[Any], list[str]]


def auto_l2(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    l2: float = 1e-4,
    select: _select.Selector = None,
    val_loss_fn: Callable[..., Any] | None = None,
    hyper_tx: optax.GradientTransformation | None = None,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    has_aux: bool = False,
    norms: bool = False,
) -> AutoL2:
    """Training with one λ per selected leaf, each adapted online by its hypergradient.

    The training loss is ``loss_fn(params, *batch) + Σ_l λ_l/2·‖w_l‖²`` over the selected
    leaves (as :func:`jaxl2.make_train_step`, whose step this is). When a validation batch
    is given, the step also computes

        h_l = ∂/∂ln λ_l  val_loss_fn(w_{t+1}(λ), *val_batch),
        w_{t+1}(λ) = w_t + tx.update(∇loss_fn(w_t) + λ⊙w_t)

    by ``jax.grad`` through ``tx.update`` (Luketina et al., ICML 2016, on ``ln λ``), and
    ``ln λ ← clip(ln λ + hyper_tx.update(h), ln lo, ln hi)``. The training update itself uses
    the λs from before the hyper-update.

    Args:
      loss_fn: ``loss_fn(params, *batch)`` → the data loss (or ``(loss, aux)`` with
        ``has_aux``), without any penalty.
      tx: the optax optimizer of the params.
      l2: the initial λ of every selected leaf, a finite number ``> 0``.
      select: which leaves are penalised, each with its own λ (default: the kernels).
      val_loss_fn: the loss whose value after the step the λs minimise, called as
        ``val_loss_fn(params, *val_batch)`` with the same ``has_aux`` convention
        (default: ``loss_fn``).
      hyper_tx: the optimizer of ``ln λ`` (default: :func:`shared_adam` ``(0.02)``, Adam with
        one second moment for all the λs).
      bounds: ``(lo, hi)``: the λs stay within them (default ``(1e-8, 1.0)``).
      has_aux: whether ``loss_fn`` (and ``val_loss_fn``) return ``(loss, aux)``; the aux
        mapping's keys may not be those of the step's metrics (``loss``, ``val_loss``,
        ``hypergrad``, …).
      norms: as in :func:`jaxl2.make_train_step` (default False; with True, the norms of each
        selected leaf, its own λ group).

    Returns:
      An :class:`AutoL2`: ``init``, ``step``, ``l2``, ``rules``, ``paths``. ``step`` is pure:
      ``jax.jit`` it (``donate_argnums=(0, 1, 2)``); with and without ``val_batch`` it
      compiles once each.

    Raises:
      Jaxl2Error: for a bad ``loss_fn``, ``tx``, ``l2``, ``select``, ``bounds`` or
        ``has_aux``, at once; an empty selection at ``init``.

    Examples:
      >>> import jax.numpy as jnp, optax, jaxl2
      >>> params = {"a": {"kernel": jnp.ones((3, 2))}, "b": {"kernel": jnp.ones((2, 1))}}
      >>> auto = jaxl2.auto_l2(lambda p, x: jnp.sum(x), optax.sgd(0.1), l2=1e-3)
      >>> auto.paths(params)
      ['a/kernel', 'b/kernel']
      >>> {p: f"{lam:.3g}" for p, lam in auto.l2(params, auto.init(params)).items()}
      {'a/kernel': '0.001', 'b/kernel': '0.001'}
      >>> jaxl2.auto_l2(lambda p, x: x, optax.sgd(0.1), l2=0.0)
      Traceback (most recent call last):
      ...
      jaxl2.errors.Jaxl2Error: l2 (the initial λ) must be > 0: λ is adapted on a log scale, got 0.0
    """
    check_loss_and_tx(loss_fn, tx, "auto_l2")
    if hyper_tx is not None:
        check_loss_and_tx(loss_fn, hyper_tx, "auto_l2", name="hyper_tx")
    if val_loss_fn is not None and not callable(val_loss_fn):
        raise Jaxl2Error(
            f"val_loss_fn must be None or a function val_loss_fn(params, *val_batch), got {shown(val_loss_fn)}"
        )
    check_l2(l2, "l2 (the initial λ)")
    if isinstance(l2, jax.core.Tracer):
        raise Jaxl2Error("l2 (the initial λ) must be a concrete number, not a traced value")
    if not float(l2) > 0:
        raise Jaxl2Error(f"l2 (the initial λ) must be > 0: λ is adapted on a log scale, got {l2!r}")
    if not (
        isinstance(bounds, tuple | list)
        and len(bounds) == 2
        and all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
        and 0 < bounds[0] < bounds[1] < math.inf
    ):
        raise Jaxl2Error(f"bounds must be (lo, hi) with 0 < lo < hi < inf, got {bounds!r}")
    lo, hi = map(float, bounds)
    if not lo <= float(l2) <= hi:
        raise Jaxl2Error(f"l2 (the initial λ) {l2!r} is outside bounds ({lo:g}, {hi:g})")
    has_aux = check_bool(has_aux, "has_aux")
    _select.predicate(select)  # a bad selector fails now, not at init
    val_fn = loss_fn if val_loss_fn is None else val_loss_fn
    hyper_tx = shared_adam(DEFAULT_HYPER_LR) if hyper_tx is None else hyper_tx
    log_lo, log_hi = math.log(lo), math.log(hi)

    def paths(params: Any) -> list[str]:
        return [p for p, _ in _select.resolve(params, select)]

    def mapping(params: Any, log_l2: jax.Array) -> dict[str, Any]:
        lam_L = jnp.exp(log_l2)  # each path escaped: a pattern that matches its own leaf only
        return {re.escape(p): lam_L[i] for i, p in enumerate(paths(params))}

    def rules(params: Any, state: AutoL2State) -> dict[str, Any]:
        return mapping(params, state.log_l2)

    def init(params: Any) -> AutoL2State:
        log_l2 = jnp.full((len(paths(params)),), math.log(float(l2)), jnp.float32)
        return AutoL2State(log_l2, hyper_tx.init(log_l2))

    def l2_of(params: Any, state: AutoL2State) -> dict[str, float]:
        lam_L = np.exp(np.asarray(jax.device_get(state.log_l2), np.float64))
        return {p: float(lam_L[i]) for i, p in enumerate(paths(params))}

    def train(params: Any, opt_state: Any, log_l2: jax.Array, batch: tuple) -> tuple[Any, Any, dict]:
        l2_rules = mapping(params, log_l2)
        step = make_train_step(loss_fn, tx, l2=l2_rules, select=select, has_aux=has_aux, norms=norms)
        return step(params, opt_state, *batch)

    def step(params: Any, opt_state: Any, state: AutoL2State, batch: tuple, val_batch: tuple | None = None):
        if not isinstance(batch, tuple) or (val_batch is not None and not isinstance(val_batch, tuple)):
            raise Jaxl2Error(
                "batch and val_batch must be tuples of the loss functions' arguments after params, "
                f"e.g. (x, y); got {type(batch).__name__} and {type(val_batch).__name__}"
            )
        if val_batch is None:
            params, opt_state, metrics = train(params, opt_state, state.log_l2, batch)
            return params, opt_state, state, metrics

        _, merge = _select.float_part(params)  # make_train_step passes the non-float leaves through

        def val_after(log_l2):
            new_params, new_opt_state, metrics = train(params, opt_state, log_l2, batch)
            out = val_fn(new_params, *val_batch)
            # value_and_grad's aux holds arrays only: the float leaves go out, the rest stays.
            return (out[0] if has_aux else out), (_select.float_part(new_params)[0], new_opt_state, metrics)

        (val, (new_arrays, opt_state, metrics)), hypergrad_L = jax.value_and_grad(val_after, has_aux=True)(
            state.log_l2
        )
        if taken := sorted({"val_loss", "hypergrad"} & set(metrics)):
            raise Jaxl2Error(
                f"loss_fn's aux has a {taken[0]!r} entry, which the step's metrics hold (the "
                "validation loss after the step, and the hypergradient in ln λ); rename that key"
            )
        updates, hyper_state = hyper_tx.update(hypergrad_L, state.hyper_state, state.log_l2)
        log_l2 = jnp.clip(optax.apply_updates(state.log_l2, updates), log_lo, log_hi)
        metrics = {**metrics, "val_loss": val, "hypergrad": hypergrad_L}
        return merge(new_arrays), opt_state, AutoL2State(log_l2, hyper_state), metrics

    return AutoL2(init=init, step=step, l2=l2_of, rules=rules, paths=paths)
