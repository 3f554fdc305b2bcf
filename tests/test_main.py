"""`python -m jaxl2` (jaxl2/__main__.py) runs the application, while `import jaxl2`, the
library, loads none of it."""

import subprocess
import sys


def test_import_jaxl2_loads_no_application_dependency():
    code = (
        "import sys, jaxl2; [getattr(jaxl2, n) for n in jaxl2.__all__]; "
        "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    loaded = set(r.stdout.split())
    assert "jax" in loaded
    heavy = {"flax", "orbax", "tensorflow_datasets", "tensorflow", "matplotlib", "rich", "mlxtend", "yaml"}
    assert not heavy & loaded, heavy & loaded
