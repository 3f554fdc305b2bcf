"""`python -m jaxl2` (jaxl2/__main__.py) runs the application, while `import jaxl2`, the
library, loads none of it."""

import os
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


def test_library_modules_import_no_application_module():
    root = os.path.join(os.path.dirname(__file__), "..", "jaxl2")
    for name in os.listdir(root):
        if name.endswith(".py"):
            text = open(os.path.join(root, name)).read()
            assert "import jaxl2.mnist" not in text and "from jaxl2.mnist" not in text, name
            assert "import flax" not in text and "from flax" not in text, name
