"""PNG figures of a run: loss and accuracy against epoch, train vs validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def curves(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """Writes ``path``: data loss (and penalty) and accuracy per epoch from ``metrics.jsonl`` rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    ax_l.plot(ep, [r["train_data_loss"] for r in rows], label="train cross-entropy")
    ax_l.plot(ep, [r["val_loss"] for r in rows], label="validation cross-entropy")
    ax_l.plot(ep, [r["train_penalty"] for r in rows], label="penalty λ/2·Σw²", ls="--")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("loss")
    ax_l.legend(fontsize=8)
    ax_a.plot(ep, [100 * r["train_accuracy"] for r in rows], label="train")
    ax_a.plot(ep, [100 * r["val_accuracy"] for r in rows], label="validation")
    ax_a.set_xlabel("epoch")
    ax_a.set_ylabel("accuracy (%)")
    ax_a.set_ylim(max(0, min(100 * r["val_accuracy"] for r in rows) - 5), 100.5)
    ax_a.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)
