"""jaxl2/mnist/plots.py: the curves of a run."""


def test_curves_show_every_epoch_and_mark_the_best(tmp_path):
    from jaxl2.mnist.plots import curves

    acc = [0.11, 0.6, 0.9, 0.95, 0.93]
    rows = [
        {
            "epoch": i + 1,
            "train_data_loss": 1.0 / (i + 1),
            "val_data_loss": 1.0 / (i + 1),
            "train_penalty": 0.01,
            "train_accuracy": min(1.0, a + 0.02),
            "val_accuracy": a,
        }
        for i, a in enumerate(acc)
    ]
    info = curves(rows, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert info["best_epoch"] == 4
    low, high = info["accuracy_limits"]
    assert low <= 100 * min(acc) and high >= 100 * max(a + 0.02 for a in acc)
    short = curves(rows[:3], str(tmp_path / "short.png"))  # 3 epochs: matplotlib alone ticks 1.5
    assert short["epoch_ticks"] and all(t == int(t) for t in short["epoch_ticks"]), short
