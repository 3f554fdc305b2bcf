"""The ``jaxl2`` command: ``train`` (the main job), ``eval`` and ``gradcheck``.

Bad input exits with status 2 and one line ``jaxl2: error: <what> (<allowed>)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

from jaxl2.train import OPTIMIZERS, SCHEDULES, Config

DEFAULTS = Config()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        sys.stderr.write(f"jaxl2: error: {message}\n")
        raise SystemExit(2)


def _fail(message: str) -> None:
    sys.stderr.write(f"jaxl2: error: {message}\n")
    raise SystemExit(2)


def parse_l2(text: str) -> float | dict[str, float]:
    """``1e-3`` → 1e-3; ``'.*Dense_0/kernel=1e-3,.*=1e-4'`` → an ordered ``{regex: λ}``.

    Patterns are full-path regexes (``re.fullmatch``), first match wins; each item is split
    at its last ``=``, items at commas (so a pattern cannot contain a comma).
    """
    try:
        return float(text)
    except ValueError:
        pass
    out: dict[str, float] = {}
    for item in text.split(","):
        pattern, sep, lam = item.rpartition("=")
        if not sep or not pattern:
            raise argparse.ArgumentTypeError(
                f"--l2 {text!r} is neither a number nor PATTERN=λ[,PATTERN=λ...] "
                "(e.g. --l2 1e-3 or --l2 'Dense_0=1e-3,.*=1e-4')"
            )
        try:
            out[pattern] = float(lam)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--l2 {item!r}: {lam!r} is not a number") from None
    return out


def _hidden(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(h) for h in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--hidden {text!r} is invalid (comma-separated positive widths, e.g. 256,256)"
        ) from None


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        help=f"mnist5k (shipped, offline), mnist (TFDS, downloads) or idx:DIR (default {d.dataset})",
    )
    g.add_argument("--data-dir", help="TFDS data_dir for --dataset mnist")
    g.add_argument(
        "--val-size",
        type=int,
        help="validation examples carved from train (default 500 for mnist5k, 5000 otherwise)",
    )
    g.add_argument(
        "--split-seed", type=int, help=f"seed of the train/validation(/test) split (default {d.split_seed})"
    )
    g = p.add_argument_group("regularization")
    g.add_argument(
        "--l2",
        type=parse_l2,
        help=f"λ of the penalty λ/2·Σw² on the selected kernels, or per layer as 'REGEX=λ,REGEX=λ' matched in order against paths like params/Dense_0/kernel (default {d.l2})",
    )
    g.add_argument("--select", help="which leaves: kernels (default), haiku, equinox, or a regex over paths")
    g.add_argument(
        "--weight-decay",
        type=float,
        help="weight decay in the optimizer: decoupled for --optimizer adamw, added before momentum for sgdw (default 0)",
    )
    g.add_argument("--allow-both", action="store_true", help="allow --l2 > 0 together with --weight-decay")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", help=f"{', '.join(OPTIMIZERS)} (default {d.optimizer})")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--schedule", help=f"{', '.join(SCHEDULES)} (default {d.schedule})")
    g.add_argument("--momentum", type=float, help=f"for --optimizer momentum (default {d.momentum})")
    g.add_argument(
        "--batch-size",
        type=int,
        help=f"default {d.batch_size}; the last partial batch of each epoch is dropped",
    )
    g.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=_hidden, help="hidden widths, comma-separated (default 256,256)")
    g.add_argument("--activation", help=f"relu, tanh, sigmoid, gelu or identity (default {d.activation})")
    g.add_argument(
        "--init", help="kernel init: lecun_normal (Flax's default) or normal (N(0, 1), the classic recipe)"
    )
    g.add_argument("--seed", type=int, help=f"init and shuffling seed (default {d.seed})")


FIELDS = [f.name for f in dataclasses.fields(Config)]


def _config(args: argparse.Namespace) -> tuple[Config, dict[str, Any]]:
    """The Config from the flags given, and the dict of flags that were given explicitly."""
    given = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    return dataclasses.replace(DEFAULTS, **given), given


def _enable_cache(args: argparse.Namespace) -> None:
    if not getattr(args, "no_cache", False):
        from jaxl2.train import enable_compilation_cache

        enable_compilation_cache()


def cmd_train(args: argparse.Namespace) -> int:
    cfg, given = _config(args)
    from jaxl2 import run as _run

    out = args.out or os.path.join(
        "runs", f"{cfg.dataset.replace(':', '_').replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if args.resume:
        if not args.out:
            _fail("--resume needs --out DIR, the run to continue")
        try:
            saved = _run.load_config(args.out)
        except ValueError as e:
            _fail(str(e))
        differ = {k: (v, getattr(saved, k)) for k, v in given.items() if v != getattr(saved, k)}
        if differ:
            desc = ", ".join(f"--{k.replace('_', '-')} {a} vs {b} in the run" for k, (a, b) in differ.items())
            _fail(
                f"--resume: flags differ from {args.out}/config.json: {desc} (resume with the run's own settings)"
            )
        cfg = saved
    l2_on = isinstance(cfg.l2, dict) or cfg.l2 != 0
    if cfg.weight_decay and l2_on and not args.allow_both:
        _fail("--weight-decay and --l2 together regularize twice (pass --l2 0, or --allow-both to mean it)")
    if args.devices is not None and args.devices < 1:
        _fail(f"--devices {args.devices} is invalid (an integer >= 1)")
    if args.distributed:
        from jaxl2.parallel import initialize_distributed

        if not args.out:
            _fail("--distributed needs --out DIR (one directory that every process can reach)")

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    _enable_cache(args)
    progress = None if args.quiet or args.json else _Progress(cfg.epochs)
    try:
        summary = _run.train_and_evaluate(
            cfg,
            out,
            resume=args.resume,
            overwrite=args.overwrite,
            checkpoint_every=args.checkpoint_every,
            on_start=progress.start if progress else None,
            on_epoch=progress.update if progress else None,
            devices=args.devices,
        )
    except ValueError as e:
        _fail(str(e))
    except _run.Diverged as e:
        sys.stderr.write(f"jaxl2: error: {e}\n")
        return 1
    except _run.Interrupted as e:
        sys.stderr.write(f"jaxl2: {e}; continue with: jaxl2 train --out {out} --resume\n")
        return 130
    finally:
        if progress:
            progress.close()
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 0


class _Progress:
    """A rich progress bar on stderr: epoch, loss, penalty and accuracy."""

    def __init__(self, epochs: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("epoch"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = self.bar.add_task("train", total=epochs, info="compiling…")
        self.started = False

    def start(self) -> None:
        self.started = True
        self.bar.start()

    def update(self, row: dict[str, Any]) -> None:
        info = (
            f"loss {row['train_loss']:.4f} penalty {row['train_penalty']:.4f} "
            f"acc {100 * row['train_accuracy']:.2f}% val {100 * row['val_accuracy']:.2f}%"
        )
        self.bar.update(self.task, completed=row["epoch"], info=info)

    def close(self) -> None:
        if self.started:
            self.bar.stop()


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"run directory: {s['out']}",
        f"{'split':<11}{'accuracy':>10}{'loss':>10}",
        *(
            f"{name:<11}{100 * s[k + '_accuracy']:>9.2f}%{s[k + '_loss']:>10.4f}"
            for name, k in (("train", "train"), ("validation", "val"), ("test", "test"))
        ),
        f"(best epoch by validation: {s['best_epoch']} of {s['epochs']}; penalty λ/2·Σw² = {s['penalty']:.4f})",
        "‖W‖² per layer: " + ", ".join(f"{p} {v:.1f}" for p, v in s["kernel_sq_norm"].items()),
        f"time: {s['seconds']:.2f} s training, {s['examples_per_second']:,.0f} examples/s "
        f"(+ {s['compile_seconds']:.2f} s compiling); device {s['device']}",
    ]
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--l2 {text!r} is invalid (comma-separated numbers, e.g. 0,1e-4,1e-3)"
        ) from None


def cmd_sweep(args: argparse.Namespace) -> int:
    from jaxl2 import sweep as _sweep

    l2s = args.l2
    args.l2 = None
    cfg, _ = _config(args)
    if args.seeds < 1:
        _fail(f"--seeds {args.seeds} is invalid (an integer >= 1)")
    _enable_cache(args)
    out = args.out or os.path.join("runs", f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    quiet = args.quiet or args.json

    def log(msg: str) -> None:
        if not quiet:
            sys.stderr.write(f"jaxl2: {msg}\n")

    def on_epoch(epoch: int, total: int) -> None:
        if not quiet and (epoch == total or epoch % max(1, total // 10) == 0):
            sys.stderr.write(f"\repoch {epoch}/{total}")
            sys.stderr.flush()

    try:
        summary = _sweep.train_sweep(
            cfg,
            l2s,
            [cfg.seed + i for i in range(args.seeds)],
            out,
            execution=args.execution,
            on_epoch=on_epoch,
            log=log,
        )
    except ValueError as e:
        _fail(str(e))
    if not quiet:
        sys.stderr.write("\n")
    if args.json:
        print(_sweep.results_json(summary))
        return 0
    print(
        f"sweep directory: {out} ({len(summary['results'])} members, {summary['execution']}, {summary['seconds']:.1f} s; {summary['device']})"
    )
    print(f"{'λ':>8} {'seed':>4} {'train':>7} {'val':>7} {'test':>7} {'gap':>6} {'Σ‖W‖²':>8}")
    for r in summary["results"]:
        print(
            f"{r['l2']:>8g} {r['seed']:>4} {100 * r['train_accuracy']:>6.2f}% {100 * r['val_accuracy']:>6.2f}% "
            f"{100 * r['test_accuracy']:>6.2f}% {100 * r['gap']:>5.2f} {sum(r['kernel_sq_norm'].values()):>8.1f}"
        )
    print(f"selected λ (best mean validation accuracy): {summary['selected_l2']:g}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from jaxl2 import bench

    if args.rounds is not None and args.rounds < 1:
        _fail(f"--rounds {args.rounds} is invalid (an integer >= 1)")
    res = bench.run_bench(quick=args.quick, rounds=args.rounds)
    print(json.dumps(res) if args.json else bench.format_bench(res))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jaxl2 import run as _run

    _enable_cache(args)
    try:
        res = _run.evaluate_run(args.run, args.dataset, args.split, args.data_dir)
    except ValueError as e:
        _fail(str(e))
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{args.dataset} {args.split}: accuracy {100 * res['accuracy']:.2f}%  loss {res['loss']:.4f}  n {res['n']}"
        )
    return 0


def cmd_gradcheck(args: argparse.Namespace) -> int:
    from jaxl2.gradcheck import gradcheck

    try:
        report = gradcheck(
            l2=args.l2,
            hidden=args.hidden,
            activation=args.activation,
            directions=args.directions,
            eps=args.eps,
            seed=args.seed,
        )
    except ValueError as e:
        _fail(str(e))
    if args.json:
        d = report.as_dict()
        print(
            json.dumps(
                {k: d[k] for k in ("penalty_grad_max_abs_err", "finite_difference_max_rel_err", "ok")} | d
            )
        )
    else:
        print(report)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jaxl2", description="L2 regularization (λ/2·Σw² on the kernels) of MLPs in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train the reference MLP with L2 (the main job)",
        description="Train the 784-256-256-10 MLP with λ/2·Σw² on its kernels; writes a run directory.",
    )
    _add_train_flags(t)
    g = t.add_argument_group("run")
    g.add_argument("--out", help="run directory (default runs/DATASET-TIMESTAMP)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        help="epochs between checkpoints (default 10; always at the end and on Ctrl-C)",
    )
    g.add_argument(
        "--no-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache (~/.cache/jaxl2/jax)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument(
        "--json", action="store_true", help="print only one JSON object with the results on stdout"
    )
    g = t.add_argument_group("devices and hosts")
    g.add_argument(
        "--devices",
        type=int,
        help="data-parallel over the first N devices (default: all); the batch must divide by N",
    )
    g.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() first (several hosts)"
    )
    g.add_argument("--coordinator", help="with --distributed: HOST:PORT of process 0 (or $JAXL2_COORDINATOR)")
    g.add_argument(
        "--num-processes", type=int, help="with --distributed: number of processes (or $JAXL2_NUM_PROCESSES)"
    )
    g.add_argument(
        "--process-id", type=int, help="with --distributed: this process's index (or $JAXL2_PROCESS_ID)"
    )
    t.set_defaults(func=cmd_train)

    sw = sub.add_parser(
        "sweep",
        help="train many λ (and seeds) at once in one compiled program",
        description="Train every (λ, seed) pair together (jax.vmap over stacked states, λ traced: one "
        "compilation). Writes sweep.json, sweep.csv and sweep.png; selects λ by validation accuracy only.",
    )
    _add_train_flags(sw)
    for action in sw._actions:
        if action.dest == "l2":
            action.type, action.default = _floats, [0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
            action.help = "comma-separated λ values (default 0,1e-5,1e-4,3e-4,1e-3,3e-3,1e-2)"
    g = sw.add_argument_group("sweep")
    g.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="init seeds per λ: --seed, --seed+1, … (default 1); data order follows the seed",
    )
    g.add_argument(
        "--execution",
        default="auto",
        help="vmap, sequential (lax.map in one program) or auto: on CPU the faster of the two on one timed epoch (default)",
    )
    g.add_argument("--out", help="sweep directory (default runs/sweep-TIMESTAMP)")
    g.add_argument("--no-cache", action="store_true", help="do not use the compilation cache")
    g.add_argument("--quiet", action="store_true", help="no progress")
    g.add_argument("--json", action="store_true", help='print only {"selected_l2": …, "results": […]}')
    sw.set_defaults(func=cmd_sweep)

    e = sub.add_parser(
        "eval",
        help="evaluate a run's best checkpoint",
        description="Loss and accuracy of a trained run's best checkpoint on a dataset split.",
    )
    e.add_argument("--run", required=True, help="the run directory")
    e.add_argument("--dataset", required=True, help="mnist5k, mnist or idx:DIR")
    e.add_argument("--data-dir", help="TFDS data_dir for --dataset mnist")
    e.add_argument("--split", default="test", help="train, val or test (default test)")
    e.add_argument("--no-cache", action="store_true", help="do not use the compilation cache")
    e.add_argument("--json", action="store_true", help="print one JSON object: accuracy, loss, n")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "bench",
        help="measure throughput against the machine's limit",
        description="Side-by-side, interleaved measurements: GEMM rate and the examples/s ceiling, jaxl2's "
        "training throughput at batch 128 and 1024, the L2 overhead, start-up, sweep scaling, and PyTorch if installed.",
    )
    b.add_argument(
        "--quick", action="store_true", help="small sizes and 2 rounds (for CI; numbers are rough)"
    )
    b.add_argument("--rounds", type=int, help="interleaved rounds (default 9, 2 with --quick)")
    b.add_argument("--json", action="store_true", help="print one JSON object with every number")
    b.set_defaults(func=cmd_bench)

    gc = sub.add_parser(
        "gradcheck",
        help="check gradients in float64",
        description="jax.grad of λ/2·Σw² vs the analytic λ·w, and of the regularized loss vs central finite differences, on the reference MLP in float64. Exits 0 when both pass.",
    )
    gc.add_argument("--l2", type=float, default=1e-3, help="λ (default 1e-3)")
    gc.add_argument("--hidden", type=_hidden, default=(256, 256), help="hidden widths (default 256,256)")
    gc.add_argument("--activation", default="relu", help="default relu")
    gc.add_argument(
        "--directions", type=int, default=8, help="random directions for finite differences (default 8)"
    )
    gc.add_argument("--eps", type=float, default=1e-5, help="finite-difference step (default 1e-5)")
    gc.add_argument("--seed", type=int, default=0)
    gc.add_argument("--json", action="store_true", help="print one JSON object")
    gc.set_defaults(func=cmd_gradcheck)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
