"""The ``jaxl2`` command: ``train`` (the main job), ``sweep``, ``eval``, ``bench``, ``gradcheck``.

The commands (:mod:`~jaxl2.mnist.cli.commands`, a function each), the parser
(:mod:`~jaxl2.mnist.cli.parser`) and what is printed, progress included
(:mod:`~jaxl2.mnist.cli.report`). The command maps flags to config fields, and jaxl2's own errors
to exit codes:

* 0 done; 1 training diverged (or a gradient check failed);
* 2 bad input, with one line ``jaxl2: error: <what> (<allowed>)``;
* 74 a file could not be written (a full disk, a quota, a read-only file system): one line
  naming the path, what was kept and how to resume;
* 130 interrupted (Ctrl-C), 143 stopped by SIGTERM: both after saving at the next safe point, with
  a line saying how to resume.

Only jaxl2's own error types are caught: anything else is a bug and shows its traceback. The
application is imported only when a command runs, so ``jaxl2 --help`` is fast; without the
``mnist`` extra, commands say how to install it.
"""

from __future__ import annotations

import os
import signal
import sys

from jaxl2.errors import Jaxl2Error
from jaxl2.mnist import sigint
from jaxl2.mnist.cli import commands
from jaxl2.mnist.cli.parser import build_parser
from jaxl2.mnist.cli.report import fail, message

__all__ = ["main", "run", "build_parser"]

COMMANDS = {
    "train": "train",
    "sweep": "sweep",
    "eval": "evaluate",
    "bench": "bench",
    "gradcheck": "gradcheck",
}
EXTRAS = ("flax", "orbax", "tensorflow_datasets", "matplotlib", "rich", "tensorboardX")


def _status(signum: int) -> int:
    """The exit status of a command stopped by ``signum``: 143 for SIGTERM, 130 for Ctrl-C."""
    return 143 if signum == signal.SIGTERM else 130


def _dispatch(args) -> int:
    from jaxl2.mnist.rundir import DiskFull
    from jaxl2.mnist.train import Diverged, Interrupted

    command = getattr(commands, COMMANDS[args.command])
    if not getattr(args, "no_cache", True):  # train, sweep and eval: JAX's persistent compilation cache
        from jaxl2.mnist.runtime import enable_compilation_cache

        enable_compilation_cache()
    resume = f"jaxl2 {args.command} --out {{}} --resume"
    try:
        code = command(args)
    except Diverged as e:
        return fail(message(e), 1)
    except DiskFull as e:
        return fail(f"{message(e)}; free some space, then continue with: {resume.format(e.out)}", 74)
    except Interrupted as e:
        sys.stderr.write(f"jaxl2: {message(e)}; continue with: {resume.format(e.out)}\n")
        return _status(e.signal)
    if sigint.pending():  # the signal came after the last safe point: the work is complete
        sys.stderr.write(f"jaxl2: {sigint.name()} after the work was done (nothing is lost)\n")
        return _status(sigint.last_signal())
    return code


def run() -> None:
    """The ``jaxl2`` program (its console script and ``python -m jaxl2``): :func:`main`, then the
    process ends without Python's teardown, which spends 0.2–0.5 s freeing JAX's compiled
    programs and every module one by one after the work, its files and its output are done.
    After ``jax.distributed.initialize`` the teardown runs as usual: it tells the coordinator."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader left (`jaxl2 … | head`): nothing more to deliver
        pass
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        raise SystemExit(code)
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Runs ``jaxl2 ARGV`` and returns its exit status."""
    previous = {s: signal.getsignal(s) for s in sigint.SIGNALS}
    sigint.install()  # Ctrl-C and SIGTERM wait for a safe point: never inside an import of jaxlib or XLA
    command = None
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
        command = args.command
        sigint.check()
        return _dispatch(args)
    except Jaxl2Error as e:
        return fail(message(e))
    except BrokenPipeError:  # `jaxl2 … | head`: the reader left; the work itself is done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        # What the command made is already removed (or checkpointed). Exit at once: tearing the
        # interpreter down while XLA's threads may still run can crash it.
        sys.stderr.write("jaxl2: interrupted\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_status(sigint.last_signal()))
    except ImportError as e:
        if command and e.name and e.name.split(".")[0] in EXTRAS:
            return fail(f"jaxl2 {command} needs the mnist extra ({e}): pip install 'jaxl2[mnist]'")
        raise
    finally:
        for s, handler in previous.items():
            if handler is not None:
                signal.signal(s, handler)
