"""A training run and its directory: config, metrics, checkpoints, curves, summary.

::

  DIR/config.json      the Config (and the jaxl2 version)
  DIR/metrics.jsonl    one JSON line per epoch, flushed and fsync-ed as it is written
  DIR/checkpoints/     orbax: the latest state (resume point), written every few epochs
  DIR/best/            orbax: the params with the best validation accuracy so far
  DIR/curves.png       loss and accuracy against epoch
  DIR/summary.json     what ``jaxl2 train --json`` prints

Orbax writes each checkpoint to a temporary directory and renames it, so a run killed at
any moment resumes from its last complete checkpoint and ends with the same parameters
as a run that was never stopped (every epoch's shuffle is keyed on the state's step).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2 import data as _data
from jaxl2 import parallel
from jaxl2.penalty import selected
from jaxl2.train import INITS, OPTIMIZERS, SCHEDULES, Config, Trainer, TrainState

__all__ = ["RunError", "Diverged", "Interrupted", "validate", "train_and_evaluate", "evaluate_run"]


class RunError(ValueError):
    """Bad input to a run: raised before anything is compiled or written."""


class Diverged(RuntimeError):
    """The loss or the parameters became NaN/Inf; the last good checkpoint is intact."""


class Interrupted(RuntimeError):
    """SIGINT arrived; the epoch it interrupted was finished and checkpointed."""


def _abstract_params(cfg: Config) -> Any:
    return jax.eval_shape(Trainer.model_of(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 784)))


def validate(cfg: Config, num_train: int | None = None) -> None:
    """Checks every field of ``cfg`` (and the selection against the model) without compiling."""

    def bad(what: str, allowed: str) -> RunError:
        return RunError(f"{what} ({allowed})")

    if cfg.optimizer not in OPTIMIZERS:
        raise bad(f"unknown optimizer {cfg.optimizer!r}", f"allowed: {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise bad(f"unknown schedule {cfg.schedule!r}", f"allowed: {', '.join(SCHEDULES)}")
    from jaxl2.model import ACTIVATIONS

    if cfg.activation not in ACTIVATIONS:
        raise bad(f"unknown activation {cfg.activation!r}", f"allowed: {', '.join(ACTIVATIONS)}")
    if not (np.isfinite(cfg.lr) and cfg.lr > 0):
        raise bad(f"--lr {cfg.lr} is invalid", "a finite number > 0")
    if not (np.isfinite(cfg.momentum) and 0 <= cfg.momentum < 1):
        raise bad(f"--momentum {cfg.momentum} is invalid", "0 <= momentum < 1")
    if not (np.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise bad(f"--weight-decay {cfg.weight_decay} is invalid", "a finite number >= 0")
    if cfg.init not in INITS:
        raise bad(f"unknown init {cfg.init!r}", f"allowed: {', '.join(INITS)}")
    if cfg.weight_decay and cfg.optimizer not in ("adamw", "sgdw"):
        raise bad(
            "--weight-decay is decay in the optimizer, for --optimizer adamw or sgdw only",
            "use --l2 for the other optimizers",
        )
    if cfg.epochs < 1:
        raise bad(f"--epochs {cfg.epochs} is invalid", "an integer >= 1")
    if cfg.batch_size < 1:
        raise bad(f"--batch-size {cfg.batch_size} is invalid", "an integer >= 1")
    if num_train is not None and cfg.batch_size > num_train:
        raise bad(
            f"--batch-size {cfg.batch_size} is larger than the training set",
            f"at most {num_train} for {cfg.dataset}",
        )
    if not cfg.hidden or any(h < 1 for h in cfg.hidden):
        raise bad(
            f"--hidden {','.join(map(str, cfg.hidden))} is invalid",
            "comma-separated positive widths, e.g. 256,256",
        )
    try:
        selected(_abstract_params(cfg), cfg.l2, select=Trainer.selector_of(cfg))
    except ValueError as e:
        raise RunError(str(e)) from None


# -- the run directory ---------------------------------------------------------------------


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def read_metrics(path: str, upto_epoch: int | None = None) -> list[dict[str, Any]]:
    """The complete lines of ``metrics.jsonl`` (a torn last line is dropped), up to an epoch."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn by a kill mid-write
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if upto_epoch is not None and row["epoch"] > upto_epoch:
                break
            rows.append(row)
    return rows


def _prepare_dir(out: str, cfg: Config, resume: bool, overwrite: bool) -> None:
    cfg_path = os.path.join(out, "config.json")
    if resume:
        if not os.path.exists(os.path.join(out, "checkpoints")):
            raise RunError(f"--resume: {out} holds no checkpoint (expected {out}/checkpoints)")
        return
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            what = "a different run" if os.path.exists(cfg_path) else "other files"
            raise RunError(
                f"--out {out} already holds {what} (use --resume to continue it, "
                "--overwrite to replace it, or another --out)"
            )
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    _write_json(cfg_path, {**cfg.to_json(), "jaxl2_version": _version()})


def _version() -> str:
    from jaxl2 import __version__

    return __version__


def load_config(out: str) -> Config:
    path = os.path.join(out, "config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(
            f"{path}: cannot read the run's config ({e}); is {out} a jaxl2 run directory?"
        ) from None
    d.pop("jaxl2_version", None)
    try:
        return Config.from_json(d)
    except TypeError as e:
        raise RunError(f"{path}: not a jaxl2 run config ({e})") from None


class _Checkpoints:
    """Two orbax managers: ``checkpoints/`` (latest run state) and ``best/`` (params)."""

    def __init__(self, out: str):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        opts = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
        self.latest = ocp.CheckpointManager(os.path.abspath(os.path.join(out, "checkpoints")), options=opts)
        self.best = ocp.CheckpointManager(os.path.abspath(os.path.join(out, "best")), options=opts)

    def save(self, epoch: int, run_state: dict, best_epoch: int) -> None:
        if best_epoch > 0 and self.best.latest_step() != best_epoch:
            self.best.save(best_epoch, args=self.ocp.args.StandardSave(run_state["best_params"]))
        self.latest.save(epoch, args=self.ocp.args.StandardSave(run_state), force=True)

    def restore_latest(self, like: dict) -> tuple[int, dict]:
        step = self.latest.latest_step()
        if step is None:
            raise RunError("--resume: the run has no complete checkpoint yet")
        abstract = jax.tree_util.tree_map(self.ocp.utils.to_shape_dtype_struct, like)
        try:
            return step, self.latest.restore(step, args=self.ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError) as e:
            raise RunError(f"--resume: the checkpoint does not fit this model ({str(e)[:200]})") from None

    def restore_best(self, like: Any) -> Any:
        step = self.best.latest_step()
        if step is None:
            raise RunError("the run has no best checkpoint (it stopped before its first save)")
        abstract = jax.tree_util.tree_map(self.ocp.utils.to_shape_dtype_struct, like)
        return self.best.restore(step, args=self.ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.latest.close()
        self.best.close()


# -- training ------------------------------------------------------------------------------


def kernel_sq_norm(params: Any, cfg: Config) -> dict[str, float]:
    """Σw² of every selected leaf, by path."""
    rows = selected(params, select=Trainer.selector_of(cfg))
    from jaxl2 import select as _select

    leaves = dict(_select.leaves(params))
    return {r.path: float(np.sum(np.square(np.asarray(leaves[r.path], np.float64)))) for r in rows}


def _device() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        import platform

        model = ""
        try:
            with open("/proc/cpuinfo") as f:
                model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        except OSError:
            pass
        return f"cpu: {model or platform.processor() or 'unknown'} ({os.cpu_count()} cores)"
    return f"{d.platform}: {getattr(d, 'device_kind', '')} × {jax.device_count()}"


def _as_float(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda v: float(v), tree)


def train_and_evaluate(
    cfg: Config,
    out: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: int = 10,
    on_start: Callable[[], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    devices: int | None = None,
) -> dict[str, Any]:
    """Trains ``cfg`` into the run directory ``out`` and returns the summary.

    ``devices`` (default: all) > 1, or several processes, trains data-parallel over a 1-D mesh:
    the batch is split along ``data``, params are replicated (see :mod:`jaxl2.parallel`); only
    process 0 writes the run directory's files (orbax coordinates the checkpoints).

    ``on_start()`` is called once the input is validated (before compiling), ``on_epoch(row)``
    after every epoch with its ``metrics.jsonl`` row. The summary's accuracies and norms are those of the **best** parameters by validation
    accuracy (what ``jaxl2 eval`` loads); ``final_val_accuracy`` is the last epoch's.
    """
    if checkpoint_every < 1:
        raise RunError(f"--checkpoint-every {checkpoint_every} is invalid (an integer >= 1)")
    ds = _data.load(cfg.dataset, data_dir=cfg.data_dir, val_size=cfg.val_size, split_seed=cfg.split_seed)
    if ds.train is None:
        raise RunError(f"{cfg.dataset} has no training split (train-images/labels files)")
    if ds.test is None:
        raise RunError(f"{cfg.dataset} has no test split (t10k-images/labels files)")
    validate(cfg, len(ds.train.y))
    n_dev = jax.device_count() if devices is None else devices
    mesh = None
    if n_dev > 1 or jax.process_count() > 1:
        mesh = parallel.make_mesh(n_dev)
        parallel.check_batch(cfg.batch_size, n_dev)
    primary = jax.process_index() == 0
    if primary:
        _prepare_dir(out, cfg, resume, overwrite)
    if on_start:
        on_start()

    trainer = Trainer(cfg, len(ds.train.y), mesh=mesh)
    x_tr, y_tr = parallel.put(ds.train.x, mesh), parallel.put(ds.train.y, mesh)
    x_va, y_va = parallel.put(ds.val.x, mesh), parallel.put(ds.val.y, mesh)
    ckpt = _Checkpoints(out)
    metrics_path = os.path.join(out, "metrics.jsonl")

    state = parallel.replicate(trainer.init(), mesh)
    run = {
        "state": state,
        "best_params": state.params,
        "best_val": np.array(-1, np.float32),
        "best_epoch": np.array(0, np.int32),
    }
    start = 0
    if resume:
        start, run = ckpt.restore_latest(run)
        if primary:
            rows = read_metrics(metrics_path, upto_epoch=start)
            with open(metrics_path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            os.replace(metrics_path + ".tmp", metrics_path)
    state: TrainState = run["state"]
    best_params = parallel.host(run["best_params"])
    best_val, best_epoch = float(run["best_val"]), int(run["best_epoch"])

    stop = {"sigint": False}
    old_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(sigint=True))
    train_seconds = 0.0
    try:
        t0 = time.perf_counter()
        train_epoch = trainer.train_epoch.lower(state, x_tr, y_tr).compile()
        compile_seconds = time.perf_counter() - t0
        with open(metrics_path, "a") if primary else contextlib.nullcontext() as mfile:
            for epoch in range(start + 1, cfg.epochs + 1):
                t0 = time.perf_counter()
                new_state, m = train_epoch(state, x_tr, y_tr)
                m = parallel.host(m)
                dt = time.perf_counter() - t0
                train_seconds += dt
                if int(m["nonfinite_step"]) >= 0 or not np.isfinite(m["loss"]):
                    s = int(m["nonfinite_step"])
                    raise Diverged(
                        f"the loss became NaN/Inf at epoch {epoch}, step {s + 1} of "
                        f"{trainer.steps_per_epoch} (lr {cfg.lr}, λ {cfg.l2}, λ·lr "
                        f"{_lam_lr(cfg)}): the learning rate (or λ·lr) is too large; lower "
                        f"--lr. {_last_good(ckpt)}"
                    )
                state = new_state
                val = _as_float(parallel.host(trainer.evaluate(state.params, x_va, y_va)))
                if val["accuracy"] >= best_val:
                    best_val, best_epoch = val["accuracy"], epoch
                    best_params = parallel.host(state.params)
                row = {
                    "epoch": epoch,
                    "step": int(state.step),
                    **{f"train_{k}": float(v) for k, v in m.items() if k != "nonfinite_step"},
                    "val_loss": val["loss"],
                    "val_accuracy": val["accuracy"],
                    "epoch_seconds": dt,
                }
                if primary:
                    mfile.write(json.dumps(row) + "\n")
                    mfile.flush()
                    os.fsync(mfile.fileno())
                last = epoch == cfg.epochs
                if last or stop["sigint"] or epoch % checkpoint_every == 0:
                    ckpt.save(
                        epoch,
                        {
                            "state": state,
                            "best_params": best_params,
                            "best_val": np.array(best_val, np.float32),
                            "best_epoch": np.array(best_epoch, np.int32),
                        },
                        best_epoch,
                    )
                if on_epoch:
                    on_epoch(row)
                if stop["sigint"] and not last:
                    raise Interrupted(f"interrupted after epoch {epoch}; checkpoint saved in {out}")
    finally:
        signal.signal(signal.SIGINT, old_handler)
        ckpt.close()

    rows = read_metrics(metrics_path)
    from jaxl2.plots import curves

    if primary:
        curves(rows, os.path.join(out, "curves.png"), title=f"{cfg.dataset}, {cfg.optimizer}, λ={cfg.l2}")
    epochs_run = cfg.epochs - start
    n_steps = epochs_run * trainer.steps_per_epoch * cfg.batch_size
    summary = {
        **_final_metrics(trainer, cfg, best_params, ds),
        "best_epoch": best_epoch,
        "final_val_accuracy": rows[-1]["val_accuracy"] if rows else None,
        "epochs": cfg.epochs,
        "seconds": train_seconds,
        "compile_seconds": compile_seconds,
        "examples_per_second": n_steps / train_seconds if train_seconds else None,
        "device": _device(),
        "out": out,
    }
    if primary:
        _write_json(os.path.join(out, "summary.json"), summary)
    return summary


def _last_good(ckpt: _Checkpoints) -> str:
    step = ckpt.latest.latest_step()
    if step is None:
        return "No checkpoint had been written yet."
    return f"The last good checkpoint (epoch {step}) is intact."


def _lam_lr(cfg: Config) -> str:
    if isinstance(cfg.l2, dict):
        return "per-layer"
    return f"{cfg.l2 * cfg.lr:g}"


def _final_metrics(trainer: Trainer, cfg: Config, params: Any, ds: _data.Dataset) -> dict[str, Any]:
    from jaxl2.penalty import l2_penalty

    res = {}
    for name, split in (("train", ds.train), ("val", ds.val), ("test", ds.test)):
        ev = _as_float(trainer.evaluate(params, split.x, split.y))
        res[f"{name}_accuracy"], res[f"{name}_loss"] = ev["accuracy"], ev["loss"]
    res["penalty"] = float(l2_penalty(params, cfg.l2, select=Trainer.selector_of(cfg)))
    res["kernel_sq_norm"] = kernel_sq_norm(params, cfg)
    return res


def evaluate_run(out: str, spec: str, split: str = "test", data_dir: str | None = None) -> dict[str, Any]:
    """Loss and accuracy of a run's best checkpoint on ``split`` of dataset ``spec``."""
    cfg = load_config(out)
    if not os.path.isdir(os.path.join(out, "best")):
        raise RunError(f"--run {out} has no best checkpoint (expected {out}/best)")
    if split not in ("train", "val", "test"):
        raise RunError(f"--split {split!r} is invalid (allowed: train, val, test)")
    ds = _data.load(
        spec,
        data_dir=data_dir,
        val_size=cfg.val_size if spec == cfg.dataset else None,
        split_seed=cfg.split_seed,
    )
    part = getattr(ds, split)
    if part is None:
        raise RunError(f"{spec} has no {split} split")
    ckpt = _Checkpoints(out)
    try:
        params = ckpt.restore_best(_abstract_params(cfg))
    finally:
        ckpt.close()
    trainer = Trainer(cfg, cfg.batch_size)  # evaluation only: num_train just sizes the lr schedule
    ev = _as_float(trainer.evaluate(params, part.x, part.y))
    return {"accuracy": ev["accuracy"], "loss": ev["loss"], "n": int(len(part.y))}
