"""``l2="evidence"``: λ chosen during the run by the Laplace evidence.

:class:`EvidenceTrainer` is the :class:`~jaxl2.mnist.train.Trainer` of such a run. The run
trains on **all** of train ∪ validation (no split is needed to choose λ, and there is no
refit); every ``evidence_every``-th epoch (``epoch % evidence_every == 0``) ends with

1. the Gauss–Newton of the summed cross-entropy over every training example, at that epoch's
   params (:func:`dense_ggn`: K-FAC factors per layer, EK-FAC, or the exact diagonal; or the
   whole GGN's quadrature, :func:`jaxl2.ggn_lanczos`), and ``log p(D | w)``;
2. the λs that maximise the evidence at those params (:func:`jaxl2.evidence_l2`, ``α = n·λ``),
   within :data:`~jaxl2.mnist.config.AUTO_L2_BOUNDS`: the root of ``Σ_l γ_l = α·Σ_l ‖w_l‖²`` for
   one λ shared by the selected leaves (``evidence_lambda="shared"``, the default), of
   ``γ_l = α_l·‖w_l‖²`` for one each (``"layer"``), by ``evidence_steps`` halvings of the bounds
   in ``ln λ`` (``evidence_method="bisect"``, the default), MacKay iterations from the current
   λs (``"mackay"``) or steps of Adam on ``ln λ`` from them (``"adam"``, learning rate 0.1, as
   laplace-torch's ``marglik_training``; its moments start afresh at each update);
3. the log evidence at the new λs (:func:`jaxl2.log_evidence`), recorded with them.

The prior covers the kernels (``evidence_prior="kernels"``, the default: the biases are
neither penalised nor in the evidence, held at their values as :mod:`jaxl2.evidence` states) or
every tensor, kernels and biases (``"all"``, laplace-torch's "layerwise" with
``evidence_lambda="layer"``, its "scalar" with ``"shared"``); the training loss's penalty covers
the same tensors, so the run is the MAP of that prior.

Why shared: with the kernels only, scaling layer ``l``'s kernel and bias by ``c`` and layer
``l + 1``'s kernel by ``1/c`` leaves the MLP's function unchanged and costs no penalty on the
biases; the penalised optimum over that rescaling has ``λ_l·‖w_l‖²`` equal in every layer and
depends on the λs through their product only. The layers' ratios of λ are then not something
the trained function shows; per layer, the evidence's updates drift them apart for as long as
the run trains (``docs/guide/evidence.md`` shows it).

The epochs in between train with the current λs. The state carries ``ln λ`` and the last log
evidence, so a checkpoint holds them and a resume continues bit for bit.

The curvature is computed from the MLP's own structure (:func:`dense_ggn`): a Dense kernel
``W`` with input ``a`` and output ``z`` has ``∂f_c/∂W = a ⊗ ∂f_c/∂z``, so one backward pass
per class and a matrix product per layer give the exact diagonal of ``Σ_i J_iᵀ Λ_i J_i``, or
its K-FAC factors (``evidence_curvature``, default ``"kron"``), or the exact diagonal in the
factors' eigenbasis (``"ekfac"``, a second pass), for a few gradients' cost where the generic
per-example :func:`jaxl2.ggn` takes hundreds (``python experiments/evidence_cost.py``); the
tests check the diagonal against :func:`jaxl2.ggn`, the factors against a hand computation and
EK-FAC against the exact block rotated, in float64.

Example:
  >>> from jaxl2.mnist.config import Config
  >>> from jaxl2.mnist.marglik import EvidenceTrainer
  >>> cfg = Config(l2="evidence", hidden=(8,), batch_size=4, epochs=1, evidence_every=1)
  >>> trainer = EvidenceTrainer(cfg, num_train=8)
  >>> {p: f"{lam:.3g}" for p, lam in trainer.lambdas(trainer.init()).items()}  # every λ at l2_init
  {'params/Dense_0/kernel': '0.0001', 'params/Dense_1/kernel': '0.0001'}
"""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2 import select as _select
from jaxl2.evidence import Curvature, evidence_l2, ggn_lanczos, log_evidence
from jaxl2.mnist.config import AUTO_L2_BOUNDS, Config
from jaxl2.mnist.hypergrad import l2_at, lambdas_of
from jaxl2.mnist.model import ACTIVATION_FNS, abstract_params
from jaxl2.mnist.train import Trainer, TrainState

__all__ = ["EvidenceTrainState", "EvidenceTrainer", "dense_ggn", "LANCZOS_PROBES", "LANCZOS_STEPS"]

# evidence_curvature "lanczos": the probes and Lanczos steps of jaxl2.ggn_lanczos at each update
LANCZOS_PROBES, LANCZOS_STEPS = 2, 40


class EvidenceTrainState(TrainState):
    """:class:`~jaxl2.mnist.train.TrainState`, ``log_l2`` (``ln λ`` per selected leaf, all equal
    when shared) and
    ``log_evidence`` (at the last update; NaN before the first)."""

    log_l2: jax.Array
    log_evidence: jax.Array


def _dense_layers(params: Any) -> list[tuple[str, Any]]:
    """``[(name, {"kernel", "bias"})]`` of the MLP's params, in the order data flows."""
    layers = params["params"]
    return [(k, layers[k]) for k in sorted(layers, key=lambda k: int(k.rsplit("_", 1)[1]))]


def _layer_terms(structure: str, p_BxC: jax.Array, m_B: jax.Array, a_BxI: jax.Array, b_CxBxO: jax.Array):
    """One chunk's sums for one Dense layer (:func:`dense_ggn`): its kernel's and bias's
    diagonals, or their factors (the kernel's ``A`` not yet divided by ``n``)."""
    mu_BxO = jnp.einsum("bc,cbo->bo", p_BxC, b_CxBxO)
    if structure == "diag":
        g_BxO = jnp.einsum("bc,cbo->bo", p_BxC, b_CxBxO * b_CxBxO) - mu_BxO * mu_BxO
        ones = jnp.ones(g_BxO.shape[0], g_BxO.dtype)
        return {"bias": ones @ g_BxO, "kernel": jnp.square(a_BxI).T @ g_BxO}
    root = (jnp.sqrt(p_BxC).T[:, :, None] * b_CxBxO).reshape(-1, b_CxBxO.shape[-1])
    g_OxO = root.T @ root - mu_BxO.T @ mu_BxO
    a_BxI = a_BxI * m_B[:, None]
    return {"bias": g_OxO, "kernel": (a_BxI.T @ a_BxI, g_OxO)}


def _per_class_gradients(layers: list[tuple[str, Any]], act: Any, x_BxD: jax.Array):
    """The MLP's logits ``(B, C)``, each Dense layer's inputs ``a`` ``(B, I)``, and
    ``b_c = ∂logit_c/∂z`` of each layer's output ``z`` for every class ``(C, B, O)``: one forward
    pass, one backward pass per class (the cotangent one-hot in class ``c`` on every row)."""

    def forward(shifts):  # the MLP, with a shift added to each layer's output z
        h, inputs = x_BxD, []
        for i, (_, layer) in enumerate(layers):
            inputs.append(h)
            z = h @ layer["kernel"] + layer["bias"] + shifts[i]
            h = act(z) if i < len(layers) - 1 else z
        return h, inputs

    shifts = [jnp.zeros((x_BxD.shape[0], layer["bias"].shape[0]), x_BxD.dtype) for _, layer in layers]
    logits_BxC, vjp, inputs = jax.vjp(forward, shifts, has_aux=True)
    eye = jnp.eye(logits_BxC.shape[1], dtype=x_BxD.dtype)
    return logits_BxC, inputs, jax.vmap(lambda e: vjp(jnp.broadcast_to(e, logits_BxC.shape))[0])(eye)


def dense_ggn(
    params: Any,
    x_NxD: jax.Array,
    y_N: jax.Array,
    activation: str = "relu",
    structure: str = "kron",
    chunk: int = 1024,
) -> tuple[Any, jax.Array]:
    """The Gauss–Newton ``Σ_i J_iᵀ(diag p_i − p_i p_iᵀ)J_i`` of the summed softmax cross-entropy
    of the MLP (:class:`~jaxl2.mnist.model.MLP`) over ``x_NxD, y_N``, per kernel and bias, and
    ``log p(D | w) = −Σ_i CE_i``.

    Per Dense layer with inputs ``a_i`` and ``b_ic = ∂logit_ic/∂z_i`` (``z`` its output), the
    kernel's block of example ``i`` is ``a_i a_iᵀ ⊗ G_i`` with ``G_i = Σ_c p_ic·b_ic b_icᵀ − μ_i μ_iᵀ``
    (``μ_i = Σ_c p_ic·b_ic``), the bias's ``G_i``. With ``g_i = Σ_c p_ic·b_ic² − (Σ_c p_ic·b_ic)²``:

    * ``structure="diag"``, exact: the kernel's diagonal ``Σ_i a_i² ⊗ g_i``, the bias's ``Σ_i g_i``;
    * ``structure="kron"``, K-FAC: the kernel's factors ``(A, G) = (Σ_i a_i a_iᵀ / n, Σ_i G_i)``
      (its block ``≈ A ⊗ G``), the bias's ``([[1]], Σ_i G_i)`` (exact), as
      :class:`jaxl2.Curvature` takes them;
    * ``structure="ekfac"``, EK-FAC: the kernel's exact diagonal in the eigenbasis ``U ⊗ V`` of
      its K-FAC factors, ``s_jk = Σ_i (u_jᵀa_i)²·(v_kᵀG_iv_k)`` (the diag sums over rotated
      ``a_i`` and ``b_ic``), the bias's in ``V`` (the eigenvalues of its exact block); two passes
      over the data, the first for the factors.

    The examples go ``chunk`` at a time.

    Returns:
      ``(curvature, log_likelihood)``: ``curvature`` a pytree of ``params``'s structure (each
      leaf an array, or a pair of factors).
    """
    act = ACTIVATION_FNS[activation]
    layers = _dense_layers(params)
    n, dtype = x_NxD.shape[0], x_NxD.dtype
    chunk = min(chunk, n)
    pad = -n % chunk
    xs = jnp.pad(x_NxD, ((0, pad), (0, 0))).reshape(-1, chunk, x_NxD.shape[1])
    ys = jnp.pad(y_N, (0, pad)).reshape(-1, chunk)
    ms = (jnp.arange(n + pad) < n).reshape(-1, chunk).astype(dtype)
    kind, bases = structure, [(None, None)] * len(layers)
    if structure == "ekfac":  # the diagonal in the factors' eigenvectors, per layer (U of A, V of G)
        factors, _ = dense_ggn(params, x_NxD, y_N, activation, "kron", chunk)
        kind = "diag"
        bases = [tuple(jnp.linalg.eigh(f)[1] for f in pair["kernel"]) for _, pair in _dense_layers(factors)]

    def chunk_terms(args):
        x_BxD, y_B, m_B = args
        logits_BxC, inputs, b_per_layer = _per_class_gradients(layers, act, x_BxD)
        p_BxC = jax.nn.softmax(logits_BxC) * m_B[:, None]  # padded rows weigh nothing
        terms = {
            name: _layer_terms(kind, p_BxC, m_B, a if u is None else a @ u, b if v is None else b @ v)
            for (name, _), a, b, (u, v) in zip(layers, inputs, b_per_layer, bases)
        }
        label = jnp.take_along_axis(logits_BxC, y_B[:, None], axis=-1)[:, 0]
        ll = m_B @ (label - jax.nn.logsumexp(logits_BxC, axis=-1))
        return {"params": terms}, ll

    def one(total, args):
        return jax.tree_util.tree_map(jnp.add, total, chunk_terms(args)), None

    shapes = jax.eval_shape(chunk_terms, (xs[0], ys[0], ms[0]))
    zero = jax.tree_util.tree_map(lambda t: jnp.zeros(t.shape, t.dtype), shapes)
    (out, ll), _ = jax.lax.scan(one, zero, (xs, ys, ms))
    if structure == "kron":  # A = Σ a aᵀ / n; a bias's input is 1
        out = {
            "params": {
                name: {
                    "bias": (jnp.ones((1, 1), dtype), f["bias"]),
                    "kernel": (f["kernel"][0] / n, f["kernel"][1]),
                }
                for name, f in out["params"].items()
            }
        }
    return out, ll


class EvidenceTrainer(Trainer):
    """The jitted functions of an ``l2="evidence"`` run (``num_train``: train ∪ validation).

    * ``train_epoch(state, x, y) -> (state, metrics)``: :meth:`run_epoch`, jitted: the epoch of
      :class:`~jaxl2.mnist.train.Trainer` with the state's λs, then, every ``evidence_every``-th
      epoch, the λ update; its metrics add ``l2/PATH`` (each λ at the end of the epoch) and
      ``log_evidence``;
    * ``curvature(params, x, y) -> jaxl2.Curvature`` of the selected leaves;
    * ``lambdas(state) -> {path: λ}``.

    Its validation images are training data, so the run keeps every epoch's params (the last
    epoch's are its model) and has no refit.
    """

    latest = True
    trains_on_val = True

    def __init__(self, cfg: Config, num_train: int, *, mesh: Any = None):
        super().__init__(cfg, num_train, mesh=mesh)
        self.paths = [p for p, _ in _select.resolve(abstract_params(self.cfg), self.select)]
        self.train_epoch = jax.jit(self.run_epoch)

    def state_of(self, params: Any, rng: jax.Array) -> EvidenceTrainState:
        """The state at step 0: every λ at ``l2_init``, no log evidence yet (NaN)."""
        log_l2 = jnp.full((len(self.paths),), np.log(self.cfg.l2_init), jnp.float32)
        nan = jnp.full((), jnp.nan, jnp.float32)
        s = super().state_of(params, rng)
        return EvidenceTrainState(s.step, s.params, s.opt_state, s.rng, log_l2, nan)

    def rules(self, log_l2: jax.Array) -> dict[str, jax.Array]:
        """``{path: λ}`` of ``ln λ`` per selected leaf."""
        return {p: jnp.exp(log_l2[i]) for i, p in enumerate(self.paths)}

    def lambdas(self, state: EvidenceTrainState) -> dict[str, float]:
        """``{path: λ}`` of ``state``, as Python floats."""
        return lambdas_of(self.paths, state.log_l2)

    def curvature(
        self, params: Any, x_NxD: jax.Array, y_N: jax.Array, key: jax.Array | None = None
    ) -> Curvature:
        """The selected leaves' GGN over ``x_NxD, y_N`` (``evidence_curvature``: :func:`dense_ggn`, or
        :func:`jaxl2.ggn_lanczos` with ``key``)."""
        structure = self.cfg.evidence_curvature
        if structure == "lanczos":
            return ggn_lanczos(
                lambda p, x: cast(jax.Array, self.model.apply(p, x)),  # logits, no mutable state
                params,
                x_NxD,
                y_N,
                key=jax.random.PRNGKey(0) if key is None else key,
                probes=LANCZOS_PROBES,
                steps=LANCZOS_STEPS,
                select=self.select,
            )
        tree, ll = dense_ggn(params, x_NxD, y_N, self.cfg.activation, structure)
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda t: isinstance(t, tuple))[0]
        by_path = {_select.path_str(kp): block for kp, block in flat}
        blocks = tuple(by_path[p] for p in self.paths)
        return Curvature(ll, blocks, int(x_NxD.shape[0]), tuple(self.paths), structure)

    def update(self, state: EvidenceTrainState, x_NxD: jax.Array, y_N: jax.Array) -> EvidenceTrainState:
        """The λ update at ``state.params`` (``evidence_method``), then the evidence at the new λs."""
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)  # the shuffle's: one fold
        curv = self.curvature(state.params, x_NxD, y_N, key)
        rules = evidence_l2(
            curv,
            state.params,
            self.rules(state.log_l2),
            select=self.select,
            shared=self.cfg.evidence_lambda == "shared",
            method=self.cfg.evidence_method,
            steps=self.cfg.evidence_steps,
            bounds=AUTO_L2_BOUNDS,
        )
        log_l2 = jnp.log(jnp.stack([rules[p] for p in self.paths])).astype(jnp.float32)
        evidence = log_evidence(curv, state.params, rules, select=self.select).astype(jnp.float32)
        return state.replace(log_l2=log_l2, log_evidence=evidence)

    def run_epoch(self, state: EvidenceTrainState, x_NxD, y_N, xv_MxD=None, yv_M=None):
        """An epoch with the state's λs, then, every ``evidence_every``-th epoch, the λ
        update (:meth:`update`) on the epoch's training data (train ∪ validation); its
        metrics add ``l2/PATH`` (each λ after it) and ``log_evidence``. The validation split
        is not used."""
        state, metrics = self.epoch_fn(state, x_NxD, y_N, self.rules(state.log_l2))
        epoch = state.step // self.steps_per_epoch
        due = epoch % self.cfg.evidence_every == 0
        state = jax.lax.cond(due, self.update, lambda st, *_: st, state, x_NxD, y_N)
        lam = jnp.exp(state.log_l2)
        for i, path in enumerate(self.paths):
            metrics[f"l2/{path}"] = lam[i]
        metrics["log_evidence"] = state.log_evidence
        return state, metrics

    def summary(self, state: EvidenceTrainState, rows: list[dict[str, Any]], best_epoch: int):
        """The penalty's λs: those the best (the last) epoch trained with, the row before's (an
        update ends an epoch); the summary gains ``l2_final`` and ``log_evidence``."""
        before = (
            l2_at(rows, best_epoch - 1) if best_epoch > 1 else dict.fromkeys(self.paths, self.cfg.l2_init)
        )
        evidence = float(state.log_evidence)
        return before, {
            "l2_final": self.lambdas(state),
            "log_evidence": evidence if np.isfinite(evidence) else None,
        }

    def refit_config(self, summary: dict[str, Any] | None) -> Config | None:
        """None: the run trained on train ∪ validation, so nothing is left to refit on."""
        return None
