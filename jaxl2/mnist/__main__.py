"""``python -m jaxl2.mnist …`` (and ``python -m jaxl2 …``): the ``jaxl2`` command."""

from jaxl2.mnist import sigint

sigint.install()  # before anything heavy is imported: see jaxl2.mnist.sigint

from jaxl2.mnist.cli import run  # noqa: E402

run()
