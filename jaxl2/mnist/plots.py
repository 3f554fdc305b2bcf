"""PNG figures of a run: loss and accuracy against epoch, train vs validation; λ per layer
against epoch (``l2 auto``); for sweeps, accuracy and weight norm against λ."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def best_epoch(rows: Sequence[dict[str, Any]]) -> int:
    """The epoch with the best validation accuracy (ties: the later one, as the run keeps it)."""
    return max(rows, key=lambda r: (r["val_accuracy"], r["epoch"]))["epoch"]


def curves(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> dict[str, Any]:
    """Writes ``path``: data loss (and penalty) and accuracy per epoch from ``metrics.jsonl`` rows.

    The accuracy axis spans every epoch's values (train and validation), and the epoch the run
    keeps is marked on both panels: the best by validation accuracy, or with ``l2 evidence``
    (rows with ``log_evidence``; its validation images are training data) the last. Returns
    ``{"best_epoch", "accuracy_limits", "epoch_ticks"}`` (what was drawn).
    """
    if not rows:
        return {"best_epoch": None, "accuracy_limits": None, "epoch_ticks": []}
    ep = [r["epoch"] for r in rows]
    fig = _figure((9, 3.4))
    ax_l, ax_a = fig.subplots(1, 2)
    ax_l.plot(ep, [r["train_data_loss"] for r in rows], label="train cross-entropy")
    ax_l.plot(ep, [r["val_data_loss"] for r in rows], label="validation cross-entropy")
    ax_l.plot(ep, [r["train_penalty"] for r in rows], label="penalty λ/2·Σw²", ls="--")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("loss")
    ax_l.legend(fontsize=8)
    acc = [100 * r[k] for r in rows for k in ("train_accuracy", "val_accuracy")]
    ax_a.plot(ep, [100 * r["train_accuracy"] for r in rows], label="train")
    ax_a.plot(ep, [100 * r["val_accuracy"] for r in rows], label="validation")
    last = "log_evidence" in rows[0]
    best = ep[-1] if last else best_epoch(rows)
    best_val = next(100 * r["val_accuracy"] for r in rows if r["epoch"] == best)
    for ax in (ax_l, ax_a):
        ax.axvline(best, color="k", ls=":", lw=1)
    what = "the model (last epoch; validation is training data)" if last else "best validation"
    ax_a.plot([best], [best_val], "k*", ms=9, label=f"{what}: epoch {best}, {best_val:.2f}%")
    ax_a.set_xlabel("epoch")
    ax_a.set_ylabel("accuracy (%)")
    limits = (max(0.0, min(acc) - 2), min(100.0, max(acc)) + 1)
    ax_a.set_ylim(*limits)
    ax_a.legend(fontsize=8)
    _whole_epochs(ax_l, ax_a)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90)
    low, high = ax_a.get_xlim()
    ticks = [float(t) for t in ax_a.get_xticks() if low <= t <= high]
    return {"best_epoch": best, "accuracy_limits": limits, "epoch_ticks": ticks}


def _figure(size: tuple[float, float]) -> Any:
    """A new matplotlib ``Figure`` drawn with Agg, outside pyplot: no global state, so a
    figure may be drawn in a thread (the run plots while its refit trains), and pyplot's
    import is not paid."""
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def _whole_epochs(*axes: Any) -> None:
    """Epoch ticks at whole numbers only (a run of 3 epochs has no tick at 1.5)."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def sweep(rows: Sequence[dict[str, Any]], selected_l2: float, path: str, title: str = "") -> None:
    """Writes ``path``: train/validation accuracy and Σ‖W‖² against λ (mean ± std over seeds),
    titled ``title`` (default: the number of λs and seeds)."""
    import numpy as np

    lams = sorted({r["l2"] for r in rows})
    positive = [lam for lam in lams if lam > 0]
    linthresh = min(positive) if positive else 1.0

    def stat(key):
        vals = [[r[key] if not callable(key) else key(r) for r in rows if r["l2"] == lam] for lam in lams]
        return np.array([np.mean(v) for v in vals]), np.array([np.std(v) for v in vals])

    fig = _figure((9, 3.4))
    ax_a, ax_n = fig.subplots(1, 2)
    for key, label in (("train_accuracy", "train"), ("val_accuracy", "validation")):
        m, s = stat(key)
        ax_a.errorbar(lams, 100 * m, yerr=100 * s, marker="o", capsize=3, label=label)
    ax_a.axvline(selected_l2, color="k", ls=":", label=f"selected λ = {selected_l2:g}")
    ax_a.set_ylabel("accuracy (%)")
    m, s = stat(lambda r: sum(r["kernel_sq_norm"].values()))
    ax_n.errorbar(lams, m, yerr=s, marker="o", capsize=3, color="C2")
    ax_n.set_yscale("log")
    ax_n.set_ylabel("Σ‖W‖² over kernels")
    for ax in (ax_a, ax_n):
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xlim(-0.3 * linthresh, 1.5 * max(lams))
        ax.set_xlabel("λ (symlog: 0 at the left)")
    ax_a.legend(fontsize=8)
    seeds = len({r["seed"] for r in rows}) if all("seed" in r for r in rows) else 1
    fig.suptitle(title or f"λ sweep: {len(lams)} values × {seeds} seed{'s' * (seeds > 1)}", fontsize=9)
    fig.savefig(path, dpi=90)


def lambdas(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """Writes ``path``: each layer's λ (the ``l2/PATH`` columns of ``l2 auto``'s or ``l2
    evidence``'s ``metrics.jsonl``) against epoch, on a log scale, with the epoch the run keeps
    marked (as :func:`curves` does); below it, with ``l2 evidence``, the log evidence of each λ
    update; nothing without such columns.
    """
    layers = [k for k in rows[0] if k.startswith("l2/")] if rows else []
    if not layers:
        return
    ep = [r["epoch"] for r in rows]
    # the rows carry the last update's log evidence: one point per update
    evidence = [(r["epoch"], r["log_evidence"]) for r in rows if r.get("log_evidence") is not None]
    evidence = [pt for i, pt in enumerate(evidence) if i == 0 or pt[1] != evidence[i - 1][1]]
    last = "log_evidence" in rows[0]
    if last:
        fig = _figure((6, 5.4))
        ax, ax_e = fig.subplots(2, 1, sharex=True)
        ax_e.plot(*zip(*evidence), color="k", marker=".", lw=1)
        ax_e.set_ylabel("log evidence (nats)")
        ax_e.set_xlabel("epoch")
    else:
        fig = _figure((6, 3.4))
        ax = fig.subplots()
    for key in layers:
        ax.plot(ep, [r[key] for r in rows], label=key[len("l2/") :])
    if last:  # trained on train ∪ validation: the model is the last epoch's
        ax.axvline(ep[-1], color="k", ls=":", lw=1, label=f"the model: epoch {ep[-1]}")
    else:
        best = best_epoch(rows)
        ax.axvline(best, color="k", ls=":", lw=1, label=f"best validation: epoch {best}")
    ax.set_yscale("log")
    if not last:
        ax.set_xlabel("epoch")
    ax.set_ylabel("λ (end of epoch)")
    ax.legend(fontsize=8)
    _whole_epochs(ax)
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=90)
