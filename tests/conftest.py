import os

# Tests must not write into the user's cache (compiled programs, parsed mnist5k): the
# checkout's own .jax_cache/ serves every session.
os.environ.setdefault("JAXL2_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))

# The suite compiles hundreds of small programs from a cold cache and runs each briefly: LLVM's
# optimisation of the CPU code takes more time than it saves there (164 → 106 s on
# test_train.py + test_sweep.py, 2-core AMD EPYC). The HLO passes, sharding and numerics checked
# here are those of every level; what runs fast is measured by the benchmarks, not by the tests.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
