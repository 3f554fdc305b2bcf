"""What jaxl2 costs over hand-written JAX, on models that are not the reference MLP.

Three workloads (params: plain dicts of float32 arrays; λ = 1e-3 on the kernels, the leaves
whose last key is ``kernel``; ``optax.sgd(1e-2, momentum=0.9)``; a fixed random batch):

* ``200 leaves``: 100 tanh layers of 512×512 (a kernel and a bias each, ~26M parameters),
  batch 64, mean squared error;
* ``stacked``: 12 transformer-MLP blocks stacked for ``jax.lax.scan`` (kernels
  (12, 768, 3072) and (12, 3072, 768), LayerNorm and biases), ``x + W2·gelu(W1·LN(x))``,
  batch 32 of width 768, mean squared error;
* ``mlp``: the reference 784-256-256-10 ReLU MLP, softmax cross-entropy, batch 128.

Each is measured against the same thing written by hand; every number is the median over
rounds of a per-round ratio: in each round every variant runs k steps from fresh buffers, the
variants taking turns a tenth of the round at a time (the order rotated every turn), so drift on
a shared machine cancels. Where a variant compiles to the
same optimized HLO as its reference (metadata aside), the report says so: its ratio's distance from
1 is then the machine's noise. Targets (≤):

1. ``make_train_step(loss, tx, l2=1e-3)`` ÷ hand-written step: 1.05
2. ``make_train_step(..., norms=True)`` ÷ hand-written step: 1.25
3. ``jaxl2.regularized`` value_and_grad ÷ hand-written ``loss + λ/2·Σw²``: 1.02
4. ``chain(jaxl2.add_decayed_weights, sgd)`` ÷ ``chain(optax.add_decayed_weights(mask=jaxl2.mask),
   sgd)``, update + apply with a fixed gradient: 1.02
5. trace + compile seconds of step 1 ÷ the hand-written step's: 1.2
6. peak memory of step 1 ÷ the hand-written step's: 1.01, where peak = argument + output +
   temp − alias bytes of ``compiled.memory_analysis()`` (XLA's own peak figure, where the
   installed jax provides one, is printed beside it).

Run (about 4 minutes on 2 CPU cores; ``--quick``, tiny sizes and 2 rounds, about 30 s)::

    .venv/bin/python experiments/library_bench.py [--rounds 12] [--quick] [--json]

The exit code is 0 whether the targets are met or not (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxl2

LAM, LR = 1e-3, 1e-2
TARGETS = {  # key: (what is divided by what, the bound)
    "step": ("make_train_step(loss, tx, l2=1e-3) ÷ hand-written step", 1.05),
    "step_norms": ("make_train_step(..., norms=True) ÷ hand-written step", 1.25),
    "value_and_grad": ("regularized(loss, 1e-3) value_and_grad ÷ hand-written", 1.02),
    "decay": ("chain(jaxl2.add_decayed_weights) ÷ chain(optax.add_decayed_weights(mask))", 1.02),
    "compile": ("trace + compile, make_train_step ÷ hand-written step", 1.2),
    "memory": ("peak memory, make_train_step ÷ hand-written step", 1.01),
}


class Workload(NamedTuple):
    name: str
    sizes: str
    params: dict
    batch: tuple
    loss: Callable[..., jax.Array]


def _normal(rng: np.random.Generator, shape: tuple, fan_in: int) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(fan_in))


def deep_tanh(layers: int = 100, width: int = 512, batch: int = 64) -> Workload:
    rng = np.random.default_rng(0)
    params = {
        f"layer_{i:03d}": {"kernel": _normal(rng, (width, width), width), "bias": jnp.zeros(width)}
        for i in range(layers)
    }
    x_BxD, y_BxD = _normal(rng, (batch, width), 1), _normal(rng, (batch, width), 1)

    def loss(p, x_BxD, y_BxD):
        for layer in p.values():
            x_BxD = jnp.tanh(x_BxD @ layer["kernel"] + layer["bias"])
        return jnp.mean((x_BxD - y_BxD) ** 2)

    sizes = f"{layers} tanh layers of {width}×{width} ({2 * layers} leaves), batch {batch}"
    return Workload("200 leaves", sizes, params, (x_BxD, y_BxD), loss)


def stacked(blocks: int = 12, d: int = 768, f: int = 3072, batch: int = 32) -> Workload:
    rng = np.random.default_rng(1)
    params = {
        "ln": {"scale": jnp.ones((blocks, d)), "bias": jnp.zeros((blocks, d))},
        "mlp_in": {"kernel": _normal(rng, (blocks, d, f), d), "bias": jnp.zeros((blocks, f))},
        "mlp_out": {"kernel": _normal(rng, (blocks, f, d), f), "bias": jnp.zeros((blocks, d))},
    }
    x_BxD, y_BxD = _normal(rng, (batch, d), 1), _normal(rng, (batch, d), 1)

    def block(x_BxD, p):
        mu, var = jnp.mean(x_BxD, -1, keepdims=True), jnp.var(x_BxD, -1, keepdims=True)
        h_BxD = (x_BxD - mu) * jax.lax.rsqrt(var + 1e-6) * p["ln"]["scale"] + p["ln"]["bias"]
        h_BxF = jax.nn.gelu(h_BxD @ p["mlp_in"]["kernel"] + p["mlp_in"]["bias"])
        return x_BxD + h_BxF @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"], None

    def loss(p, x_BxD, y_BxD):
        return jnp.mean((jax.lax.scan(block, x_BxD, p)[0] - y_BxD) ** 2)

    sizes = f"{blocks} scanned blocks, kernels ({blocks}, {d}, {f}) and ({blocks}, {f}, {d}), batch {batch}"
    return Workload("stacked", sizes, params, (x_BxD, y_BxD), loss)


def mlp(hidden: int = 256, batch: int = 128) -> Workload:
    rng = np.random.default_rng(2)
    dims = (784, hidden, hidden, 10)
    params = {
        f"Dense_{i}": {"kernel": _normal(rng, (a, b), a), "bias": jnp.zeros(b)}
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))
    }
    x_BxI, y_B = (
        jnp.asarray(rng.uniform(size=(batch, 784)), jnp.float32),
        jnp.asarray(rng.integers(0, 10, batch)),
    )

    def loss(p, x_BxI, y_B):
        h = x_BxI
        for i in range(3):
            h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
            h = jax.nn.relu(h) if i < 2 else h
        return optax.softmax_cross_entropy_with_integer_labels(h, y_B).mean()

    return Workload("mlp", "-".join(map(str, dims)) + f" ReLU MLP, batch {batch}", params, (x_BxI, y_B), loss)


# ---- the hand-written references ----


def hand_regularized(loss: Callable) -> Callable:
    """``loss + λ/2·Σ kernels w²``, a fresh function every call."""

    def objective(params, *batch):
        kernels = [w for path, w in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == "kernel"]
        return loss(params, *batch) + LAM / 2 * sum(jnp.sum(w * w) for w in kernels)

    return objective


def hand_step(loss: Callable, tx: optax.GradientTransformation) -> Callable:
    objective = hand_regularized(loss)

    def step(params, opt_state, *batch):
        loss_value, grads = jax.value_and_grad(objective)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss_value}

    return step


def decay_update(tx: optax.GradientTransformation) -> Callable:
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return update


# ---- timing ----


def runner(fn: Callable, args: tuple, donate: bool) -> Callable[[int], None]:
    """``run(k)``: k calls of jitted ``fn``; with ``donate``, ``fn(a0, a1, *rest) -> (a0', a1', ...)``
    runs on its own copy of ``a0, a1``, fed back step after step. ``run.reset()`` starts again
    from fresh copies (new buffers: where they land in memory is then drawn afresh)."""
    jitted = jax.jit(fn, donate_argnums=(0, 1) if donate else ())
    state = []

    def run(k: int) -> None:
        out = None
        for _ in range(k):
            out = jitted(*state, *args[2:])
            if donate:
                state[:] = out[:2]
        jax.block_until_ready(out)

    def reset() -> None:
        state[:] = list(jax.tree.map(jnp.copy, args[:2])) if donate else list(args[:2])
        run(1)  # (the first time, compile) and one step

    reset()
    run.reset = reset  # type: ignore[attr-defined]
    run.program = lambda: program(jitted.lower(*args).compile())  # type: ignore[attr-defined]
    return run


def seconds(run: Callable[[int], None], k: int) -> float:
    t0 = time.perf_counter()
    run(k)
    return time.perf_counter() - t0


def paired_ratios(runs: dict[str, Callable], rounds: int, k: int, chunk: int) -> dict[str, list[float]]:
    """Per round, each variant's time for ``k`` steps ÷ the first's. Within a round the variants
    take turns, ``chunk`` steps at a time (the order rotated every turn), so that they share
    the machine's moods; each round starts them from fresh buffers."""
    names, ratios = list(runs), {n: [] for n in list(runs)[1:]}
    turns = max(1, k // chunk)
    for _ in range(rounds):
        for n in names:
            runs[n].reset()
        t = dict.fromkeys(names, 0.0)
        for turn in range(turns):
            for n in names[turn % len(names) :] + names[: turn % len(names)]:
                t[n] += seconds(runs[n], chunk)
        for n in ratios:
            ratios[n].append(t[n] / t[names[0]])
    return ratios


def steps_for(run: Callable[[int], None], budget_s: float, turn_s: float) -> tuple[int, int, float]:
    """How many steps fill ``budget_s`` and one turn of ``turn_s`` (at least 3 and 1), and the
    seconds of one step."""
    one = min(seconds(run, 1) for _ in range(3))
    return max(3, math.ceil(budget_s / one)), max(1, math.ceil(turn_s / one)), one


def compile_ratio(makers: dict[str, Callable[[], Callable]], args: tuple, rounds: int) -> tuple[list, dict]:
    """Per round, trace + compile seconds of ``jax.jit(fresh fn)`` ÷ the first's (order
    alternating), and the last round's compiled executables."""
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    names, ratios, compiled = list(makers), [], {}
    for r in range(rounds):
        t = {}
        for n in names if r % 2 == 0 else names[::-1]:
            fn = makers[n]()
            t0 = time.perf_counter()
            compiled[n] = jax.jit(fn, donate_argnums=(0, 1)).lower(*specs).compile()
            t[n] = time.perf_counter() - t0
        ratios.append(t[names[1]] / t[names[0]])
    return ratios, compiled


def peak_bytes(compiled: Any) -> tuple[int, int | None]:
    """argument + output + temp − alias bytes, and XLA's peak figure if it has one."""
    m = compiled.memory_analysis()
    ours = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return ours, getattr(m, "peak_memory_in_bytes", None) or None


def program(compiled: Any) -> str:
    """The optimized HLO without its metadata, its instructions renamed in order of appearance
    (``%v0``, ``%v1``, …): two programs that differ only in names and source lines compare equal."""
    text = re.sub(r",? metadata=\{[^}]*\}", "", compiled.as_text())
    names: dict[str, str] = {}
    text = re.sub(r"%[\w.-]+", lambda m: names.setdefault(m.group(0), f"%v{len(names)}"), text)
    return "\n".join(ln for ln in text.splitlines() if " = " in ln)


def hlo_ops(compiled: Any) -> int:
    """Instructions in the optimized HLO (every ``name = op(...)`` line)."""
    return sum(" = " in line for line in compiled.as_text().splitlines())


# ---- one workload ----


def measure(w: Workload, rounds: int, budget_s: float) -> dict[str, Any]:
    tx = optax.sgd(LR, momentum=0.9)
    opt_state = tx.init(w.params)
    step_args = (w.params, opt_state, *w.batch)
    default = jaxl2.make_train_step(w.loss, tx, l2=LAM)
    with_norms = jaxl2.make_train_step(w.loss, tx, l2=LAM, norms=True)
    steps = {
        "hand": runner(hand_step(w.loss, tx), step_args, True),
        "step": runner(default, step_args, True),
        "step_norms": runner(with_norms, step_args, True),
    }
    k, chunk, one = steps_for(steps["hand"], budget_s, budget_s / 10)
    ratios = paired_ratios(steps, rounds, k, chunk)

    vg = {
        "hand": runner(jax.value_and_grad(hand_regularized(w.loss)), (w.params, *w.batch), False),
        "value_and_grad": runner(
            jax.value_and_grad(jaxl2.regularized(w.loss, LAM)), (w.params, *w.batch), False
        ),
    }
    ratios.update(paired_ratios(vg, rounds, *steps_for(vg["hand"], budget_s, budget_s / 10)[:2]))

    grads = jax.grad(w.loss)(w.params, *w.batch)
    decays = {}
    for name, decay in (
        ("optax", optax.add_decayed_weights(LAM, mask=jaxl2.mask(w.params))),
        ("decay", jaxl2.add_decayed_weights(LAM)),
    ):
        chain = optax.chain(decay, optax.sgd(LR, momentum=0.9))
        decays[name] = runner(decay_update(chain), (w.params, chain.init(w.params), grads), True)
    ratios.update(paired_ratios(decays, rounds, *steps_for(decays["optax"], budget_s, budget_s / 10)[:2]))

    makers = {
        "hand": lambda: hand_step(w.loss, tx),
        "step": lambda: jaxl2.make_train_step(w.loss, tx, l2=LAM),
    }
    ratios["compile"], compiled = compile_ratio(makers, step_args, min(rounds, 6))
    peaks = {n: peak_bytes(c) for n, c in compiled.items()}
    ratios["memory"] = [peaks["step"][0] / peaks["hand"][0]]

    out = {"sizes": w.sizes, "steps_per_round": k, "hand_ms_per_step": 1e3 * one}
    # the same optimized program (metadata aside) as the reference: then a ratio off 1 is the machine's noise
    out["same_program"] = {
        "step": program(compiled["hand"]) == program(compiled["step"]),
        "value_and_grad": vg["hand"].program() == vg["value_and_grad"].program(),
        "decay": decays["optax"].program() == decays["decay"].program(),
    }
    out["peak_bytes"] = {n: p[0] for n, p in peaks.items()}
    out["xla_peak_bytes"] = {n: p[1] for n, p in peaks.items()}
    out["hlo_ops"] = {n: hlo_ops(c) for n, c in compiled.items()}
    out["targets"] = {}
    for key, (what, bound) in TARGETS.items():
        value = statistics.median(ratios[key])
        out["targets"][key] = {"what": what, "ratio": value, "target": bound, "met": value <= bound}
        out["targets"][key]["rounds"] = ratios[key]
    return out


# ---- the report ----


def machine() -> dict[str, Any]:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")
    except OSError:
        cpu = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "device_kind": jax.devices()[0].device_kind,
    }


def report(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores; jax {m['jax']}, optax {m['optax']}; device {m['device_kind']}",
        f"rounds: {r['rounds']} (paired, order rotated; median of per-round ratios){'  [quick]' * r['quick']}",
    ]
    for name, w in r["workloads"].items():
        lines += ["", f"{name}: {w['sizes']}"]
        lines.append(
            f"  hand-written step: {w['hand_ms_per_step']:.1f} ms ({w['steps_per_round']} steps per round); "
            f"optimized HLO instructions: hand {w['hlo_ops']['hand']}, make_train_step {w['hlo_ops']['step']}"
        )
        mib = {n: f"{b / 2**20:.1f}" for n, b in w["peak_bytes"].items()}
        xla = w["xla_peak_bytes"]
        lines.append(
            f"  peak memory, MiB: hand {mib['hand']}, make_train_step {mib['step']}"
            + (f" (XLA peak: {xla['hand'] / 2**20:.1f}, {xla['step'] / 2**20:.1f})" if xla["hand"] else "")
        )
        same = [k for k, v in w["same_program"].items() if v]
        lines.append(
            "  optimized HLO identical to the reference's (metadata aside): " + (", ".join(same) or "none")
        )
        for t in w["targets"].values():
            mark = "met " if t["met"] else "MISS"
            lines.append(f"  {mark}  {t['what']}: {t['ratio']:.3f} (≤ {t['target']:g})")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    targets = "; ".join(f"{what} ≤ {bound:g}" for what, bound in TARGETS.values())
    ap = argparse.ArgumentParser(
        description="Times jaxl2 against the same code written by hand, on three workloads "
        "(200 leaves, a scan-stacked MLP, the reference MLP), and prints each target with "
        f"'met' or 'MISS'. Targets (median of per-round ratios): {targets}. Exit code 0 either way.",
    )
    ap.add_argument(
        "--rounds",
        type=positive_int,
        help="paired timing rounds per measurement (default 12; 2 with --quick); trace + compile "
        "is timed in at most 6",
    )
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes and 2 rounds: checks that it runs (~30 s)"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 12)
    budget_s = 0.02 if args.quick else 0.25
    if args.quick:
        workloads = [lambda: deep_tanh(10, 32, 8), lambda: stacked(2, 32, 64, 4), lambda: mlp(32, 16)]
    else:
        workloads = [deep_tanh, stacked, mlp]
    result: dict[str, Any] = {"machine": machine(), "rounds": rounds, "quick": args.quick, "workloads": {}}
    for build in workloads:
        w = build()
        result["workloads"][w.name] = measure(w, rounds, budget_s)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
