#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, run the tests that touch the training path
# on the GPU and `jaxl2 bench --json`, and print the numbers (README "Performance", GPU row).
#
#   bash experiments/gpu_check.sh            # writes runs/gpu-check/{tests.log,bench.json,bench.txt}
#   OUT=/some/dir PYTHON=python3 bash experiments/gpu_check.sh
#
# JAX with CUDA: an installed CUDA build is used as it is (the lent machines have one and no
# network); otherwise `pip install "jax[cuda12]"` installs it. jaxl2 runs from this checkout
# (PYTHONPATH), so nothing else of the environment is changed. Exit status: that of the tests.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  echo "no CUDA build of jax here: installing jax[cuda12]"
  "$PY" -m pip install -q -U "jax[cuda12]" || echo "could not install jax[cuda12]: running on $("$PY" -c 'import jax; print(jax.default_backend())')"
fi
"$PY" -c 'import jax; print("jax", jax.__version__, "devices:", jax.devices())'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# The training path on the GPU: the step, the scanned epoch, resume, the sweep.
"$PY" -m pytest -q -x -p no:cacheprovider tests/test_step.py tests/test_train.py tests/test_sweep.py 2>&1 | tee "$OUT/tests.log"
status=${PIPESTATUS[0]}

"$PY" -m jaxl2 bench --json >"$OUT/bench.json" && "$PY" - "$OUT/bench.json" <<'PY' | tee "$OUT/bench.txt"
import json, sys
from jaxl2.mnist.bench import format_bench
print(format_bench(json.load(open(sys.argv[1]))))
PY
echo "tests exit status: $status"
exit "$status"
