"""``jaxl2 bench``: how close jaxl2's training path comes to the machine's limit.

Everything is measured side by side in one process, interleaved (A B, B A, …) over several
rounds; medians and min–max are reported. The ceiling is the large float32 GEMM rate divided
by the training FLOPs per example (:func:`flops_per_example`: 1,211,392 for 784-256-256-10),
cross-checked against XLA's ``cost_analysis()`` of the compiled step. The shape ceiling
(:func:`shape_ceiling`) uses the rates of the model's own, smaller GEMMs instead: what the step
would reach if it were nothing but its matrix multiplies.

``jaxl2 train`` is timed against its peers on two workloads: ``mnist5k`` (3,500 training and
500 validation images, 15 epochs) and ``full-size`` (:func:`full_size_idx`: 55,000 training
and 5,000 validation images, the size of full MNIST, 3 epochs).

Example:
  >>> from jaxl2.mnist.bench import flops_per_example
  >>> flops_per_example((784, 256, 256, 10))
  1211392
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2.mnist.config import INPUT_DIM, NUM_CLASSES, Config, RunSettings
from jaxl2.mnist.data import load
from jaxl2.mnist.runtime import device_name
from jaxl2.mnist.sources import write_idx
from jaxl2.mnist.sweep import SweepTrainer
from jaxl2.mnist.train import Trainer

__all__ = [
    "run_bench",
    "format_bench",
    "targets",
    "train_path",
    "hand_written_epoch",
    "flops_per_example",
    "xla_flops_per_example",
    "gemm_rates",
    "throughput",
]

SIZES = (INPUT_DIM, *Config().hidden, NUM_CLASSES)  # the reference MLP: 784-256-256-10
PATH_EPOCHS = 15  # the train-path comparison: mnist5k's 3,500 training images, 15 epochs
FULL_SIZE, FULL_EPOCHS = 60_000, 3  # the second workload: full MNIST's size (5,000 of it validated)
PATH_LR, PATH_L2 = 0.01, 1e-3  # plain SGD, constant lr, L2 on the three kernels (as every peer)
PATH_RECIPE = Config(optimizer="sgd", schedule="constant", lr=PATH_LR, l2=PATH_L2)
L2_PAIRS_PER_ROUND = 3  # the L2 overhead is ~0 by construction: its ratio needs many pairs to read so


def flops_per_example(sizes: Sequence[int]) -> int:
    """Training FLOPs for one example of an MLP with layer ``sizes`` (e.g. 784, 256, 256, 10).

    Forward ``2·Σ d_in·d_out``, weight gradients the same again, and input gradients for
    every layer but the first (its input is data): 1,211,392 for 784-256-256-10.
    """
    pairs = list(zip(sizes[:-1], sizes[1:]))
    macs = sum(a * b for a, b in pairs)
    return 2 * macs + 2 * macs + 2 * sum(a * b for a, b in pairs[1:])


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _rate(examples: int, seconds: list[float]) -> dict[str, float]:
    """``_stats`` of examples/s, given the seconds that ``examples`` took in each round."""
    return _stats([examples / t for t in seconds])


def _interleave(fns: Mapping[Any, Callable[[], float]], rounds: int) -> dict[Any, list[float]]:
    """Runs each timing function once per round, in turn, the order reversed every other round
    (A B, B A, …: whatever drifts within a round favours no one); returns the seconds of each."""
    out: dict[Any, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in list(fns) if r % 2 == 0 else reversed(list(fns)):
            out[k].append(fns[k]())
    return out


def _seconds(fn: Callable[[], Any]) -> float:
    """Seconds of ``fn()``, until its result is ready."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def _epoch_timer(epoch: Any, state: Any, *args: Any) -> tuple[Callable[[], float], float]:
    """Compiles the jitted ``epoch(state, *args) -> (state, metrics)`` and runs it once (a
    warm-up); returns a timing function (each call goes one epoch on from the last call's state
    and returns its seconds) and the seconds that compiling took."""
    t0 = time.perf_counter()
    compiled = epoch.lower(state, *args).compile()
    compile_seconds = time.perf_counter() - t0
    box = [state]

    def step() -> Any:
        box[0], metrics = compiled(box[0], *args)
        return metrics

    step()
    return lambda: _seconds(step), compile_seconds


def _random_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uniform [0, 1) images and labels (throughput does not depend on the values)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(n, INPUT_DIM)).astype(np.float32)
    return x, rng.integers(0, NUM_CLASSES, n).astype(np.int32)


def gemm_rates(rounds: int, n: int = 2048) -> dict[str, Any]:
    """float32 ``jnp.dot`` GFLOP/s for an n×n square and for the model's forward shapes."""
    shapes = {f"{n}x{n}x{n}": (n, n, n)}
    for b in (128, 1024):
        shapes.update({f"{b}x{a}x{c}": (b, a, c) for a, c in zip(SIZES[:-1], SIZES[1:])})
    dot = jax.jit(jnp.dot)
    fns = {}
    for name, (m, k, n_) in shapes.items():
        x, w = jnp.ones((m, k), jnp.float32), jnp.ones((k, n_), jnp.float32)
        reps = max(1, int(2e9 // (2 * m * k * n_)))
        dot(x, w).block_until_ready()

        def timed(x=x, w=w, reps=reps):
            return _seconds(lambda: [dot(x, w) for _ in range(reps)]) / reps

        fns[name] = timed
    times = _interleave(fns, rounds)
    return {name: _stats([2 * math.prod(shapes[name]) / t / 1e9 for t in ts]) for name, ts in times.items()}


def shape_ceiling(gemm: dict[str, Any], batch: int) -> float:
    """examples/s if the step were nothing but its GEMMs, each at the rate measured for its
    layer's forward shape at this batch (forward and weight gradient of every layer, input
    gradient of all but the first): the limit that small matrices themselves set."""
    seconds = 0.0
    for i, (a, c) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        rate = gemm[f"{batch}x{a}x{c}"]["median"] * 1e9
        seconds += (2 if i == 0 else 3) * 2 * batch * a * c / rate
    return batch / seconds


def xla_flops_per_example(batch: int) -> float:
    """FLOPs per example of the compiled SGD train step, from XLA's cost analysis."""
    tr = Trainer(Config(batch_size=batch, optimizer="sgd", schedule="constant"), 10 * batch)
    batch_xy = (jnp.zeros((batch, INPUT_DIM), jnp.float32), jnp.zeros((batch,), jnp.int32))
    ca = jax.jit(tr.step_fn).lower(tr.init(), batch_xy).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    assert ca is not None, "XLA gave no cost analysis"
    return float(ca["flops"]) / batch


def throughput(batch: int, n: int, rounds: int) -> dict[str, Any]:
    """examples/s of whole epochs through ``Trainer.train_epoch``, with and without L2, interleaved
    (``L2_PAIRS_PER_ROUND`` pairs per round)."""
    x, y = jax.device_put(_random_data(n))
    cfg = Config(batch_size=batch, epochs=1000)
    fns, compile_s = {}, {}
    for name, c in (("l2", cfg), ("no_l2", dataclasses.replace(cfg, l2=0.0))):  # l2=0 adds no penalty
        tr = Trainer(c, n)
        fns[name], compile_s[name] = _epoch_timer(tr.train_epoch, tr.init(), x, y)
    times = _interleave(fns, rounds * L2_PAIRS_PER_ROUND)
    ex = (n // batch) * batch
    return {
        "examples_per_second": _rate(ex, times["l2"]),
        "examples_per_second_no_l2": _rate(ex, times["no_l2"]),
        "l2_overhead": _stats([a / b - 1 for a, b in zip(times["l2"], times["no_l2"])]),
        "epoch_compile_seconds": compile_s["l2"],
    }


def sweep_scaling(members: tuple[int, ...], n: int, rounds: int) -> dict[str, Any]:
    """Seconds per member of one vmapped (and lax.map) epoch for K members, relative to K = 1."""
    x, y = jax.device_put(_random_data(n))
    tr = Trainer(Config(epochs=1000), n)
    out: dict[str, Any] = {}
    for execution in ("vmap", "sequential"):
        fns = {}
        for k in members:
            sw = SweepTrainer(tr, execution)
            fns[k], _ = _epoch_timer(
                sw.epoch, sw.init(list(range(k))), x, y, jnp.full((k,), 1e-3, jnp.float32)
            )
        times = _interleave(fns, rounds)
        per_member = {k: statistics.median(ts) / k for k, ts in times.items()}
        out[execution] = {
            str(k): {"seconds_per_member": t, "relative_to_1": t / per_member[members[0]]}
            for k, t in per_member.items()
        }
    return out


_PROBE = """
import sys, time
t0 = float(sys.argv[1])
import jax, jax.numpy as jnp
if sys.argv[2] == "floor":
    jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.float32(1)))
else:  # the default recipe's first step on mnist5k, with the cache in $JAXL2_CACHE_DIR
    from jaxl2.mnist.config import Config
    from jaxl2.mnist.data import load
    from jaxl2.mnist.runtime import enable_compilation_cache
    from jaxl2.mnist.train import Trainer
    enable_compilation_cache()
    d = load("mnist5k")
    tr = Trainer(Config(), len(d.train.y))
    jax.block_until_ready(tr.train_step(tr.init(), (d.train.x[:128], d.train.y[:128])))
print(time.time() - t0)
"""


def _child(argv: list[str], cache: str, what: str, timeout: float = 300) -> str:
    """The stdout of ``python ARGV`` in a new process with ``JAXL2_CACHE_DIR=cache``."""
    env = {**os.environ, "JAXL2_CACHE_DIR": cache}
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed: {r.stderr.strip().splitlines()[-1:]}")
    return r.stdout


def startup(rounds: int) -> dict[str, Any]:
    """Process start → first trained step (the default recipe on mnist5k), cold (empty jaxl2
    cache: nothing compiled, mnist5k not parsed) and warm (the same process run again), beside
    its **floor**: process start → ``import jax`` and a first trivial ``jit``, in the same round.
    ``*_over_floor``: the per-round differences."""
    out: dict[str, list[float]] = {"floor": [], "cold": [], "warm": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as cache:
            for which in out:  # floor, then cold (nothing compiled or parsed yet), then warm
                argv = ["-c", _PROBE, repr(time.time()), which]
                out[which].append(float(_child(argv, cache, "start-up probe").split()[-1]))
    over = {k: [t - f for t, f in zip(out[k], out["floor"])] for k in ("cold", "warm")}
    return {
        **{f"{k}_seconds": _stats(v) for k, v in out.items()},
        **{f"{k}_over_floor_seconds": _stats(v) for k, v in over.items()},
    }


def default_command(quick: bool = False) -> dict[str, Any]:
    """``jaxl2 train`` with its defaults (``quick``: ``--epochs 2``) as a new process, with a new
    compilation cache (``cold``) and again with it filled (``warm``): the wall time from launch
    to exit beside the run's own training + refit seconds (``--json``), and their ratio."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as root:
        for which in ("cold", "warm"):
            argv = ["-m", "jaxl2", "train", "--json", "--out", os.path.join(root, which)]
            if quick:
                argv += ["--epochs", "2"]
            t0 = time.perf_counter()
            s = json.loads(_child(argv, os.path.join(root, "cache"), "jaxl2 train", 900))
            wall = time.perf_counter() - t0
            refit = s.get("refit_seconds", 0.0)
            out[which] = {
                "wall_seconds": wall,
                "training_seconds": s["seconds"],
                "refit_seconds": refit,
                "compile_seconds": s["compile_seconds"] + s.get("refit_compile_seconds", 0.0),
                "wall_over_compute": wall / (s["seconds"] + refit),
            }
    return out


def hand_written_epoch(
    batch: int, lr: float = PATH_LR, l2: float = PATH_L2
) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """The peer ``jaxl2 train`` must match: a minimal hand-written jitted JAX epoch, the way a
    careful user writes it without jaxl2 — params a list of ``(w, b)``, loss
    ``CE + λ/2·Σ‖w‖²``, ``jax.grad``, plain SGD, ``lax.scan`` over a permutation of data held on
    the device, params and key donated, no metrics at all.

    Returns ``init(seed) -> (params, key)``, ``epoch(params, key, x, y) -> (params, key)`` and
    ``evaluate(params, x, y) -> (data loss, accuracy)`` (jitted).
    """

    def init(seed: int):
        key, *keys = jax.random.split(jax.random.PRNGKey(seed), len(SIZES))
        layers = zip(keys, SIZES[:-1], SIZES[1:])
        return [(jax.random.normal(k, (a, c)) / np.sqrt(a), jnp.zeros(c)) for k, a, c in layers], key

    def logits(params, x):
        for w, b in params[:-1]:
            x = jax.nn.relu(x @ w + b)
        w, b = params[-1]
        return x @ w + b

    def cross_entropy(h, y):
        return jnp.mean(jax.nn.logsumexp(h, -1) - jnp.take_along_axis(h, y[:, None], -1)[:, 0])

    def loss(params, x, y):
        return cross_entropy(logits(params, x), y) + l2 / 2 * sum(jnp.sum(w * w) for w, _ in params)

    @jax.jit
    def evaluate(params, x, y):
        h = logits(params, x)
        return cross_entropy(h, y), jnp.mean(jnp.argmax(h, -1) == y)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def epoch(params, key, x, y):
        key, k = jax.random.split(key)
        steps = x.shape[0] // batch
        perm = jax.random.permutation(k, x.shape[0])[: steps * batch].reshape(steps, batch)

        def sgd_step(p, idx):
            g = jax.grad(loss)(p, x[idx], y[idx])
            return jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g), None

        return jax.lax.scan(sgd_step, params, perm)[0], key

    return init, epoch, evaluate


def _hand_written_timer(batch: int, x, y, epochs: int, val: tuple | None = None) -> Callable[[], float]:
    """Seconds of ``epochs`` hand-written epochs dispatched back to back (no host round-trip at
    all); with ``val = (x_val, y_val)`` each epoch is followed by the same evaluation as jaxl2's.

    Each round builds its executables anew (new functions, compiled before the clock starts) and
    times their first execution, as ``jaxl2 train`` compiles new programs in every round and
    times theirs: a new executable's first epoch runs tens of ms slower on a CPU (XLA's kernels
    set themselves up on first use), and a warm peer would not pay it."""

    def timed():
        init, epoch, evaluate = hand_written_epoch(batch)
        params, key = init(0)
        epoch_c = epoch.lower(params, key, x, y).compile()
        evaluate_c = evaluate.lower(params, *val).compile() if val else None
        jax.block_until_ready((params, key))
        t = time.perf_counter()
        for _ in range(epochs):
            params, key = epoch_c(params, key, x, y)
            last = evaluate_c(params, *val) if evaluate_c else params
        jax.block_until_ready((params, last))
        return time.perf_counter() - t

    return timed


def _torch_peer(batch: int, x_np: np.ndarray, y_np: np.ndarray) -> tuple[Callable[[], None], dict] | None:
    """PyTorch eager: ``torch.optim.SGD`` with ``weight_decay`` on the weights only; on the GPU
    (data resident there, as jaxl2's) when JAX runs on one and PyTorch sees CUDA."""
    try:
        import torch
    except ImportError:
        return None
    dev = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    nn = torch.nn
    linear = [nn.Linear(a, c) for a, c in zip(SIZES[:-1], SIZES[1:])]
    model = nn.Sequential(linear[0], nn.ReLU(), linear[1], nn.ReLU(), linear[2]).to(dev)
    groups = [
        {"params": [m.weight for m in linear], "weight_decay": PATH_L2},
        {"params": [m.bias for m in linear]},
    ]
    opt = torch.optim.SGD(groups, lr=PATH_LR, weight_decay=0.0)
    x, y = torch.from_numpy(x_np).to(dev), torch.from_numpy(y_np).long().to(dev)

    def epoch():
        perm = torch.randperm(len(y), device=dev)
        for i in range(len(y) // batch):
            idx = perm[i * batch : (i + 1) * batch]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()

    return epoch, {"threads": torch.get_num_threads(), "version": torch.__version__, "device": dev}


def _keras_peer(batch: int, x: np.ndarray, y: np.ndarray) -> tuple[Callable[[], None], dict] | None:
    """Keras 3 on TensorFlow: ``kernel_regularizer=L2(λ/2)``, ``jit_compile=True``, one
    ``steps_per_execution`` per epoch."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import keras
    except ImportError:
        return None
    if keras.backend.backend() != "tensorflow":
        return None
    reg = keras.regularizers.L2(PATH_L2 / 2)  # Keras adds L2·Σw²: this is jaxl2's λ
    hidden = [keras.layers.Dense(c, activation="relu", kernel_regularizer=reg) for c in SIZES[1:-1]]
    out = keras.layers.Dense(NUM_CLASSES, kernel_regularizer=reg)
    model = keras.Sequential([keras.Input((INPUT_DIM,)), *hidden, out])
    steps = len(y) // batch
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    sgd = keras.optimizers.SGD(PATH_LR)
    model.compile(optimizer=sgd, loss=loss, jit_compile=True, steps_per_execution=steps)

    def epoch():
        model.fit(x, y, batch_size=batch, epochs=1, steps_per_epoch=steps, shuffle=True, verbose=0)

    return epoch, {"version": keras.__version__}


def train_path(
    batch: int, rounds: int, epochs: int = PATH_EPOCHS, warm_up: bool = True, dataset: str = "mnist5k"
) -> dict[str, Any]:
    """``jaxl2 train`` against the peers on the same data (``dataset``'s training images,
    ``epochs`` epochs, SGD lr 0.01, L2 1e-3 on the weights), interleaved round by round: the hand-written
    jitted JAX epoch (:func:`hand_written_epoch`), and PyTorch eager and Keras 3 when they are
    installed; and, for equal work, the hand-written epoch followed by the same validation as
    jaxl2's (``jax_val``). ``jaxl2_speedup`` of a peer is the median over rounds of peer time ÷
    jaxl2 time (> 1: jaxl2 is faster).

    jaxl2's time is :func:`jaxl2.mnist.run.train_and_evaluate`'s summary ``seconds``: validation
    every epoch, ``metrics.jsonl``, checkpoints and best-params tracking, from the first epoch's
    dispatch to the last epoch's results (compiling, the final test evaluation, the plot and
    summary are not counted; no refit: that is a second training, timed apart in ``refit_seconds``).
    """
    from jaxl2.mnist.run import train_and_evaluate

    ds = load(dataset)
    x_np, y_np = ds.need("train")
    examples = epochs * (len(y_np) // batch) * batch
    x, y = jax.device_put((x_np, y_np))
    cfg = dataclasses.replace(PATH_RECIPE, dataset=dataset, batch_size=batch, epochs=epochs)
    info: dict[str, Any] = {"jax": {"version": jax.__version__}, "jax_val": {"version": jax.__version__}}
    with tempfile.TemporaryDirectory() as root:

        def jaxl2_train() -> float:
            run = train_and_evaluate(cfg, os.path.join(root, "run"), RunSettings(refit=False), overwrite=True)
            return run["seconds"]

        if warm_up:
            jaxl2_train()  # the first run in a process pays one-time costs
        fns = {
            "jaxl2": jaxl2_train,
            "jax": _hand_written_timer(batch, x, y, epochs),
            "jax_val": _hand_written_timer(batch, x, y, epochs, jax.device_put(tuple(ds.need("val")))),
        }
        for name, peer in (("torch", _torch_peer), ("keras", _keras_peer)):
            made = peer(batch, x_np, y_np)
            if made is not None:
                one_epoch, info[name] = made
                one_epoch()  # warm-up (Keras compiles here)

                def peer_epochs(one_epoch=one_epoch) -> float:
                    return _seconds(lambda: [one_epoch() for _ in range(epochs)])

                fns[name] = peer_epochs
        times = _interleave(fns, rounds)
    peers: dict[str, Any] = {"torch": None, "keras": None}
    for name in info:
        rate = _rate(examples, times[name])
        speedup = statistics.median(p / j for p, j in zip(times[name], times["jaxl2"]))
        peers[name] = {**info[name], "examples_per_second": rate, "jaxl2_speedup": speedup}
    return {
        "train_examples": len(y_np),
        "val_examples": len(ds.need("val").y),
        "epochs": epochs,
        "examples": examples,
        "examples_per_second": _rate(examples, times["jaxl2"]),
        "peers": peers,
    }


def full_size_idx(directory: str, n: int = FULL_SIZE) -> str:
    """Writes an IDX directory of full-MNIST size: ``n`` training images (mnist5k's 4,000
    training and validation images, repeated in turn) and mnist5k's 1,000 test images; returns
    its ``idx:DIR`` spec. ``jaxl2 train --dataset idx:DIR --val-size 5000`` then trains on
    55,000 and validates on 5,000 (the values repeat; the work per epoch is full MNIST's)."""
    ds = load("mnist5k")
    x = np.concatenate([ds.need("train").x, ds.need("val").x])
    y = np.concatenate([ds.need("train").y, ds.need("val").y])
    order = np.arange(n) % len(y)
    for stem, (xs, ys) in {"train": (x[order], y[order]), "t10k": tuple(ds.need("test"))}.items():
        images = np.rint(xs * 255).reshape(-1, 28, 28)
        write_idx(os.path.join(directory, f"{stem}-images-idx3-ubyte"), images, 2051)
        write_idx(os.path.join(directory, f"{stem}-labels-idx1-ubyte"), ys, 2049)
    return f"idx:{directory}"


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each performance target with its measured number: ``{"name", "value", "target", "met"}``
    (``target`` is the bound, ``at_least`` its direction)."""
    rows = []

    def add(name, value, bound, at_least=True):
        if value is not None:
            met = value >= bound if at_least else value <= bound
            rows.append({"name": name, "value": value, "target": bound, "at_least": at_least, "met": met})

    gpu = not r["device"].startswith("cpu")
    equal = "jaxl2 train ÷ hand-written JAX epoch + validation (equal work)"
    for w, paths in r["path"].items():
        for b, p in paths.items():
            if not gpu or w == "full-size":
                add(f"{equal}, {w}, batch {b}", p["peers"]["jax_val"]["jaxl2_speedup"], 0.9 if gpu else 1.0)
            if not gpu:
                torch = p["peers"]["torch"]
                add(f"jaxl2 train ÷ PyTorch eager, {w}, batch {b}", torch and torch["jaxl2_speedup"], 1.3)
    if not gpu and "full-size" in r["path"]:
        fraction = r["path"]["full-size"]["128"]["fraction_of_ceiling"]
        add("jaxl2 train, fraction of the GEMM ceiling, full-size, batch 128", fraction, 0.6)
    for b, t in r["train"].items():
        add(f"L2 overhead, batch {b} (median of paired rounds)", t["l2_overhead"]["median"], 0.02, False)
    for which, bound in (("warm", 0.5), ("cold", 2.0)):
        over = r["startup"][f"{which}_over_floor_seconds"]["median"]
        add(f"{which} start − its floor, seconds", over, bound, False)
    for which, d in r.get("command", {}).items():
        bound = 3 + 5 / (d["training_seconds"] + d["refit_seconds"]) if gpu else 1.3  # GPU: 3 × compute + 5 s
        name = f"default jaxl2 train ({which} cache), wall ÷ (training + refit)"
        add(name, d["wall_over_compute"], bound, False)
    if gpu:
        vm = r["sweep"]["vmap"]
        k = max(vm, key=int)
        add(f"{k}-member vmapped sweep ÷ one member, time", vm[k]["relative_to_1"] * int(k), 3.0, False)
    return rows


def run_bench(quick: bool = False, rounds: int | None = None) -> dict[str, Any]:
    """Every measurement of ``jaxl2 bench`` and :func:`targets`, as one JSON-able dict."""
    rounds = rounds or (1 if quick else 9)
    n = 4096 if quick else 60000
    fpe = flops_per_example(SIZES)
    res: dict[str, Any] = {"device": device_name(), "quick": quick, "rounds": rounds, "examples_per_epoch": n}
    gemm = res["gemm_gflops"] = gemm_rates(rounds, n=512 if quick else 2048)
    res["flops_per_example"] = fpe
    res["xla_flops_per_example"] = {str(b): xla_flops_per_example(b) for b in (128, 1024)}
    ceiling = res["ceiling_examples_per_second"] = next(iter(gemm.values()))["median"] * 1e9 / fpe
    res["path"], res["train"] = {}, {}
    with tempfile.TemporaryDirectory() as d:
        workloads = {  # name: (dataset, epochs)
            "mnist5k": ("mnist5k", 2 if quick else PATH_EPOCHS),
            "full-size": (full_size_idx(d, 10_000 if quick else FULL_SIZE), 1 if quick else FULL_EPOCHS),
        }
        for w, (spec, epochs) in workloads.items():
            res["path"][w] = {}
            for b in (128, 1024):
                p = train_path(b, rounds, epochs=epochs, warm_up=not quick, dataset=spec)
                p["fraction_of_ceiling"] = p["examples_per_second"]["median"] / ceiling
                res["path"][w][str(b)] = p
    for b in (128, 1024):
        t = throughput(b, n, rounds)
        speed = t["examples_per_second"]["median"]
        t["fraction_of_ceiling"] = speed / ceiling
        t["shape_ceiling_examples_per_second"] = shape_ceiling(gemm, b)
        t["fraction_of_shape_ceiling"] = speed / t["shape_ceiling_examples_per_second"]
        t["epoch_seconds_60k"] = 60000 / speed
        res["train"][str(b)] = t
    res["startup"] = startup(1 if quick else 3)
    res["command"] = default_command(quick)
    members = (1, 4) if quick else (1, 4, 16, 64) if jax.default_backend() == "gpu" else (1, 4, 16)
    res["sweep"] = sweep_scaling(members, 1024 if quick else 8192, rounds)
    res["targets"] = targets(res)
    return res


def mm(s: dict[str, float], scale: float = 1.0, fmt: str = "{:,.0f}") -> str:
    """``median (min–max)`` of a measurement."""
    median, low, high = (fmt.format(s[k] * scale) for k in ("median", "min", "max"))
    return f"{median} ({low}–{high})"


PEER_LABELS = {  # str.format templates over a peer's result; PyTorch on CUDA names no threads
    "jax": "hand-written jitted JAX epoch (jax {version})",
    "jax_val": "the same + jaxl2's validation every epoch (equal work)",
    "torch": "PyTorch eager ({version}, {threads} threads)",
    "torch_cuda": "PyTorch eager ({version}, CUDA)",
    "keras": "Keras {version} (TensorFlow, jit_compile, steps_per_execution)",
}


def format_bench(r: dict[str, Any]) -> str:
    """The human-readable report of :func:`run_bench`'s result."""
    (big, gemm), *shapes = r["gemm_gflops"].items()
    xla = r["xla_flops_per_example"]
    su = {k: mm(v, fmt="{:.2f}") for k, v in r["startup"].items()}
    lines = [
        f"device: {r['device']}   rounds: {r['rounds']} (interleaved; median (min–max))",
        "",
        f"float32 GEMM {big}: {mm(gemm, fmt='{:,.1f}')} GFLOP/s",
        *(f"  model shape {name}: {mm(s, fmt='{:,.1f}')} GFLOP/s" for name, s in shapes),
        f"FLOPs per training example: {r['flops_per_example']:,} (XLA cost analysis: "
        f"{xla['128']:,.0f} at batch 128, {xla['1024']:,.0f} at 1024)",
        f"ceiling: {r['ceiling_examples_per_second']:,.0f} examples/s",
        "",
    ]
    for paths in r["path"].values():
        for b, p in paths.items():
            lines.append(
                f"jaxl2 train ({p['train_examples']:,} training examples, {p['val_examples']:,} validated "
                f"every epoch, {p['epochs']} epochs), batch {b}: {mm(p['examples_per_second'])} examples/s, "
                f"{100 * p['fraction_of_ceiling']:.1f}% of the ceiling"
            )
            for name in ("jax", "jax_val", "torch", "keras"):
                q = p["peers"][name]
                if q is None:
                    lines.append(f"  {name}: not installed (optional peer)")
                    continue
                template = PEER_LABELS["torch_cuda" if q.get("device") == "cuda" else name]
                label = template.format(**q)
                rate = mm(q["examples_per_second"])
                lines.append(f"  {label}: {rate} examples/s: jaxl2 is {q['jaxl2_speedup']:.2f}×")
    lines += [
        "",
        f"{'batch':>5}  {'epoch only: examples/s (L2)':>28}  {'of ceiling':>10}  {'of shape ceiling':>22}  "
        f"{'L2 overhead':>22}  compile",
    ]
    for b, t in r["train"].items():
        shape = (
            f"{100 * t['fraction_of_shape_ceiling']:.1f}% of {t['shape_ceiling_examples_per_second']:,.0f}"
        )
        lines.append(
            f"{b:>5}  {mm(t['examples_per_second']):>28}  {100 * t['fraction_of_ceiling']:>9.1f}%  {shape:>22}  "
            f"{mm(t['l2_overhead'], 100, '{:+.1f}%'):>22}  {t['epoch_compile_seconds']:.2f} s"
        )
    lines += [
        "(shape ceiling: the step's GEMMs alone, at the rates measured for the model's own shapes)",
        f"start-up (process start → first trained step): cold {su['cold_seconds']} s, warm cache "
        f"{su['warm_seconds']} s; floor (import jax + a trivial jit) {su['floor_seconds']} s",
    ]
    for which, d in r.get("command", {}).items():
        lines.append(
            f"default jaxl2 train, {which} cache: {d['wall_seconds']:.1f} s wall for {d['training_seconds']:.2f} s "
            f"training + {d['refit_seconds']:.2f} s refit ({d['compile_seconds']:.2f} s compiling): "
            f"{d['wall_over_compute']:.2f}×"
        )
    for ex, rows in r["sweep"].items():
        per_k = (f"K={k} {v['seconds_per_member']:.3f} ({v['relative_to_1']:.2f}×)" for k, v in rows.items())
        lines.append(f"sweep ({ex}): seconds per member-epoch (relative to K=1): " + ", ".join(per_k))
    lines += ["", "targets:"]
    for t in r["targets"]:
        mark, op = "met " if t["met"] else "MISS", "≥" if t["at_least"] else "≤"
        lines.append(f"  {mark}  {t['name']}: {t['value']:.4f} ({op} {t['target']:g})")
    return "\n".join(lines)
