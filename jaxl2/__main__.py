"""``python -m jaxl2 …``: runs the application's command (``python -m jaxl2.mnist``), which
needs the ``mnist`` extra. The library itself imports nothing of the application."""

import runpy

runpy.run_module("jaxl2.mnist", run_name="__main__", alter_sys=True)
